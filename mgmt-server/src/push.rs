//! The pusher: delivers pending volume and guest operations to host
//! daemons over mutual TLS, retrying unreachable hosts with exponential
//! backoff.
//!
//! The server is a client of each host's host-agent API. It presents its
//! own certificate and accepts only a host certificate signed by its CA for
//! the host's address. Operation ids make a repeated push harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use guestkey_proto::agent::{self, host_agent_client::HostAgentClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::core::{Core, EnrolledHost};
use crate::guests::{GuestInfo, GuestOp};
use crate::volumes::{PushError, PushOp, VolumeInfo};

/// How long one push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How often the rotation scheduler looks for keys past their policy's age.
const POLICY_ROUND: Duration = Duration::from_secs(1);
/// How often unfinished migrations (left by a stopped server) are resumed.
const MIGRATION_ROUND: Duration = Duration::from_secs(5);
/// Volume operations released and pushed together.
const BATCH: u32 = 256;

/// Open channels, one per host.
type Channels = HashMap<String, Channel>;

/// Runs until `shutdown` fires.
pub async fn run(core: Arc<Core>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut channels = Channels::new();
    let mut last_policy_round = std::time::Instant::now() - POLICY_ROUND;
    let mut last_migration_round = std::time::Instant::now() - MIGRATION_ROUND;
    loop {
        if last_migration_round.elapsed() >= MIGRATION_ROUND {
            last_migration_round = std::time::Instant::now();
            match crate::migrate::unfinished(&core) {
                Ok(left) => {
                    for (guest, to) in left {
                        tracing::info!(%guest, %to, "resuming an unfinished migration");
                        let c = core.clone();
                        tokio::spawn(async move {
                            let r = crate::migrate::migrate_guest(
                                c,
                                crate::core::Caller::Scheduler,
                                guest.clone(),
                                to,
                                false,
                                false,
                            )
                            .await;
                            if let Err(e) = r {
                                tracing::warn!(%guest, error = %e, "resumed migration not finished; will retry");
                            }
                        });
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read unfinished migrations"),
            }
        }
        if last_policy_round.elapsed() >= POLICY_ROUND {
            last_policy_round = std::time::Instant::now();
            match core.apply_policies() {
                Ok(v) if !v.is_empty() => {
                    tracing::info!(volumes = v.len(), "scheduled rekeys started")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "rotation policies not applied"),
            }
        }
        let busy = match push_volumes(&core, &mut channels).await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::error!(error = %e, "cannot process pending volume operations");
                false
            }
        };
        if *shutdown.borrow() {
            return;
        }
        match core.due_guests(64) {
            Ok(due) => {
                for g in due {
                    if *shutdown.borrow() {
                        return;
                    }
                    let recorded = match push_guest(&core, &mut channels, &g).await {
                        Ok(state) => core.guest_push_succeeded(&g, &state),
                        Err(e) => {
                            tracing::warn!(guest = %g.uuid, host = %g.host, error = %e, "push failed; will retry");
                            channels.remove(&g.host);
                            core.guest_push_failed(&g, &e)
                        }
                    };
                    if let Err(e) = recorded {
                        tracing::error!(guest = %g.uuid, error = %e, "cannot record push outcome");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read pending guest operations"),
        }
        if busy {
            // More may be due right away: no idle wait between full batches.
            continue;
        }
        tokio::select! {
            _ = core.push_wake.notified() => {}
            _ = tokio::time::sleep(IDLE_POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn client(
    core: &Core,
    channels: &mut Channels,
    host: &EnrolledHost,
) -> Result<HostAgentClient<Channel>, String> {
    let channel = match channels.get(&host.name) {
        Some(c) => c.clone(),
        None => {
            let c = connect(core, host).await?;
            channels.insert(host.name.clone(), c.clone());
            c
        }
    };
    Ok(HostAgentClient::new(channel))
}

fn sealed_key(volume_id: &str, generation: u64, sealed: Vec<u8>) -> agent::SealedKey {
    agent::SealedKey {
        volume_id: volume_id.to_owned(),
        generation,
        sealed_packet: sealed,
    }
}

/// Delivers due volume operations in batches: one transaction releases a
/// batch, the pushes run concurrently (HTTP/2 multiplexes them over one
/// connection per host), and one transaction records the outcomes.
async fn push_volumes(
    core: &Core,
    channels: &mut Channels,
) -> Result<usize, crate::core::CoreError> {
    let due = core.due_volumes(BATCH)?;
    if due.is_empty() {
        return Ok(0);
    }
    let prepared = core.prepare_pushes(&due)?;
    let mut outcomes: Vec<(VolumeInfo, crate::volumes::PushOutcome)> =
        Vec::with_capacity(due.len());
    let mut running = tokio::task::JoinSet::new();
    for (v, op) in due.into_iter().zip(prepared) {
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                outcomes.push((v, Err(PushError::retry(e))));
                continue;
            }
        };
        let host = match &op {
            PushOp::Create { host, .. }
            | PushOp::Decrypt { host, .. }
            | PushOp::Delete { host, .. }
            | PushOp::Rekey { host, .. } => host.clone(),
        };
        let c = match client(core, channels, &host).await {
            Ok(c) => c,
            Err(e) => {
                outcomes.push((v, Err(PushError::retry(e))));
                continue;
            }
        };
        running.spawn(async move {
            let r = send_volume_op(c, op).await.map_err(|s| PushError {
                message: describe_status(&host, &s),
                // The host cannot honour the request as it stands.
                refused: s.code() == tonic::Code::Aborted,
            });
            (v, r)
        });
    }
    while let Some(done) = running.join_next().await {
        match done {
            Ok(o) => outcomes.push(o),
            Err(e) => tracing::error!(error = %e, "a push task failed"),
        }
    }
    for (v, r) in &outcomes {
        if let Err(e) = r {
            tracing::warn!(volume = %v.id, host = %v.host, error = %e.message, refused = e.refused, "push failed");
            channels.remove(&v.host);
        }
    }
    core.record_pushes(&outcomes)?;
    Ok(outcomes.len())
}

/// Pushes one volume operation; returns the volume's path and size on the
/// host.
pub(crate) async fn send_volume_op(
    mut c: HostAgentClient<Channel>,
    op: PushOp,
) -> Result<(String, u64), tonic::Status> {
    let result = match op {
        PushOp::Create {
            volume,
            packet,
            host,
            encrypt_existing,
        } => {
            // Sealing (X25519) runs here, in parallel across pushes, after
            // the release was committed.
            let sealed =
                crate::volumes::seal_for(&packet, &host).map_err(tonic::Status::internal)?;
            drop(packet);
            let req = agent::CreateVolumeRequest {
                op_id: format!("{}:create:{}", volume.id, volume.key_generation),
                volume_id: volume.id.clone(),
                pool: volume.pool.clone(),
                name: volume.name.clone(),
                capacity_bytes: volume.capacity_bytes,
                format: match volume.format.as_str() {
                    "raw" => agent::VolumeFormat::Raw,
                    _ => agent::VolumeFormat::Qcow2,
                } as i32,
                secret_uuid: volume.secret_uuid.clone(),
                key: Some(sealed_key(&volume.id, volume.key_generation, sealed)),
                encrypt_existing,
            };
            c.create_volume(req).await
        }
        PushOp::Decrypt {
            volume,
            packet,
            host,
        } => {
            let sealed =
                crate::volumes::seal_for(&packet, &host).map_err(tonic::Status::internal)?;
            drop(packet);
            let req = agent::DecryptVolumeRequest {
                op_id: format!("{}:decrypt", volume.id),
                volume_id: volume.id.clone(),
                key: Some(sealed_key(&volume.id, volume.key_generation, sealed)),
            };
            c.decrypt_volume(req).await
        }
        PushOp::Rekey {
            volume,
            host,
            old,
            new,
            deep,
            placement,
            bandwidth,
        } => {
            let old_sealed =
                crate::volumes::seal_for(&old, &host).map_err(tonic::Status::internal)?;
            let new_sealed =
                crate::volumes::seal_for(&new, &host).map_err(tonic::Status::internal)?;
            drop((old, new));
            let req = agent::RekeyRequest {
                op_id: format!("{}:rekey:{}", volume.id, volume.key_generation + 1),
                volume_id: volume.id.clone(),
                from_generation: volume.key_generation,
                kind: if deep {
                    agent::RekeyKind::Deep
                } else {
                    agent::RekeyKind::Shallow
                } as i32,
                new_key: Some(sealed_key(
                    &volume.id,
                    volume.key_generation + 1,
                    new_sealed,
                )),
                new_secret_uuid: volume.secret_uuid.clone(),
                old_key: Some(sealed_key(&volume.id, volume.key_generation, old_sealed)),
                placement,
                bandwidth_bytes_per_sec: bandwidth,
            };
            return c.rekey(req).await.map(|_| (String::new(), 0));
        }
        PushOp::Delete { volume, .. } => {
            let req = agent::DeleteVolumeRequest {
                op_id: format!("{}:delete", volume.id),
                volume_id: volume.id.clone(),
                pool: volume.pool.clone(),
                name: volume.name.clone(),
            };
            c.delete_volume(req).await
        }
    };
    result.map(|r| {
        let r = r.into_inner();
        (r.path, r.capacity_bytes)
    })
}

/// Returns the guest's state on the host.
async fn push_guest(core: &Core, channels: &mut Channels, g: &GuestInfo) -> Result<String, String> {
    let op = core.prepare_guest_push(g).map_err(|e| e.to_string())?;
    let host = match &op {
        GuestOp::Define { host, .. } | GuestOp::Simple { host, .. } => host.clone(),
    };
    let mut c = client(core, channels, &host).await?;
    let result = match op {
        GuestOp::Define { guest, keys, .. } => {
            let req = agent::DefineGuestRequest {
                op_id: format!("{}:define", guest.uuid),
                domain_xml: guest.domain_xml.clone(),
                keys: keys
                    .into_iter()
                    .map(|k| sealed_key(&k.volume_id, k.generation, k.sealed))
                    .collect(),
            };
            c.define_guest(req).await
        }
        GuestOp::Simple { guest, .. } => {
            let req = agent::GuestRequest {
                op_id: format!("{}:{}:{}", guest.uuid, guest.pending, guest.attempts),
                guest_uuid: guest.uuid.clone(),
            };
            match guest.pending.as_str() {
                "undefine" => c.undefine_guest(req).await,
                "start" => c.start_guest(req).await,
                _ => c.stop_guest(req).await,
            }
        }
    };
    result
        .map(|r| r.into_inner().state)
        .map_err(|s| describe_status(&host, &s))
}

/// A host's answer, in words an operator can act on.
pub(crate) fn describe_status(host: &EnrolledHost, s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unavailable => format!(
            "host {} at {} is unreachable: {}",
            host.name,
            host.address,
            s.message()
        ),
        _ => format!("host {} refused: {}", host.name, s.message()),
    }
}

/// A host-agent client on a fresh connection, for calls outside the
/// pusher (migrations), with a longer time limit if given.
pub(crate) async fn agent_client(
    core: &Core,
    host: &EnrolledHost,
    timeout: Option<Duration>,
) -> Result<HostAgentClient<Channel>, String> {
    Ok(HostAgentClient::new(
        connect_with(core, host, timeout.unwrap_or(PUSH_TIMEOUT)).await?,
    ))
}

async fn connect(core: &Core, host: &EnrolledHost) -> Result<Channel, String> {
    connect_with(core, host, PUSH_TIMEOUT).await
}

async fn connect_with(
    core: &Core,
    host: &EnrolledHost,
    timeout: Duration,
) -> Result<Channel, String> {
    let domain = crate::tls::tls_name(&host.address).unwrap_or_default();
    let (cert, key) = core.server_identity();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(core.ca_cert_pem()))
        .identity(Identity::from_pem(cert, key.as_bytes()))
        .domain_name(domain);
    let endpoint = Endpoint::from_shared(format!("https://{}", host.address))
        .map_err(|e| format!("bad address of host {}: {e}", host.name))?
        .tls_config(tls)
        .map_err(|e| format!("TLS setup for host {}: {e}", host.name))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout);
    endpoint.connect().await.map_err(|e| {
        format!(
            "host {} at {} is unreachable: {}",
            host.name,
            host.address,
            crate::tls::error_chain(&e)
        )
    })
}
