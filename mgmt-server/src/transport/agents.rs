//! The [`AgentClient`] over gRPC: the server is a client of each host's
//! host-agent API. It presents its own certificate and accepts only the
//! certificate the host enrolled with: signed by the hosts CA, for the
//! host's address, and equal to the hash recorded at enrollment (pinned,
//! through [`guestkey_pinned_tls::Connector`]). A process serving another
//! host's or a revoked host's key pair at the address is refused before
//! anything is sent, like an unreachable host.
//!
//! One channel per host is kept open for ordinary calls (HTTP/2 multiplexes
//! concurrent pushes over it; each call may take a minute) and dropped
//! after any failure, so the next call reconnects. Calls that may take
//! hours (a migration, the admin's `volume encrypt`) get a fresh channel
//! with a longer limit.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guestkey_proto::agent::{self, host_agent_client::HostAgentClient};
use tonic::transport::{Channel, Endpoint};

use guestkey_protect::tpm::PcrValue;

use crate::domain::agent::{
    AgentClient, AgentError, AgentErrorKind, AgentResult, AttestChallenge, BoxFuture, CreateVolume,
    DecryptVolume, DefineGuest, DeleteVolume, DiskPlace, DomainDescription, EscrowPacketCall,
    EscrowPacketMade, GuestCall, HeldKeyInfo, ImagePlace, Inventory, MigrateGuest, PoolDescription,
    PoolImage, PoolVolume, PrepareMigration, QuoteAnswer, Rekey, VolumeOnHost, VolumeUser,
};
use crate::model::{EnrolledHost, GuestState};
use crate::transport::pb::{agent_error, format, rekey_kind, sealed_key};
use crate::transport::tls::ServerIdentity;

/// How long one ordinary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a migration or an encryption the admin waits for may take
/// before the server gives up waiting (the host goes on; a repeat picks it up).
const LONG_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a host that dropped the first call is watched for an alert.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// The gRPC host-agent client, one channel per host.
pub struct GrpcAgents {
    identity: Arc<ServerIdentity>,
    /// Open channels by (host name, address, certificate hash).
    channels: Mutex<HashMap<(String, String, String), Channel>>,
}

impl GrpcAgents {
    /// A client presenting `identity`.
    pub fn new(identity: Arc<ServerIdentity>) -> Self {
        Self {
            identity,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn key(host: &EnrolledHost) -> (String, String, String) {
        (
            host.name.clone(),
            host.address.clone(),
            host.cert_sha256.clone(),
        )
    }

    async fn connect_with(&self, host: &EnrolledHost, timeout: Duration) -> AgentResult<Channel> {
        // Not reached, or not the host: either way nothing goes there, and
        // the operation is retried like for an unreachable host.
        let unreachable = |why: String| AgentError::new(AgentErrorKind::Unreachable, why);
        let connector = self
            .identity
            .host_connector(host)
            .map_err(|e| unreachable(format!("TLS setup for host {}: {e}", host.name)))?;
        let uri = guestkey_pinned_tls::endpoint_uri(&host.address)
            .ok_or_else(|| unreachable(format!("bad address of host {}", host.name)))?;
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| unreachable(format!("bad address of host {}: {e}", host.name)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout);
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                use guestkey_pinned_tls::ConnectError as C;
                match guestkey_pinned_tls::find_connect_error(&e) {
                    Some(c @ (C::NotPinned { .. } | C::NotSigned { .. } | C::Refused { .. })) => {
                        unreachable(format!("host {} refused: {c}", host.name))
                    }
                    _ => unreachable(format!(
                        "host {} at {} is unreachable: {}",
                        host.name,
                        host.address,
                        crate::tls::error_chain(&e)
                    )),
                }
            })
    }

