//! The tonic services: thin adapters that authenticate the caller by its
//! certificate, call [`Core`], and convert with [`crate::pb`].

use std::sync::Arc;

use guestkey_proto::admin::{self as pb, admin_server::Admin};
use guestkey_proto::host::{self as hpb, host_api_server::HostApi};
use tonic::{Request, Response, Status};

use crate::audit;
use crate::core::{Caller, Core};
use crate::pb::{audit_record, guest, host, policy, policy_from, status, verification, volume};
use crate::tls::peer_fingerprint;

/// Admin API.
pub struct AdminService(pub Arc<Core>);
/// Host API.
pub struct HostService(pub Arc<Core>);

fn caller<T>(core: &Core, req: &Request<T>, want_admin: bool) -> Result<Caller, Status> {
    let what = if want_admin {
        "the admin API"
    } else {
        "the host API"
    };
    let Some(fp) = peer_fingerprint(req) else {
        core.audit_refusal("unauthenticated", what, "no client certificate");
        let hint = if want_admin {
            "pass --admin-dir with the admin credential made by `guestkey-server init`"
        } else {
            "enroll the host first (`guestkeyd enroll`)"
        };
        return Err(Status::unauthenticated(format!(
            "{what} needs a client certificate: {hint}"
        )));
    };
    match core.identify(&fp).map_err(status)? {
        Some(c @ Caller::Admin(_)) if want_admin => Ok(c),
        Some(c @ Caller::Host(_)) if !want_admin => Ok(c),
        Some(c) => {
            core.audit_refusal(&c.actor(), what, "wrong kind of certificate");
            Err(Status::permission_denied(format!(
                "this certificate ({}) may not call {what}",
                c.actor()
            )))
        }
        None => {
            core.audit_refusal(
                &format!("cert:{fp}"),
                what,
                "unknown or revoked certificate",
            );
            Err(Status::permission_denied(format!(
                "certificate {fp} is revoked or unknown to this server: ask the admin (`guestkeyctl host show`)"
            )))
        }
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_host(&self, req: Request<pb::AddHostRequest>) -> R<pb::AddHostResponse> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let (h, token, expires) = self.0.add_host(&c, &r.name, &r.address).map_err(status)?;
        Ok(Response::new(pb::AddHostResponse {
            host: Some(host(h)),
            enrollment_token: token,
            token_expires_unix: expires,
        }))
    }

    async fn list_hosts(&self, req: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        caller(&self.0, &req, true)?;
        let hosts = self.0.list_hosts().map_err(status)?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: hosts.into_iter().map(host).collect(),
        }))
    }

    async fn get_host(&self, req: Request<pb::HostRef>) -> R<pb::Host> {
        caller(&self.0, &req, true)?;
        Ok(Response::new(host(
            self.0.get_host(&req.into_inner().name).map_err(status)?,
        )))
    }

    async fn revoke_host(&self, req: Request<pb::HostRef>) -> R<pb::Host> {
        let c = caller(&self.0, &req, true)?;
        Ok(Response::new(host(
            self.0
                .revoke_host(&c, &req.into_inner().name)
                .map_err(status)?,
        )))
    }

    async fn set_host_migration(&self, req: Request<pb::SetHostMigrationRequest>) -> R<pb::Host> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let h = self
            .0
            .set_host_migration(&c, &r.name, &r.libvirt_uri, &r.migration_uri)
            .map_err(status)?;
        Ok(Response::new(host(h)))
    }

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let v = self
            .0
            .create_volume(&c, &r.host, &r.pool, &r.name, r.capacity_bytes, &r.format)
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn encrypt_volume(&self, req: Request<pb::EncryptVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let v = crate::convert::encrypt_volume(self.0.clone(), c, r.host, r.pool, r.name, r.format)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn decrypt_volume(&self, req: Request<pb::DecryptVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let v = self
            .0
            .decrypt_volume(&c, &r.name_or_id, r.confirm)
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> R<pb::ListVolumesResponse> {
        caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let host = (!r.host.is_empty()).then_some(r.host.as_str());
        let vols = self.0.list_volumes(host).map_err(status)?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: vols.into_iter().map(volume).collect(),
        }))
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> R<pb::Volume> {
        caller(&self.0, &req, true)?;
        Ok(Response::new(volume(
            self.0
                .get_volume(&req.into_inner().name_or_id)
                .map_err(status)?,
        )))
    }

    async fn delete_volume(&self, req: Request<pb::VolumeRef>) -> R<pb::Volume> {
        let c = caller(&self.0, &req, true)?;
        Ok(Response::new(volume(
            self.0
                .delete_volume(&c, &req.into_inner().name_or_id)
                .map_err(status)?,
        )))
    }

    async fn rekey_volume(&self, req: Request<pb::RekeyVolumeRequest>) -> R<pb::Volume> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        Ok(Response::new(volume(
            self.0
                .request_rekey(
                    &c,
                    &r.name_or_id,
                    r.deep,
                    &r.placement,
                    r.bandwidth_bytes_per_sec,
                )
                .map_err(status)?,
        )))
    }

    async fn set_policy(&self, req: Request<pb::Policy>) -> R<pb::Policy> {
        let c = caller(&self.0, &req, true)?;
        let p = self
            .0
            .set_policy(&c, &policy_from(req.into_inner()))
            .map_err(status)?;
        Ok(Response::new(policy(p)))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> R<pb::ListPoliciesResponse> {
        caller(&self.0, &req, true)?;
        let ps = self.0.list_policies().map_err(status)?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: ps.into_iter().map(policy).collect(),
        }))
    }

    async fn remove_policy(&self, req: Request<pb::Policy>) -> R<pb::Policy> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let p = self
            .0
            .remove_policy(&c, &r.scope, &r.target)
            .map_err(status)?;
        Ok(Response::new(policy(p)))
    }

    async fn define_guest(&self, req: Request<pb::DefineGuestRequest>) -> R<pb::Guest> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        Ok(Response::new(guest(
            self.0
                .define_guest(&c, &r.host, &r.domain_xml)
                .map_err(status)?,
        )))
    }

    async fn list_guests(&self, req: Request<pb::ListGuestsRequest>) -> R<pb::ListGuestsResponse> {
        caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let host = (!r.host.is_empty()).then_some(r.host.as_str());
        let guests = self.0.list_guests(host).map_err(status)?;
        Ok(Response::new(pb::ListGuestsResponse {
            guests: guests.into_iter().map(guest).collect(),
        }))
    }

    async fn get_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        caller(&self.0, &req, true)?;
        Ok(Response::new(guest(
            self.0
                .get_guest(&req.into_inner().name_or_uuid)
                .map_err(status)?,
        )))
    }

    async fn undefine_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        self.guest_action(req, "undefine")
    }

    async fn start_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        self.guest_action(req, "start")
    }

    async fn stop_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        self.guest_action(req, "stop")
    }

    async fn migrate_guest(&self, req: Request<pb::MigrateGuestRequest>) -> R<pb::Guest> {
        let c = caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let g = crate::migrate::migrate_guest(
            self.0.clone(),
            c,
            r.name_or_uuid,
            r.to_host,
            r.live,
            r.r#unsafe,
        )
        .await
        .map_err(status)?;
        Ok(Response::new(guest(g)))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        caller(&self.0, &req, true)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(10_000)
        };
        let records =
            audit::list(&self.0.db(), r.after_seq, limit).map_err(|e| status(e.into()))?;
        Ok(Response::new(pb::ListAuditResponse {
            records: records.into_iter().map(audit_record).collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> R<pb::VerifyAuditResponse> {
        caller(&self.0, &req, true)?;
        let v = audit::verify(&self.0.db()).map_err(|e| status(e.into()))?;
        Ok(Response::new(verification(v)))
    }

    async fn get_ca_certificate(
        &self,
        req: Request<pb::GetCaCertificateRequest>,
    ) -> R<pb::CaCertificate> {
        caller(&self.0, &req, true)?;
        Ok(Response::new(pb::CaCertificate {
            pem: self.0.ca_cert_pem().to_owned(),
        }))
    }
}

impl AdminService {
    fn guest_action(&self, req: Request<pb::GuestRef>, action: &'static str) -> R<pb::Guest> {
        let c = caller(&self.0, &req, true)?;
        let g = self
            .0
            .guest_action(&c, &req.into_inner().name_or_uuid, action)
            .map_err(status)?;
        Ok(Response::new(guest(g)))
    }
}

#[tonic::async_trait]
impl HostApi for HostService {
    async fn enroll(&self, req: Request<hpb::EnrollRequest>) -> R<hpb::EnrollResponse> {
        // No client certificate needed: the one-time token authorises.
        let r = req.into_inner();
        let (name, cert) = self
            .0
            .enroll(&r.token, &r.csr_der, &r.sealing_public_key)
            .map_err(status)?;
        Ok(Response::new(hpb::EnrollResponse {
            host_name: name,
            certificate_pem: cert,
            ca_certificate_pem: self.0.ca_cert_pem().to_owned(),
            server_certificate_sha256: self.0.server_cert_sha256(),
        }))
    }

    async fn report_progress(
        &self,
        req: Request<hpb::ProgressReport>,
    ) -> R<hpb::ReportInventoryResponse> {
        let c = caller(&self.0, &req, false)?;
        let Caller::Host(host) = &c else {
            return Err(Status::permission_denied("only hosts report progress"));
        };
        let running = req
            .into_inner()
            .running
            .into_iter()
            .map(|p| (p.volume_id, p.phase, p.done_bytes, p.total_bytes))
            .collect();
        self.0.record_progress(host, running).map_err(status)?;
        Ok(Response::new(hpb::ReportInventoryResponse {}))
    }

    async fn report_inventory(
        &self,
        req: Request<hpb::Inventory>,
    ) -> R<hpb::ReportInventoryResponse> {
        let c = caller(&self.0, &req, false)?;
        let Caller::Host(host) = &c else {
            return Err(Status::permission_denied("only hosts report inventories"));
        };
        let held: Vec<(String, u64, String)> = req
            .into_inner()
            .held
            .into_iter()
            .map(|k| (k.volume_id, k.generation, k.guest_uuid))
            .collect();
        self.0.record_inventory(host, &held).map_err(status)?;
        tracing::info!(%host, held = held.len(), "inventory reported");
        Ok(Response::new(hpb::ReportInventoryResponse {}))
    }
}
