//! Delivering pending operations to hosts: the pusher's logic (its loop is
//! `crate::scheduler`).
//!
//! Volumes go in batches: one transaction releases a batch's keys (each
//! audited first, fail closed), the pushes run concurrently, and one
//! transaction records the outcomes. Guests go one at a time. A failure is
//! retried with exponential backoff; operation ids make a repeated delivery
//! harmless. A rekey the host declines drops the new generation.

use std::sync::Arc;

use xdr_wipe::packet::KeyPacket;

use crate::domain::agent::{
    AgentError, AgentErrorKind, CreateVolume, DecryptVolume, DefineGuest, DeleteVolume, GuestCall,
    Rekey, SealedKey, VolumeOnHost,
};
use crate::domain::hosts::enrolled_in;
use crate::domain::release::seal_for;
use crate::domain::volumes::retire;
use crate::domain::{Core, audit, guests, now_unix_ms};
use crate::model::{
    CoreError, EnrolledHost, GuestInfo, GuestOp, GuestState, RekeyKind, RekeyOrder, VolumeInfo,
    VolumeState,
};
use crate::store::Tx;

/// Volume operations released and pushed together.
const BATCH: u32 = 256;
/// Guest operations looked at per round.
const GUEST_BATCH: u32 = 64;

/// What the pusher must deliver for one pending volume, its keys released
/// (and audited) for the host. Packets are wiped on drop.
pub(crate) enum PushOp {
    /// Create the volume, or encrypt the existing cleartext one.
    Create {
        host: EnrolledHost,
        packet: KeyPacket,
        encrypt_existing: bool,
    },
    /// Turn the volume back into cleartext.
    Decrypt {
        host: EnrolledHost,
        packet: KeyPacket,
    },
    /// Replace the volume's key; the host may not hold the current one.
    Rekey {
        host: EnrolledHost,
        old: Box<KeyPacket>,
        new: Box<KeyPacket>,
        order: RekeyOrder,
    },
    /// Delete the volume and the host's copy of its key.
    Delete { host: EnrolledHost },
}

/// What a host answered to a volume push.
pub(crate) type PushOutcome = Result<VolumeOnHost, AgentError>;

/// Why an operation could not be prepared, as a retryable failure.
fn held_back(e: &CoreError) -> AgentError {
    AgentError::new(AgentErrorKind::Failed, e.to_string())
}

/// Seals a packet for the wire; a failure is the server's, described.
fn sealed(packet: &KeyPacket, host: &EnrolledHost) -> Result<SealedKey, AgentError> {
    seal_for(packet, host).map_err(|e| {
        AgentError::new(
            AgentErrorKind::Failed,
            format!("cannot seal a key to host {}: {e}", host.name),
        )
    })
}

impl Core {
    /// Volumes whose pending operation is due.
    pub fn due_volumes(&self, limit: u32) -> Result<Vec<VolumeInfo>, CoreError> {
        self.read(|tx| Ok(tx.due_volumes(now_unix_ms(), limit)?))
    }

    /// Guests whose pending operation is due.
    pub fn due_guests(&self, limit: u32) -> Result<Vec<GuestInfo>, CoreError> {
        self.read(|tx| Ok(tx.due_guests(now_unix_ms(), limit)?))
    }

    /// Prepares the pushes of pending volumes, in one transaction. A
    /// release's audit record is written first in the transaction, and if
    /// it cannot commit no packet leaves this function (fail closed). Each
    /// volume gets its own outcome.
    pub(crate) fn prepare_pushes(
        &self,
        volumes: &[VolumeInfo],
    ) -> Result<Vec<Result<PushOp, CoreError>>, CoreError> {
        self.write(|tx| Ok(volumes.iter().map(|v| self.prepare_one(tx, v)).collect()))
    }