    /// A new channel, once the host showed that it accepts this server's
    /// certificate (TLS 1.3 lets a client finish its handshake before the
    /// server checked the client's certificate, so only an answer proves
    /// it): `Ping`, before anything else is sent on it.
    async fn connect_checked(
        &self,
        host: &EnrolledHost,
        timeout: Duration,
    ) -> AgentResult<Channel> {
        let c = self.connect_with(host, timeout).await?;
        let refused = |why: String| {
            AgentError::new(
                AgentErrorKind::Unreachable,
                format!(
                    "host {} at {} does not accept this server ({why}): if it was enrolled before `guestkey-server migrate-roles`, run `guestkeyd trust-server --ca-file SERVER-CA.pem` on it (SERVER-CA.pem from `guestkeyctl ca-cert`); nothing is sent to it until then",
                    host.name, host.address
                ),
            )
        };
        match HostAgentClient::new(c.clone())
            .ping(agent::PingRequest {})
            .await
        {
            Ok(_) => Ok(c),
            // An older guestkeyd without Ping: it answered, so the TLS
            // handshake, our certificate included, went through.
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(c),
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                Err(refused(s.message().to_owned()))
            }
            // Not an answer: nothing was sent, whatever the cause.
            Err(s) => {
                let detail = crate::tls::error_chain(&s);
                if detail.contains("alert") {
                    return Err(refused(format!(
                        "it refused this server's certificate: {detail}"
                    )));
                }
                // HTTP/2 often reports a refusal as a reset or closed
                // connection: ask the host again without sending anything.
                if let Some(alert) = self.refusal(host).await {
                    Err(refused(format!(
                        "it refused this server's certificate: received fatal alert {alert}"
                    )))
                } else {
                    Err(AgentError::new(
                        AgentErrorKind::Unreachable,
                        format!(
                            "host {} at {} is unreachable: {detail}",
                            host.name, host.address
                        ),
                    ))
                }
            }
        }
    }

    /// The alert with which `host` refuses this server's certificate, if it
    /// does (`guestkey_pinned_tls::Connector::probe`).
    async fn refusal(&self, host: &EnrolledHost) -> Option<String> {
        let connector = self.identity.host_connector(host).ok()?;
        let uri: tonic::codegen::http::Uri = guestkey_pinned_tls::endpoint_uri(&host.address)?
            .parse()
            .ok()?;
        let name = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        match connector
            .probe(name, uri.port_u16()?, PROBE_WAIT)
            .await
            .ok()?
        {
            guestkey_pinned_tls::Probe::Refused(alert) => Some(alert),
            _ => None,
        }
    }

    /// The host's channel: the open one, or a new one (fresh and with the
    /// long limit for `long` calls).
    async fn channel(&self, host: &EnrolledHost, long: bool) -> AgentResult<Channel> {
        if long {
            return self.connect_checked(host, LONG_TIMEOUT).await;
        }
        let open = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&Self::key(host))
            .cloned();
        if let Some(c) = open {
            return Ok(c);
        }
        let c = self.connect_checked(host, CALL_TIMEOUT).await?;
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::key(host), c.clone());
        Ok(c)
    }

    fn forget(&self, host: &EnrolledHost) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::key(host));
    }

    /// Runs one call on the host's channel; a failure drops the channel.
    async fn call<T, F, Fut>(&self, host: &EnrolledHost, long: bool, f: F) -> AgentResult<T>
    where
        F: FnOnce(HostAgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let channel = match self.channel(host, long).await {
            Ok(c) => c,
            Err(e) => {
                self.forget(host);
                return Err(e);
            }
        };
        match f(HostAgentClient::new(channel)).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                self.forget(host);
                Err(agent_error(host, &s))
            }
        }
    }
}

fn guest_request(r: GuestCall) -> agent::GuestRequest {
    agent::GuestRequest {
        op_id: r.op_id,
        guest_uuid: r.guest_uuid,
    }
}

fn state(r: agent::GuestResult) -> Option<GuestState> {
    let s = GuestState::from_host(&r.state);
    if s == Some(GuestState::NoState) && r.state != "no state" {
        tracing::warn!(state = %r.state, guest = %r.guest_uuid, "a host reported a guest state this server does not know");
    }
    s
}

fn domain_description(r: agent::DomainDescription) -> DomainDescription {
    DomainDescription {
        uuid: r.guest_uuid,
        state: r.state,
        xml: r.domain_xml,
        security_info_withheld: r.security_info_withheld,
        disks: r
            .disks
            .into_iter()
            .map(|d| {
                let place = match agent::DiskLookup::try_from(d.lookup) {
                    Ok(agent::DiskLookup::InPool) => ImagePlace::InPool {
                        pool: d.pool,
                        volume: d.volume,
                    },
                    Ok(agent::DiskLookup::NotInPool) => ImagePlace::NotInPool,
                    Ok(agent::DiskLookup::OtherFormat) => ImagePlace::OtherFormat,
                    // A lookup this server does not know: nothing to
                    // encrypt there.
                    _ => ImagePlace::Missing,
                };
                DiskPlace {
                    target: d.target,
                    path: d.path,
                    place,
                    encrypted: d.encrypted,
                    backing: d.backing,
                }
            })
            .collect(),
    }
}

fn pool_description(r: agent::PoolDescription) -> PoolDescription {
    PoolDescription {
        kind: r.kind,
        path: r.path,
        volumes: r
            .volumes
            .into_iter()
            .map(|v| PoolVolume {
                image: if v.inspected {
                    Some(Ok(PoolImage {
                        encrypted: v.encrypted,
                        backing: v.backing,
                        capacity_bytes: v.capacity_bytes,
                    }))
                } else if !v.unreadable.is_empty() {
                    Some(Err(v.unreadable))
                } else {
                    None
                },
                name: v.name,
                path: v.path,
                format: v.format,
                used_by: v
                    .used_by
                    .into_iter()
                    .map(|u| VolumeUser {
                        domain: u.domain,
                        running: u.running,
                    })
                    .collect(),
                base_of: v.base_of,
            })
            .collect(),
        unreadable_domains: r.unreadable_domains,
    }
}

