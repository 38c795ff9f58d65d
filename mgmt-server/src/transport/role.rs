//! What each role serves: a verifier (`--role verifier`) enrolls and
//! attests hosts and keeps the other halves of split keys, and has no
//! volumes or guests; the management server serves no halves. A call the
//! role does not serve is refused before it reaches a service, saying
//! which server to ask.

use std::task::{Context, Poll};

use crate::config::ServerRole;

/// Host-API and admin calls a verifier serves.
const VERIFIER_CALLS: &[&str] = &[
    "/guestkey.host.v1.HostApi/Enroll",
    "/guestkey.host.v1.HostApi/GetServerTrust",
    "/guestkey.host.v1.HostApi/ProveAttestationKey",
    "/guestkey.host.v1.HostApi/HalfChallenge",
    "/guestkey.host.v1.HostApi/ReleaseHalves",
    "/guestkey.host.v1.HostApi/ForgetHalves",
    "/guestkey.admin.v1.Admin/AddHost",
    "/guestkey.admin.v1.Admin/ListHosts",
    "/guestkey.admin.v1.Admin/GetHost",
    "/guestkey.admin.v1.Admin/RevokeHost",
    "/guestkey.admin.v1.Admin/AllowPcrs",
    "/guestkey.admin.v1.Admin/GetAllowlist",
    "/guestkey.admin.v1.Admin/SetHostGroup",
    "/guestkey.admin.v1.Admin/ListAudit",
    "/guestkey.admin.v1.Admin/VerifyAudit",
    "/guestkey.admin.v1.Admin/GetAuditHead",
    "/guestkey.admin.v1.Admin/VerifyAuditHead",
    "/guestkey.admin.v1.Admin/GetCaCertificate",
];

/// Calls only a verifier serves.
const HALF_CALLS: &[&str] = &[
    "/guestkey.host.v1.HostApi/HalfChallenge",
    "/guestkey.host.v1.HostApi/ReleaseHalves",
    "/guestkey.host.v1.HostApi/ForgetHalves",
];

/// Why `role` does not serve the call at `path`, if it does not.
pub(crate) fn refusal(role: ServerRole, path: &str) -> Option<String> {
    let call = path.rsplit('/').next().unwrap_or(path);
    match role {
        ServerRole::Verifier if !VERIFIER_CALLS.contains(&path) => Some(format!(
            "this guestkey-server runs as a verifier (--role verifier): it enrolls and attests hosts and keeps the other halves of split keys, and does not serve {call}; ask the management server"
        )),
        ServerRole::Management if HALF_CALLS.contains(&path) => Some(format!(
            "this guestkey-server is a management server: {call} is served by a verifier (`guestkey-server run --role verifier`), the one this host enrolled with by `guestkeyd enroll-verifier`"
        )),
        _ => None,
    }
}

/// The layer that refuses what the role does not serve.
#[derive(Clone, Copy)]
pub(crate) struct RoleLayer(pub(crate) ServerRole);

impl<S> tower_layer::Layer<S> for RoleLayer {
    type Service = RoleGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RoleGate {
            inner,
            role: self.0,
        }
    }
}

/// [`RoleLayer`]'s service.
#[derive(Clone)]
pub(crate) struct RoleGate<S> {
    inner: S,
    role: ServerRole,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for RoleGate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match refusal(self.role, req.uri().path()) {
            Some(why) => {
                let response = tonic::Status::failed_precondition(why).into_http();
                Box::pin(async move { Ok(response) })
            }
            None => Box::pin(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_serves_its_calls() {
        let v = ServerRole::Verifier;
        let m = ServerRole::Management;
        assert!(refusal(v, "/guestkey.host.v1.HostApi/ReleaseHalves").is_none());
        assert!(refusal(v, "/guestkey.admin.v1.Admin/AddHost").is_none());
        let e = refusal(v, "/guestkey.admin.v1.Admin/CreateVolume").unwrap();
        assert!(
            e.contains("runs as a verifier") && e.contains("CreateVolume"),
            "{e}"
        );
        assert!(refusal(v, "/guestkey.host.v1.HostApi/ReleaseKeys").is_some());
        assert!(refusal(m, "/guestkey.admin.v1.Admin/CreateVolume").is_none());
        let e = refusal(m, "/guestkey.host.v1.HostApi/HalfChallenge").unwrap();
        assert!(e.contains("served by a verifier"), "{e}");
    }
}
