//! guestkey host daemon (`guestkeyd`).
//!
//! The layers, bottom up (a module imports only those below it):
//!
//! | module | what |
//! | --- | --- |
//! | [`model`] | names, UUIDs, formats, states, volume entries |
//! | [`state`], [`progress`], [`hardening`], [`instance`], [`escrow`] | state directory, progress of long operations, process hardening, one instance per host, the escrow packet format |
//! | [`protect`] | the host's keys at rest, through key protectors |
//! | [`store`] | the sealed guest store and the volume registry |
//! | [`image`] | volume images behind the [`image::Images`] trait: qemu-img, guestkeyd's LUKS1 engine, link-safe file access |
//! | [`libvirt`] | libvirt behind the [`libvirt::Hypervisor`] trait: domains, secrets, pools, block jobs, events |
//! | [`ops`] | the daemon's operations ([`ops::Daemon`]), written against the two traits |
//! | [`hook`], [`grpc`] | the adapters: the libvirt hook's socket, and gRPC (the host-agent service, enrollment, reports) — the only files that import tonic or prost |
//!
//! Keys become ephemeral, private libvirt secrets only while QEMU opens the
//! disks; no RPC returns a key.

pub mod escrow;
pub mod grpc;
pub mod hardening;
pub mod hook;
pub mod image;
pub mod instance;
pub mod libvirt;
pub mod model;
pub mod ops;
pub mod progress;
pub mod protect;
pub mod state;
pub mod store;
