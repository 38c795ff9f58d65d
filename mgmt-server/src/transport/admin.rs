//! The admin API's tonic service: a thin adapter that identifies the
//! caller by its certificate, parses the request into domain types
//! ([`super::pb`]), runs the domain call on a blocking thread (the store
//! blocks), and converts the answer.

use std::sync::Arc;

use guestkey_proto::admin::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::domain::Core;
use crate::model::{
    AllowScope, Caller, CoreError, GuestOp, InvalidInput, PolicyScope, RekeyKind, RekeyPlacement,
    ReleasePolicy, VolumeFormat,
};
use crate::transport::pb::{
    allowlist, audit_record, escrow, guest, host, invalid, managed_pool, pending, policy,
    policy_from, pool_view, status, verification, volume,
};
use crate::transport::tls::peer_fingerprint;

/// Admin API.
pub struct AdminService(pub Arc<Core>);

/// Which kind of caller a service wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Admin,
    Host,
}

/// Identifies the caller by its certificate's hash; refusals are audited.
/// Blocking (the store): call on a blocking thread.
pub(crate) fn authenticate(core: &Core, peer: Option<&str>, want: Want) -> Result<Caller, Status> {
    let what = match want {
        Want::Admin => "the admin API",
        Want::Host => "the host API",
    };
    let Some(fp) = peer else {
        core.audit_refusal("unauthenticated", what, "no client certificate");
        let hint = match want {
            Want::Admin => {
                "pass --admin-dir with the admin credential made by `guestkey-server init`"
            }
            Want::Host => "enroll the host first (`guestkeyd enroll`)",
        };
        return Err(Status::unauthenticated(format!(
            "{what} needs a client certificate: {hint}"
        )));
    };
    match (core.identify(fp).map_err(status)?, want) {
        (Some(c @ Caller::Admin(_)), Want::Admin) | (Some(c @ Caller::Host(_)), Want::Host) => {
            Ok(c)
        }
        (Some(c), _) => {
            core.audit_refusal(&c.actor(), what, "wrong kind of certificate");
            Err(Status::permission_denied(format!(
                "this certificate ({}) may not call {what}",
                c.actor()
            )))
        }
        (None, _) => {
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

/// Authenticates the caller of `req` and runs `f` with it, both on a
/// blocking thread.
pub(crate) async fn blocking<Q, T, F>(
    core: &Arc<Core>,
    req: &Request<Q>,
    want: Want,
    f: F,
) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&Core, Caller) -> Result<T, CoreError> + Send + 'static,
{
    let peer = peer_fingerprint(req);
    let core = core.clone();
    tokio::task::spawn_blocking(move || {
        let caller = authenticate(&core, peer.as_deref(), want)?;
        f(&core, caller).map_err(status)
    })
    .await
    .map_err(|e| Status::internal(format!("a blocking task failed: {e}")))?
}

type R<T> = Result<Response<T>, Status>;

/// Whose allowlist a request names: the group's if it names one, else
/// the host's.
fn scope_of(host: &str, group: &str) -> (AllowScope, String) {
    if group.is_empty() {
        (AllowScope::Host, host.to_owned())
    } else {
        (AllowScope::Group, group.to_owned())
    }
}

/// A release policy from a request ("": auto).
fn release_policy(text: &str) -> Result<ReleasePolicy, InvalidInput> {
    if text.is_empty() {
        Ok(ReleasePolicy::Auto)
    } else {
        text.parse()
    }
}

/// One allowed PCR value from a request.
fn allowed_pcr(
    pcr: u32,
    sha256: &str,
) -> Result<(u8, guestkey_protect::tpm::PcrValue), InvalidInput> {
    let bad = |why: String| InvalidInput {
        what: "PCR value",
        value: format!("{pcr}={sha256}"),
        why,
    };
    let p = u8::try_from(pcr)
        .ok()
        .filter(|p| *p < 24)
        .ok_or_else(|| bad("PCRs are 0 to 23".into()))?;
    let v = sha256.parse().map_err(bad)?;
    Ok((p, v))
}

impl AdminService {
    async fn admin<Q, T, F>(&self, req: &Request<Q>, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Core, Caller) -> Result<T, CoreError> + Send + 'static,
    {
        blocking(&self.0, req, Want::Admin, f).await
    }

    async fn guest_action(&self, req: Request<pb::GuestRef>, action: GuestOp) -> R<pb::Guest> {
        let name = req.get_ref().name_or_uuid.clone();
        let g = self
            .admin(&req, move |c, who| c.guest_action(&who, &name, action))
            .await?;
        Ok(Response::new(guest(g)))
    }
}

/// The console login `name` as the API shows it.
fn console_user(c: &Core, name: &str) -> Result<pb::ConsoleUser, CoreError> {
    c.console_users()?
        .into_iter()
        .find(|(n, _, _)| n == name)
        .map(|(name, created_unix, by)| pb::ConsoleUser {
            name,
            created_unix,
            by,
        })
        .ok_or_else(|| {
            CoreError::NotFound(format!(
                "no console login named {name} (see `guestkeyctl console-user list`)"
            ))
        })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_host(&self, req: Request<pb::AddHostRequest>) -> R<pb::AddHostResponse> {
        let r = req.get_ref().clone();
        let (h, token, expires) = self
            .admin(&req, move |c, who| c.add_host(&who, &r.name, &r.address))
            .await?;
        Ok(Response::new(pb::AddHostResponse {
            host: Some(host(h)),
            enrollment_token: token,
            token_expires_unix: expires,
        }))
    }

    async fn list_hosts(&self, req: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        let hosts = self.admin(&req, |c, _| c.list_hosts()).await?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: hosts.into_iter().map(host).collect(),
        }))
    }

    async fn get_host(&self, req: Request<pb::HostRef>) -> R<pb::Host> {
        let name = req.get_ref().name.clone();
        let h = self.admin(&req, move |c, _| c.get_host(&name)).await?;
        Ok(Response::new(host(h)))
    }

    async fn revoke_host(&self, req: Request<pb::HostRef>) -> R<pb::Host> {
        let name = req.get_ref().name.clone();
        let h = self
            .admin(&req, move |c, who| c.revoke_host(&who, &name))
            .await?;
        Ok(Response::new(host(h)))
    }

    async fn set_host_migration(&self, req: Request<pb::SetHostMigrationRequest>) -> R<pb::Host> {
        let r = req.get_ref().clone();
        let h = self
            .admin(&req, move |c, who| {
                c.set_host_migration(&who, &r.name, &r.libvirt_uri, &r.migration_uri)
            })
            .await?;
        Ok(Response::new(host(h)))
    }

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> R<pb::Volume> {
        let r = req.get_ref().clone();
        let v = self
            .admin(&req, move |c, who| {
                let format = VolumeFormat::parse_or_default(&r.format)?;
                let release = release_policy(&r.release)?;
                c.create_volume_with(
                    &who,
                    &r.host,
                    &r.pool,
                    &r.name,
                    r.capacity_bytes,
                    format,
                    release,
                    r.split,
                )
            })
            .await?;
        Ok(Response::new(volume(v)))
    }

    async fn set_release_policy(&self, req: Request<pb::SetReleasePolicyRequest>) -> R<pb::Volume> {
        let r = req.get_ref().clone();
        let v = self
            .admin(&req, move |c, who| {
                let release: ReleasePolicy = r.release.parse()?;
                c.set_release_policy(&who, &r.name_or_id, release)
            })
            .await?;
        Ok(Response::new(volume(v)))
    }

    async fn allow_pcrs(&self, req: Request<pb::AllowPcrsRequest>) -> R<pb::Allowlist> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let r = req.into_inner();
        let a = if r.learn {
            if !r.pcrs.is_empty() {
                return Err(Status::invalid_argument(
                    "give either PCR values (--pcr N=HEX) or --learn, not both",
                ));
            }
            let pcrs = r
                .learn_pcrs
                .iter()
                .map(|p| u8::try_from(*p).unwrap_or(u8::MAX))
                .collect::<Vec<u8>>();
            let into = scope_of(&r.host, &r.group);
            self.0
                .learn_pcrs(&who, &r.host, (into.0, &into.1), &pcrs, r.replace)
                .await
                .map_err(status)?
        } else {
            let values = r
                .pcrs
                .iter()
                .map(|p| allowed_pcr(p.pcr, &p.sha256))
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?;
            let core = self.0.clone();
            let (scope, target) = scope_of(&r.host, &r.group);
            tokio::task::spawn_blocking(move || {
                core.allow_pcrs(&who, scope, &target, &values, r.replace)
            })
            .await
            .map_err(|e| Status::internal(format!("a blocking task failed: {e}")))?
            .map_err(status)?
        };
        Ok(Response::new(allowlist(a)))
    }

    async fn list_pending(
        &self,
        req: Request<pb::ListPendingRequest>,
    ) -> R<pb::ListPendingResponse> {
        let all = req.get_ref().all;
        let requests = self
            .admin(&req, move |c, _| {
                let rs = c.release_requests(all)?;
                rs.into_iter()
                    .map(|r| {
                        let a = c.attestation_summary(&r.host)?;
                        Ok(pending(r, a))
                    })
                    .collect::<Result<Vec<_>, CoreError>>()
            })
            .await?;
        Ok(Response::new(pb::ListPendingResponse { requests }))
    }

    async fn decide_pending(
        &self,
        req: Request<pb::DecidePendingRequest>,
    ) -> R<pb::PendingRequest> {
        let r = req.get_ref().clone();
        let p = self
            .admin(&req, move |c, who| {
                let d = c.decide_request(&who, &r.id, r.approve, &r.note)?;
                let a = c.attestation_summary(&d.host)?;
                Ok(pending(d, a))
            })
            .await?;
        Ok(Response::new(p))
    }

    async fn request_escrow(&self, req: Request<pb::RequestEscrowRequest>) -> R<pb::EscrowEntry> {
        let r = req.get_ref().clone();
        let e = self
            .admin(&req, move |c, who| {
                c.request_escrow(&who, &r.volume, &r.recipients, &r.reason)
            })
            .await?;
        Ok(Response::new(escrow(e)))
    }

    async fn decide_escrow(&self, req: Request<pb::DecideEscrowRequest>) -> R<pb::EscrowEntry> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let r = req.into_inner();
        let e = self
            .0
            .decide_escrow(who, r.id, r.approve, r.note)
            .await
            .map_err(status)?;
        Ok(Response::new(escrow(e)))
    }

    async fn list_escrow(&self, req: Request<pb::ListEscrowRequest>) -> R<pb::ListEscrowResponse> {
        let r = req.get_ref().clone();
        let entries = self
            .admin(&req, move |c, _| {
                let volume = (!r.volume.is_empty()).then_some(r.volume.as_str());
                c.list_escrow(volume, r.all)
            })
            .await?;
        Ok(Response::new(pb::ListEscrowResponse {
            entries: entries.into_iter().map(escrow).collect(),
        }))
    }

    async fn get_escrow_packet(&self, req: Request<pb::EscrowRef>) -> R<pb::EscrowPacket> {
        let id = req.get_ref().id.clone();
        let (e, packet) = self
            .admin(&req, move |c, who| c.get_escrow_packet(&who, &id))
            .await?;
        Ok(Response::new(pb::EscrowPacket { id: e.id, packet }))
    }

    async fn get_allowlist(&self, req: Request<pb::AllowlistRef>) -> R<pb::Allowlist> {
        let r = req.get_ref().clone();
        let a = self
            .admin(&req, move |c, _| {
                let (scope, target) = scope_of(&r.host, &r.group);
                c.allowlist(scope, &target)
            })
            .await?;
        Ok(Response::new(allowlist(a)))
    }

    async fn set_host_group(&self, req: Request<pb::SetHostGroupRequest>) -> R<pb::Host> {
        let r = req.get_ref().clone();
        let h = self
            .admin(&req, move |c, who| {
                c.set_host_group(&who, &r.name, &r.group)
            })
            .await?;
        Ok(Response::new(host(h)))
    }

    async fn attest_host(&self, req: Request<pb::HostRef>) -> R<pb::Host> {
        let name = req.get_ref().name.clone();
        let n = name.clone();
        let h = self.admin(&req, move |c, _| c.enrolled_host(&n)).await?;
        // The outcome is recorded either way; the host shows it.
        let attested = self.0.attest(&h).await;
        let n = name.clone();
        let info = self.admin(&req, move |c, _| c.get_host(&n)).await?;
        attested.map_err(status)?;
        Ok(Response::new(host(info)))
    }

    async fn encrypt_volume(&self, req: Request<pb::EncryptVolumeRequest>) -> R<pb::Volume> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let r = req.into_inner();
        let format = VolumeFormat::parse_or_default(&r.format).map_err(invalid)?;
        let v = self
            .0
            .encrypt_volume(who, r.host, r.pool, r.name, format)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn decrypt_volume(&self, req: Request<pb::DecryptVolumeRequest>) -> R<pb::Volume> {
        let r = req.get_ref().clone();
        let v = self
            .admin(&req, move |c, who| {
                c.decrypt_volume(&who, &r.name_or_id, r.confirm)
            })
            .await?;
        Ok(Response::new(volume(v)))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> R<pb::ListVolumesResponse> {
        let host = req.get_ref().host.clone();
        let vols = self
            .admin(&req, move |c, _| {
                c.list_volumes((!host.is_empty()).then_some(host.as_str()))
            })
            .await?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: vols.into_iter().map(volume).collect(),
        }))
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> R<pb::Volume> {
        let name = req.get_ref().name_or_id.clone();
        let v = self.admin(&req, move |c, _| c.get_volume(&name)).await?;
        Ok(Response::new(volume(v)))
    }

    async fn delete_volume(&self, req: Request<pb::VolumeRef>) -> R<pb::Volume> {
        let name = req.get_ref().name_or_id.clone();
        let v = self
            .admin(&req, move |c, who| c.delete_volume(&who, &name))
            .await?;
        Ok(Response::new(volume(v)))
    }

    async fn rekey_volume(&self, req: Request<pb::RekeyVolumeRequest>) -> R<pb::Volume> {
        let r = req.get_ref().clone();
        let v = self
            .admin(&req, move |c, who| {
                let kind = if r.deep {
                    RekeyKind::Deep
                } else {
                    RekeyKind::Shallow
                };
                let placement: RekeyPlacement = r.placement.parse()?;
                c.request_rekey(
                    &who,
                    &r.name_or_id,
                    kind,
                    placement,
                    r.bandwidth_bytes_per_sec,
                )
            })
            .await?;
        Ok(Response::new(volume(v)))
    }

    async fn set_policy(&self, req: Request<pb::Policy>) -> R<pb::Policy> {
        let r = req.get_ref().clone();
        let p = self
            .admin(&req, move |c, who| c.set_policy(&who, &policy_from(r)?))
            .await?;
        Ok(Response::new(policy(p)))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> R<pb::ListPoliciesResponse> {
        let ps = self.admin(&req, |c, _| c.list_policies()).await?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: ps.into_iter().map(policy).collect(),
        }))
    }

    async fn remove_policy(&self, req: Request<pb::Policy>) -> R<pb::Policy> {
        let r = req.get_ref().clone();
        let p = self
            .admin(&req, move |c, who| {
                let scope: PolicyScope = r.scope.parse()?;
                c.remove_policy(&who, scope, &r.target)
            })
            .await?;
        Ok(Response::new(policy(p)))
    }

    async fn manage_pool(&self, req: Request<pb::PoolRef>) -> R<pb::ManagedPool> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let r = req.into_inner();
        let m = self
            .0
            .manage_pool(who, r.host, r.pool)
            .await
            .map_err(status)?;
        Ok(Response::new(managed_pool(m)))
    }

    async fn unmanage_pool(&self, req: Request<pb::PoolRef>) -> R<pb::ManagedPool> {
        let r = req.get_ref().clone();
        let m = self
            .admin(&req, move |c, who| c.unmanage_pool(&who, &r.host, &r.pool))
            .await?;
        Ok(Response::new(managed_pool(m)))
    }

    async fn list_managed_pools(
        &self,
        req: Request<pb::ListManagedPoolsRequest>,
    ) -> R<pb::ListManagedPoolsResponse> {
        let host = req.get_ref().host.clone();
        let pools = self
            .admin(&req, move |c, _| {
                c.list_managed_pools((!host.is_empty()).then_some(host.as_str()))
            })
            .await?;
        Ok(Response::new(pb::ListManagedPoolsResponse {
            pools: pools.into_iter().map(managed_pool).collect(),
        }))
    }

    async fn describe_pool(&self, req: Request<pb::PoolRef>) -> R<pb::PoolView> {
        self.admin(&req, |_, _| Ok(())).await?;
        let r = req.into_inner();
        let v = self.0.describe_pool(r.host, r.pool).await.map_err(status)?;
        Ok(Response::new(pool_view(v)))
    }

    async fn set_console_user(
        &self,
        req: Request<pb::SetConsoleUserRequest>,
    ) -> R<pb::ConsoleUser> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let mut r = req.into_inner();
        // The password moves out of the request, to be wiped after hashing.
        let password = zeroize::Zeroizing::new(std::mem::take(&mut r.password));
        let name = r.name;
        let u = self
            .0
            .blocking(move |c| {
                c.set_console_user(&who, &name, &password)?;
                console_user(c, &name)
            })
            .await
            .map_err(status)?;
        Ok(Response::new(u))
    }

    async fn remove_console_user(&self, req: Request<pb::ConsoleUserRef>) -> R<pb::ConsoleUser> {
        let name = req.get_ref().name.clone();
        let u = self
            .admin(&req, move |c, who| {
                let u = console_user(c, &name)?;
                c.remove_console_user(&who, &name)?;
                Ok(u)
            })
            .await?;
        Ok(Response::new(u))
    }

    async fn list_console_users(
        &self,
        req: Request<pb::ListConsoleUsersRequest>,
    ) -> R<pb::ListConsoleUsersResponse> {
        let users = self.admin(&req, |c, _| c.console_users()).await?;
        Ok(Response::new(pb::ListConsoleUsersResponse {
            users: users
                .into_iter()
                .map(|(name, created_unix, by)| pb::ConsoleUser {
                    name,
                    created_unix,
                    by,
                })
                .collect(),
        }))
    }

    async fn define_guest(&self, req: Request<pb::DefineGuestRequest>) -> R<pb::Guest> {
        let r = req.get_ref().clone();
        let g = self
            .admin(&req, move |c, who| {
                c.define_guest(&who, &r.host, &r.domain_xml)
            })
            .await?;
        Ok(Response::new(guest(g)))
    }

    async fn adopt_guest(&self, req: Request<pb::AdoptGuestRequest>) -> R<pb::Adoption> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let r = req.into_inner();
        let a = self
            .0
            .adopt_guest(who, r.host, r.domain, r.skip)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::Adoption {
            guest: Some(guest(a.guest)),
            encrypted: a.encrypted,
            already_managed: a.already_managed,
            left: a
                .left
                .into_iter()
                .map(|(target, reason)| pb::LeftDisk { target, reason })
                .collect(),
        }))
    }

    async fn list_guests(&self, req: Request<pb::ListGuestsRequest>) -> R<pb::ListGuestsResponse> {
        let host = req.get_ref().host.clone();
        let guests = self
            .admin(&req, move |c, _| {
                c.list_guests((!host.is_empty()).then_some(host.as_str()))
            })
            .await?;
        Ok(Response::new(pb::ListGuestsResponse {
            guests: guests.into_iter().map(guest).collect(),
        }))
    }

    async fn get_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        let name = req.get_ref().name_or_uuid.clone();
        let g = self.admin(&req, move |c, _| c.get_guest(&name)).await?;
        Ok(Response::new(guest(g)))
    }

    async fn undefine_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        self.guest_action(req, GuestOp::Undefine).await
    }

    async fn start_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        self.guest_action(req, GuestOp::Start).await
    }

    async fn stop_guest(&self, req: Request<pb::GuestRef>) -> R<pb::Guest> {
        self.guest_action(req, GuestOp::Stop).await
    }

    async fn migrate_guest(&self, req: Request<pb::MigrateGuestRequest>) -> R<pb::Guest> {
        let who = self.admin(&req, |_, who| Ok(who)).await?;
        let r = req.into_inner();
        let g = self
            .0
            .migrate_guest(who, r.name_or_uuid, r.to_host, r.live, r.r#unsafe)
            .await
            .map_err(status)?;
        Ok(Response::new(guest(g)))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        let r = *req.get_ref();
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(10_000)
        };
        let records = self
            .admin(&req, move |c, _| c.list_audit(r.after_seq, limit))
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: records.into_iter().map(audit_record).collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> R<pb::VerifyAuditResponse> {
        let v = self.admin(&req, |c, _| c.verify_audit(None)).await?;
        Ok(Response::new(verification(v)))
    }

    async fn get_server_status(
        &self,
        req: Request<pb::GetServerStatusRequest>,
    ) -> R<pb::ServerStatus> {
        let (database, (lease, replicas, now_ms)) = self
            .admin(&req, |c, _| Ok((c.database_shown(), c.replicas()?)))
            .await?;
        Ok(Response::new(pb::ServerStatus {
            database,
            now_unix_ms: now_ms,
            lease: lease.map(|l| pb::LeaderLease {
                replica: l.holder,
                fence: l.fence,
                since_unix_ms: l.since_ms,
                until_unix_ms: l.expires_ms,
            }),
            replicas: replicas
                .into_iter()
                .map(|r| pb::ServerReplica {
                    id: r.id,
                    address: r.address,
                    url: r.url,
                    host: r.host,
                    pid: r.pid,
                    version: r.version,
                    started_unix_ms: r.started_ms,
                    seen_unix_ms: r.seen_ms,
                })
                .collect(),
        }))
    }

    async fn get_audit_head(&self, req: Request<pb::GetAuditHeadRequest>) -> R<pb::AuditHead> {
        let h = self.admin(&req, |c, _| c.audit_head()).await?;
        Ok(Response::new(pb::AuditHead {
            signed: h.to_string(),
            seq: h.seq,
            hash: h.hash,
            time_unix_ms: h.time_ms,
        }))
    }

    async fn verify_audit_head(
        &self,
        req: Request<pb::VerifyAuditHeadRequest>,
    ) -> R<pb::VerifyAuditResponse> {
        let kept = req.get_ref().kept_head.clone();
        let v = self
            .admin(&req, move |c, _| c.verify_audit(Some(&kept)))
            .await?;
        Ok(Response::new(verification(v)))
    }

    async fn retry_volume(&self, req: Request<pb::VolumeRef>) -> R<pb::Volume> {
        let name = req.get_ref().name_or_id.clone();
        let v = self
            .admin(&req, move |c, who| c.retry_volume(&who, &name))
            .await?;
        Ok(Response::new(volume(v)))
    }

    async fn get_ca_certificate(
        &self,
        req: Request<pb::GetCaCertificateRequest>,
    ) -> R<pb::CaCertificate> {
        let pem = self
            .admin(&req, |c, _| Ok(c.server_ca_pem().to_owned()))
            .await?;
        Ok(Response::new(pb::CaCertificate { pem }))
    }
}