    fn prepare_one(&self, tx: &mut dyn Tx, v: &VolumeInfo) -> Result<PushOp, CoreError> {
        let host = enrolled_in(tx, &v.host)?;
        match v.state {
            VolumeState::PendingDelete => Ok(PushOp::Delete { host }),
            VolumeState::Rekeying => {
                let order = v.rekey.ok_or_else(|| {
                    CoreError::Internal(format!("volume {} is rekeying without an order", v.id))
                })?;
                self.take_releases(&host.name, 2)?;
                let g = v.key_generation;
                let why = " for a rekey";
                let old = self.release(tx, &v.id, v.format, g, &host, why)?;
                let new = self.release(tx, &v.id, v.format, g + 1, &host, why)?;
                Ok(PushOp::Rekey {
                    host,
                    old: Box::new(old),
                    new: Box::new(new),
                    order,
                })
            }
            VolumeState::PendingDecrypt => {
                self.take_releases(&host.name, 1)?;
                let why = " to decrypt the volume";
                let packet = self.release(tx, &v.id, v.format, v.key_generation, &host, why)?;
                Ok(PushOp::Decrypt { host, packet })
            }
            state => {
                self.take_releases(&host.name, 1)?;
                let encrypt_existing =
                    matches!(state, VolumeState::PendingEncrypt | VolumeState::Encrypting);
                let why = if encrypt_existing {
                    " to encrypt the existing volume"
                } else {
                    ""
                };
                let packet = self.release(tx, &v.id, v.format, v.key_generation, &host, why)?;
                Ok(PushOp::Create {
                    host,
                    packet,
                    encrypt_existing,
                })
            }
        }
    }

    /// Delivers one prepared volume operation. Sealing (X25519) runs here,
    /// concurrently across pushes, after the release was committed.
    /// `wait_long`: the caller waits for an encryption's whole copy (the
    /// admin's `volume encrypt`), not the pusher's minute.
    pub(crate) async fn deliver(&self, v: &VolumeInfo, op: PushOp, wait_long: bool) -> PushOutcome {
        let agents = &self.agents;
        match op {
            PushOp::Create {
                host,
                packet,
                encrypt_existing,
            } => {
                let key = sealed(&packet, &host)?;
                drop(packet);
                let req = CreateVolume {
                    op_id: format!("{}:create:{}", v.id, v.key_generation),
                    volume_id: v.id.clone(),
                    pool: v.pool.clone(),
                    name: v.name.clone(),
                    capacity_bytes: v.capacity_bytes,
                    format: v.format,
                    secret_uuid: v.secret_uuid.clone(),
                    key,
                    encrypt_existing,
                    wait_long,
                };
                agents.create_volume(&host, req).await
            }
            PushOp::Decrypt { host, packet } => {
                let key = sealed(&packet, &host)?;
                drop(packet);
                let req = DecryptVolume {
                    op_id: format!("{}:decrypt", v.id),
                    volume_id: v.id.clone(),
                    key,
                };
                agents.decrypt_volume(&host, req).await?;
                Ok(gone())
            }
            PushOp::Rekey {
                host,
                old,
                new,
                order,
            } => {
                let old_key = sealed(&old, &host)?;
                let new_key = sealed(&new, &host)?;
                drop((old, new));
                let req = Rekey {
                    op_id: format!("{}:rekey:{}", v.id, v.key_generation + 1),
                    volume_id: v.id.clone(),
                    from_generation: v.key_generation,
                    kind: order.kind,
                    old_key,
                    new_key,
                    new_secret_uuid: v.secret_uuid.clone(),
                    placement: order.placement,
                    bandwidth: order.bandwidth,
                };
                agents.rekey(&host, req).await?;
                Ok(gone())
            }
            PushOp::Delete { host } => {
                let req = DeleteVolume {
                    op_id: format!("{}:delete", v.id),
                    volume_id: v.id.clone(),
                    pool: v.pool.clone(),
                    name: v.name.clone(),
                };
                agents.delete_volume(&host, req).await?;
                Ok(gone())
            }
        }
    }

    /// Delivers the due volume operations (one batch); returns how many
    /// were tried.
    pub async fn push_volumes(self: &Arc<Self>) -> Result<usize, CoreError> {
        let due = self.blocking(|c| c.due_volumes(BATCH)).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let batch = due.clone();
        let prepared = self.blocking(move |c| c.prepare_pushes(&batch)).await?;
        let mut outcomes: Vec<(VolumeInfo, PushOutcome)> = Vec::with_capacity(due.len());
        let mut running = tokio::task::JoinSet::new();
        for (v, op) in due.into_iter().zip(prepared) {
            match op {
                Ok(op) => {
                    let core = self.clone();
                    running.spawn(async move {
                        let r = core.deliver(&v, op, false).await;
                        (v, r)
                    });
                }
                Err(e) => outcomes.push((v, Err(held_back(&e)))),
            }
        }
        while let Some(done) = running.join_next().await {
            match done {
                Ok(o) => outcomes.push(o),
                Err(e) => tracing::error!(error = %e, "a push task failed"),
            }
        }
        for (v, r) in &outcomes {
            if let Err(e) = r {
                tracing::warn!(volume = %v.id, host = %v.host, error = %e, kind = ?e.kind, "push failed");
            }
        }
        let n = outcomes.len();
        self.blocking(move |c| c.record_pushes(&outcomes)).await?;
        Ok(n)
    }

