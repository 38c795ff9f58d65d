//! guestkey's gRPC schema: generated code only (see `proto/*.proto`).
//!
//! Domain crates convert between these messages and their own types in one
//! `pb.rs` module each; domain logic never sees prost types.

#![allow(missing_docs, unreachable_pub, clippy::all)] // generated code

/// Admin API of the management server.
pub mod admin {
    tonic::include_proto!("guestkey.admin.v1");
}

/// Host API of the management server (enrollment, inventory).
pub mod host {
    tonic::include_proto!("guestkey.host.v1");
}

/// Host-agent API served by each host daemon.
pub mod agent {
    tonic::include_proto!("guestkey.agent.v1");
}

/// The encoded `FileDescriptorSet` of all three APIs.
pub const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
