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

/// A console login's new password never shows in Debug output.
impl std::fmt::Debug for admin::SetConsoleUserRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetConsoleUserRequest")
            .field("name", &self.name)
            .field("password", &"(not shown)")
            .finish()
    }
}

#[cfg(test)]
#[test]
fn a_console_password_does_not_show_in_debug() {
    let r = admin::SetConsoleUserRequest {
        name: "alice".into(),
        password: "not to be seen".into(),
    };
    let shown = format!("{r:?}");
    assert!(
        shown.contains("alice") && !shown.contains("not to be seen"),
        "{shown}"
    );
}

/// The encoded `FileDescriptorSet` of all three APIs.
pub const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");

/// Every call path of the three APIs (`/package.Service/Method`), read
/// from [`DESCRIPTOR_SET`]: what a metrics label may name (anything else a
/// client sends is not a method of ours).
pub fn method_paths() -> std::collections::BTreeSet<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(DESCRIPTOR_SET) else {
        return Default::default();
    };
    let mut out = std::collections::BTreeSet::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                out.insert(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn method_paths_are_those_of_the_services() {
        let paths = super::method_paths();
        assert!(paths.contains("/guestkey.admin.v1.Admin/CreateVolume"));
        assert!(paths.contains("/guestkey.host.v1.HostApi/Enroll"));
        assert!(paths.contains("/guestkey.agent.v1.HostAgent/CreateVolume"));
        assert!(paths.len() > 40, "{}", paths.len());
    }
}