    /// Records the outcomes of pushes, in one transaction: on success what
    /// the host did, on failure the error (retried with backoff).
    pub(crate) fn record_pushes(
        &self,
        outcomes: &[(VolumeInfo, PushOutcome)],
    ) -> Result<(), CoreError> {
        self.write(|tx| {
            for (v, outcome) in outcomes {
                match outcome {
                    Ok(done) => record_done(tx, v, done)?,
                    Err(e)
                        if e.kind == AgentErrorKind::Declined
                            && v.state == VolumeState::Rekeying =>
                    {
                        record_declined_rekey(tx, v, &e.message)?;
                    }
                    Err(e) => {
                        let next = now_unix_ms() + self.retry_delay_ms(v.attempts) as i64;
                        tx.volume_attempt_failed(&v.id, &e.message, next)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Delivers the due guest operations, one at a time, until `stop`
    /// says to stop.
    pub async fn push_guests(self: &Arc<Self>, stop: impl Fn() -> bool) -> Result<(), CoreError> {
        let due = self.blocking(|c| c.due_guests(GUEST_BATCH)).await?;
        for g in due {
            if stop() {
                break;
            }
            let result = self.push_guest(&g).await;
            let g2 = g.clone();
            let recorded = match result {
                Ok(state) => {
                    self.blocking(move |c| c.guest_push_succeeded(&g2, state))
                        .await
                }
                Err(e) => {
                    tracing::warn!(guest = %g.uuid, host = %g.host, error = %e, "push failed; will retry");
                    self.blocking(move |c| c.guest_push_failed(&g2, &e)).await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(guest = %g.uuid, error = %e, "cannot record push outcome");
            }
        }
        Ok(())
    }

    /// Pushes one guest operation; returns the guest's state on the host.
    async fn push_guest(self: &Arc<Self>, g: &GuestInfo) -> Result<Option<GuestState>, String> {
        let guest = g.clone();
        let (host, keys) = self
            .blocking(move |c| c.prepare_guest_push(&guest))
            .await
            .map_err(|e| e.to_string())?;
        let agents = &self.agents;
        let call = |op: &str| GuestCall {
            op_id: format!("{}:{op}:{}", g.uuid, g.attempts),
            guest_uuid: g.uuid.clone(),
        };
        let r = match g.pending {
            Some(GuestOp::Define) => {
                let req = DefineGuest {
                    op_id: format!("{}:define", g.uuid),
                    domain_xml: g.domain_xml.clone(),
                    keys,
                };
                agents.define_guest(&host, req).await
            }
            Some(GuestOp::Undefine) => agents.undefine_guest(&host, call("undefine")).await,
            Some(GuestOp::Start) => agents.start_guest(&host, call("start")).await,
            Some(GuestOp::Stop) | None => agents.stop_guest(&host, call("stop")).await,
        };
        r.map_err(|e| e.message)
    }

    /// Prepares a guest push: its host and, for a definition, the guest's
    /// keys, each released (audited first, fail closed) and sealed to it.
    pub(crate) fn prepare_guest_push(
        &self,
        g: &GuestInfo,
    ) -> Result<(EnrolledHost, Vec<SealedKey>), CoreError> {
        let host = self.enrolled_host(&g.host)?;
        if g.pending != Some(GuestOp::Define) {
            return Ok((host, vec![]));
        }
        let keys = self.write(|tx| {
            let rows = tx.guest_keys(&g.uuid, &host.name)?;
            self.take_releases(&host.name, rows.len() as u32)?;
            let why = format!(" for guest {}", g.name);
            let mut keys = Vec::with_capacity(rows.len());
            for k in rows {
                let packet = self.release(tx, &k.volume_id, k.format, k.generation, &host, &why)?;
                keys.push(seal_for(&packet, &host).map_err(CoreError::Internal)?);
            }
            Ok(keys)
        })?;
        Ok((host, keys))
    }

    /// Records a confirmed guest push and the state the host reported.
    pub(crate) fn guest_push_succeeded(
        &self,
        g: &GuestInfo,
        host_state: Option<GuestState>,
    ) -> Result<(), CoreError> {
        let Some(op) = g.pending else { return Ok(()) };
        let state = match (op, host_state) {
            (GuestOp::Undefine, _) => GuestState::Undefined,
            (_, None) => GuestState::Defined,
            (_, Some(s)) => s,
        };
        let action = match op {
            GuestOp::Define => "key.pushed",
            GuestOp::Undefine => "guest.undefined",
            GuestOp::Start => "guest.started",
            GuestOp::Stop => "guest.stopped",
        };
        self.write(|tx| {
            tx.guest_op_done(&g.uuid, op, state)?;
            audit::append(
                tx,
                "server",
                action,
                &g.uuid,
                &format!("guest {} on host {}: {state}", g.name, g.host),
            )?;
            Ok(())
        })
    }

    /// Records a failed guest push and when to retry.
    pub(crate) fn guest_push_failed(&self, g: &GuestInfo, error: &str) -> Result<(), CoreError> {
        let next = now_unix_ms() + self.retry_delay_ms(g.attempts) as i64;
        self.write(|tx| Ok(tx.guest_attempt_failed(&g.uuid, error, next)?))
    }
}

/// What a host returns for an operation that leaves no volume to report.
fn gone() -> VolumeOnHost {
    VolumeOnHost {
        path: String::new(),
        capacity_bytes: 0,
    }
}

/// The host did what was asked of volume `v`.
fn record_done(tx: &mut dyn Tx, v: &VolumeInfo, done: &VolumeOnHost) -> Result<(), CoreError> {
    match v.state {
        VolumeState::PendingDelete => {
            let why = format!("deleted on host {}", v.host);
            retire(tx, v, VolumeState::Deleted, "", &why)
        }
        VolumeState::Rekeying => {
            let old = v.key_generation;
            let deep = v.rekey.is_some_and(|o| o.kind == RekeyKind::Deep);
            tx.volume_rekeyed(&v.id, old + 1, deep)?;
            tx.delete_volume_key(&v.id, old)?;
            let detail = format!("volume {} generation {old} -> {}", v.name, old + 1);
            audit::append(tx, "server", "key.rotated", &v.id, &detail)?;
            let detail = format!("volume {} generation {old}", v.name);
            audit::append(tx, "server", "key.destroyed", &v.id, &detail)?;
            Ok(())
        }
        VolumeState::PendingDecrypt => {
            let detail = format!("volume {} on host {} is cleartext now", v.name, v.host);
            audit::append(tx, "server", "volume.decrypted", &v.id, &detail)?;
            retire(tx, v, VolumeState::Decrypted, "", "decrypted")
        }
        VolumeState::PendingEncrypt | VolumeState::Encrypting => {
            tx.volume_made(&v.id, &done.path, Some(done.capacity_bytes))?;
            let detail = format!(
                "volume {} on host {} encrypted from cleartext",
                v.name, v.host
            );
            audit::append(tx, "server", "volume.encrypted", &v.id, &detail)?;
            for g in guests::adopt_volume(tx, v, &done.path)? {
                let detail = format!("its disk on volume {} is encrypted now", v.name);
                audit::append(tx, "server", "guest.define-requested", &g, &detail)?;
            }
            Ok(())
        }
        _ => {
            tx.volume_made(&v.id, &done.path, None)?;
            let detail = format!("volume {} created on host {}", v.name, v.host);
            audit::append(tx, "server", "key.pushed", &v.id, &detail)?;
            Ok(())
        }
    }
}

/// The host declined a rekey as asked: the new generation goes, the old one
/// stays active, and the volume is ready again with the reason.
fn record_declined_rekey(tx: &mut dyn Tx, v: &VolumeInfo, why: &str) -> Result<(), CoreError> {
    let unused = v.key_generation + 1;
    tx.delete_volume_key(&v.id, unused)?;
    tx.rekey_dropped(&v.id, why)?;
    let detail = format!("volume {}: {why}", v.name);
    audit::append(tx, "server", "volume.rekey-refused", &v.id, &detail)?;
    let detail = format!("volume {} unused generation {unused}", v.name);
    audit::append(tx, "server", "key.destroyed", &v.id, &detail)?;
    Ok(())
}