impl AgentClient for GrpcAgents {
    fn connect<'a>(&'a self, host: &'a EnrolledHost) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move {
            self.channel(host, false)
                .await
                .map(drop)
                .inspect_err(|_| self.forget(host))
        })
    }

    fn create_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: CreateVolume,
    ) -> BoxFuture<'a, AgentResult<VolumeOnHost>> {
        Box::pin(async move {
            let long = r.wait_long;
            let req = agent::CreateVolumeRequest {
                op_id: r.op_id,
                volume_id: r.volume_id,
                pool: r.pool,
                name: r.name,
                capacity_bytes: r.capacity_bytes,
                format: format(r.format),
                secret_uuid: r.secret_uuid,
                key: Some(sealed_key(r.key)),
                encrypt_existing: r.encrypt_existing,
            };
            let v = self
                .call(
                    host,
                    long,
                    |mut c| async move { c.create_volume(req).await },
                )
                .await?;
            Ok(VolumeOnHost {
                path: v.path,
                capacity_bytes: v.capacity_bytes,
            })
        })
    }

    fn decrypt_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: DecryptVolume,
    ) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move {
            let req = agent::DecryptVolumeRequest {
                op_id: r.op_id,
                volume_id: r.volume_id,
                key: Some(sealed_key(r.key)),
            };
            self.call(
                host,
                false,
                |mut c| async move { c.decrypt_volume(req).await },
            )
            .await
            .map(drop)
        })
    }

    fn delete_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: DeleteVolume,
    ) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move {
            let req = agent::DeleteVolumeRequest {
                op_id: r.op_id,
                volume_id: r.volume_id,
                pool: r.pool,
                name: r.name,
            };
            self.call(
                host,
                false,
                |mut c| async move { c.delete_volume(req).await },
            )
            .await
            .map(drop)
        })
    }

    fn rekey<'a>(&'a self, host: &'a EnrolledHost, r: Rekey) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move {
            let req = agent::RekeyRequest {
                op_id: r.op_id,
                volume_id: r.volume_id,
                from_generation: r.from_generation,
                kind: rekey_kind(r.kind),
                new_key: Some(sealed_key(r.new_key)),
                new_secret_uuid: r.new_secret_uuid,
                old_key: Some(sealed_key(r.old_key)),
                placement: r.placement.as_str().to_owned(),
                bandwidth_bytes_per_sec: r.bandwidth,
            };
            self.call(host, false, |mut c| async move { c.rekey(req).await })
                .await
                .map(drop)
        })
    }

    fn define_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: DefineGuest,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        Box::pin(async move {
            let req = agent::DefineGuestRequest {
                op_id: r.op_id,
                domain_xml: r.domain_xml,
                keys: r.keys.into_iter().map(sealed_key).collect(),
            };
            self.call(
                host,
                false,
                |mut c| async move { c.define_guest(req).await },
            )
            .await
            .map(state)
        })
    }

    fn undefine_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        let req = guest_request(r);
        Box::pin(async move {
            self.call(
                host,
                false,
                |mut c| async move { c.undefine_guest(req).await },
            )
            .await
            .map(state)
        })
    }

    fn start_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        let req = guest_request(r);
        Box::pin(async move {
            self.call(host, false, |mut c| async move { c.start_guest(req).await })
                .await
                .map(state)
        })
    }

    fn stop_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        let req = guest_request(r);
        Box::pin(async move {
            self.call(host, false, |mut c| async move { c.stop_guest(req).await })
                .await
                .map(state)
        })
    }

    fn prepare_migration<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: PrepareMigration,
    ) -> BoxFuture<'a, AgentResult<()>> {
        Box::pin(async move {
            let req = agent::PrepareMigrationRequest {
                op_id: r.op_id,
                domain_xml: r.domain_xml,
                keys: r.keys.into_iter().map(sealed_key).collect(),
                volumes: r
                    .volumes
                    .into_iter()
                    .map(|v| agent::MigratingVolume {
                        volume_id: v.volume_id,
                        pool: v.pool,
                        name: v.name,
                        path: v.path,
                        secret_uuid: v.secret_uuid,
                    })
                    .collect(),
            };
            self.call(host, false, |mut c| async move {
                c.prepare_migration(req).await
            })
            .await
            .map(drop)
        })
    }

    fn abort_migration<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        let req = guest_request(r);
        Box::pin(async move {
            self.call(
                host,
                false,
                |mut c| async move { c.abort_migration(req).await },
            )
            .await
            .map(state)
        })
    }

    fn migrate_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: MigrateGuest,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        Box::pin(async move {
            let req = agent::MigrateGuestRequest {
                op_id: r.op_id,
                guest_uuid: r.guest_uuid,
                destination_libvirt_uri: r.destination_libvirt_uri,
                migration_uri: r.migration_uri,
                live: r.live,
                r#unsafe: r.unsafe_,
            };
            self.call(
                host,
                true,
                |mut c| async move { c.migrate_guest(req).await },
            )
            .await
            .map(state)
        })
    }

    fn describe_domain<'a>(
        &'a self,
        host: &'a EnrolledHost,
        name_or_uuid: &'a str,
    ) -> BoxFuture<'a, AgentResult<DomainDescription>> {
        Box::pin(async move {
            let domain = name_or_uuid.to_owned();
            let r = self
                .call(host, false, |mut c| async move {
                    c.describe_domain(agent::DescribeDomainRequest { domain })
                        .await
                })
                .await?;
            Ok(domain_description(r))
        })
    }

    fn describe_pool<'a>(
        &'a self,
        host: &'a EnrolledHost,
        pool: &'a str,
    ) -> BoxFuture<'a, AgentResult<PoolDescription>> {
        Box::pin(async move {
            let pool = pool.to_owned();
            let r = self
                .call(host, false, |mut c| async move {
                    c.describe_pool(agent::DescribePoolRequest { pool }).await
                })
                .await?;
            Ok(pool_description(r))
        })
    }

    fn inventory<'a>(&'a self, host: &'a EnrolledHost) -> BoxFuture<'a, AgentResult<Inventory>> {
        Box::pin(async move {
            let r = self
                .call(host, false, |mut c| async move {
                    c.get_inventory(agent::InventoryRequest {}).await
                })
                .await?;
            Ok(Inventory {
                held: r
                    .held
                    .into_iter()
                    .map(|k| HeldKeyInfo {
                        volume_id: k.volume_id,
                        generation: k.generation,
                        guest_uuid: k.guest_uuid,
                    })
                    .collect(),
                host_uuid: r.host_uuid,
            })
        })
    }

    fn make_escrow_packet<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: EscrowPacketCall,
    ) -> BoxFuture<'a, AgentResult<EscrowPacketMade>> {
        Box::pin(async move {
            let req = agent::EscrowPacketRequest {
                volume_id: r.volume_id,
                key: Some(sealed_key(r.key)),
                recipients: r.recipients,
                packet_id: r.packet_id,
                host_name: r.host_name,
                volume_name: r.volume_name,
                requested_by: r.requested_by,
                approved_by: r.approved_by,
            };
            // A guestkeyd from before escrow packets: say what to do.
            let r = self
                .call(host, false, |mut c| async move {
                    c.make_escrow_packet(req).await.map_err(|s| {
                        if s.code() == tonic::Code::Unimplemented {
                            tonic::Status::failed_precondition(format!(
                                "its guestkeyd makes no escrow packets ({}): upgrade guestkeyd on it",
                                s.message()
                            ))
                        } else {
                            s
                        }
                    })
                })
                .await?;
            if r.packet.is_empty() {
                return Err(AgentError::new(
                    AgentErrorKind::Failed,
                    format!("host {} answered with an empty escrow packet", host.name),
                ));
            }
            Ok(EscrowPacketMade {
                packet: r.packet,
                luks_uuid: r.luks_uuid,
            })
        })
    }

    fn attest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: AttestChallenge,
    ) -> BoxFuture<'a, AgentResult<QuoteAnswer>> {
        Box::pin(async move {
            let r = self
                .call(host, false, |mut c| async move {
                    c.attest(agent::AttestRequest {
                        nonce: req.nonce,
                        pcrs: req.pcrs.into_iter().map(u32::from).collect(),
                    })
                    .await
                })
                .await?;
            let mut values = Vec::with_capacity(r.values.len());
            for v in r.values {
                let pcr = u8::try_from(v.pcr).ok().filter(|p| *p < 24);
                let value: Option<[u8; 32]> = v.sha256.as_slice().try_into().ok();
                match (pcr, value) {
                    (Some(p), Some(b)) => values.push((p, PcrValue(b))),
                    _ => {
                        return Err(AgentError::new(
                            AgentErrorKind::Failed,
                            format!(
                                "host {} answered the attestation challenge with PCR {} of {} bytes: not a SHA-256 PCR value",
                                host.name,
                                v.pcr,
                                v.sha256.len()
                            ),
                        ));
                    }
                }
            }
            Ok(QuoteAnswer {
                quote: r.quote,
                signature: r.signature,
                values,
            })
        })
    }
}
