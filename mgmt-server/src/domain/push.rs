//! Delivering pending operations to hosts: the pusher's logic (its loop is
//! `crate::scheduler`).
//!
//! Volumes go in batches: one transaction releases a batch's keys (each
//! audited first, fail closed), the pushes run concurrently, and one
//! transaction records the outcomes. Guests go one at a time. Operation
//! ids make a repeated delivery harmless. A rekey the host declines drops
//! the new generation.
//!
//! Failures are retried with exponential backoff, within bounds: nothing
//! is released for a host that cannot be reached (the pusher connects
//! first; such attempts do not count), and an operation that fails
//! `retry.max_attempts` times after the pusher connected (the host
//! answered with an error or stopped answering) or that the server could
//! not prepare (other than the release rate limit) is given up: the volume becomes `failed` (the
//! guest's operation is dropped; a definition that never succeeded makes
//! the guest `failed`), with the reason, and nothing more is released for
//! it until the admin asks again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use xdr_wipe::packet::KeyPacket;

use crate::domain::agent::{
    AgentError, AgentErrorKind, CreateVolume, DecryptVolume, DeleteVolume, Rekey, SealedKey,
    VolumeOnHost,
};
use crate::domain::hosts::enrolled_in;
use crate::domain::release::seal_for;
use crate::domain::{Core, guests, now_unix_ms};
use crate::model::{
    Caller, CoreError, EnrolledHost, RekeyKind, RekeyOrder, VolumeInfo, VolumeState,
};
use crate::store::Tx;

/// Volume operations released and pushed together.
pub(super) const BATCH: u32 = 256;
/// Push rounds that run at once (on disjoint volumes).
const DEPTH: usize = 2;
/// Push rounds a call of [`Core::push_volumes`] starts at most.
const ROUNDS: usize = 8;

/// The volumes a push round took, left out of the other rounds' batches
/// until it ends (its outcomes recorded, or it failed).
struct Claim {
    core: Arc<Core>,
    ids: Vec<String>,
}

impl Claim {
    /// Claims `due` for a round; `held` is the locked set of claims.
    fn new(
        core: &Arc<Core>,
        held: &mut std::sync::MutexGuard<'_, HashSet<String>>,
        due: &[VolumeInfo],
    ) -> Self {
        let ids: Vec<String> = due.iter().map(|v| v.id.clone()).collect();
        held.extend(ids.iter().cloned());
        Self {
            core: core.clone(),
            ids,
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.core.pushing.lock().unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            held.remove(id);
        }
    }
}

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

/// How a push failed, for the retry rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The host could not be reached: retried without limit.
    Unreachable,
    /// The server held it back for now (the release rate limit).
    HeldBack,
    /// The host declined the request as it stands.
    Declined,
    /// Anything else: counts towards giving up.
    Lasting,
}

/// A push that did not go through.
#[derive(Debug, Clone)]
pub(crate) struct PushFailure {
    /// How.
    pub(crate) kind: FailureKind,
    /// What, for the operator.
    pub(crate) message: String,
}

impl From<AgentError> for PushFailure {
    /// A host that could not be reached before anything was sent to it.
    fn from(e: AgentError) -> Self {
        let kind = match e.kind {
            AgentErrorKind::Unreachable => FailureKind::Unreachable,
            AgentErrorKind::Declined => FailureKind::Declined,
            AgentErrorKind::Refused | AgentErrorKind::Failed => FailureKind::Lasting,
        };
        Self {
            kind,
            message: e.message,
        }
    }
}

impl PushFailure {
    /// A call that failed after the pusher had connected (and released
    /// what it sends): it counts towards giving up even if the host stopped
    /// answering meanwhile, so that keys are released a bounded number of
    /// times for an operation that never succeeds.
    pub(crate) fn after_connect(e: AgentError) -> Self {
        let mut f = Self::from(e);
        if f.kind == FailureKind::Unreachable {
            f.kind = FailureKind::Lasting;
        }
        f
    }
}

/// Why the server could not prepare a push.
pub(crate) fn held(e: &CoreError) -> PushFailure {
    let kind = match e {
        CoreError::Exhausted(_) | CoreError::Unattested(_) => FailureKind::HeldBack,
        _ => FailureKind::Lasting,
    };
    PushFailure {
        kind,
        message: e.to_string(),
    }
}

/// Whether pushing `v` releases a key that needs the host attested.
fn needs_attestation(v: &VolumeInfo) -> bool {
    v.release.needs_attestation() && v.state != VolumeState::PendingDelete
}

/// What a host answered to a volume push.
pub(crate) type PushOutcome = Result<VolumeOnHost, PushFailure>;

/// Seals a packet for the wire; a failure is the server's, described.
fn sealed(packet: &KeyPacket, host: &EnrolledHost) -> Result<SealedKey, AgentError> {
    seal_for(packet, host).map_err(|e| {
        AgentError::new(
            AgentErrorKind::Failed,
            format!("cannot seal a key to host {}: {e}", host.name),
        )
    })
}

/// One push round ([`Core::push_round`]): how many volumes it tried and
/// how long its steps took.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushRound {
    /// Volumes tried.
    pub tried: usize,
    /// Reading the due volumes and their hosts.
    pub read: std::time::Duration,
    /// The release transaction: gates, `key.released` records, unwrapping,
    /// committed (no key leaves before).
    pub release: std::time::Duration,
    /// Sealing and delivering to the hosts.
    pub deliver: std::time::Duration,
    /// Recording the outcomes.
    pub record: std::time::Duration,
    /// The whole round (with connecting and attesting the hosts).
    pub total: std::time::Duration,
}

impl Core {
    /// Volumes whose pending operation is due.
    pub fn due_volumes(&self, limit: u32) -> Result<Vec<VolumeInfo>, CoreError> {
        self.read(|tx| Ok(tx.due_volumes(now_unix_ms(), limit)?))
    }

    /// Prepares the pushes of pending volumes, in one transaction. A
    /// release's audit record is written first in the transaction, and if
    /// it cannot commit no packet leaves this function (fail closed). Each
    /// volume gets its own outcome.
    pub(crate) fn prepare_pushes(
        &self,
        volumes: &[VolumeInfo],
    ) -> Result<Vec<Result<PushOp, CoreError>>, CoreError> {
        self.write(|tx| {
            // Each host is read once a batch.
            let mut hosts = HashMap::new();
            Ok(volumes
                .iter()
                .map(|v| self.prepare_one(tx, &mut hosts, v))
                .collect())
        })
    }

    fn prepare_one(
        &self,
        tx: &mut dyn Tx,
        hosts: &mut HashMap<String, EnrolledHost>,
        v: &VolumeInfo,
    ) -> Result<PushOp, CoreError> {
        let host = match hosts.get(&v.host) {
            Some(h) => h.clone(),
            None => {
                let h = enrolled_in(tx, &v.host)?;
                hosts.insert(v.host.clone(), h.clone());
                h
            }
        };
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
    pub(crate) async fn deliver(
        &self,
        v: &VolumeInfo,
        op: PushOp,
        wait_long: bool,
    ) -> Result<VolumeOnHost, AgentError> {
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

    /// Delivers the due volume operations; returns how many were tried.
    ///
    /// Rounds overlap: once a round's keys are released and it delivers, the
    /// next one (if the first took a full batch) reads and releases the
    /// following batch, so that the database's transactions and the
    /// deliveries use the cores at the same time. At most [`DEPTH`] rounds
    /// run at once, on disjoint volumes (a volume in a round is not due to
    /// another until its outcome is recorded), and at most [`ROUNDS`] a
    /// call, so that the scheduler's other work comes in between.
    pub async fn push_volumes(self: &Arc<Self>) -> Result<usize, CoreError> {
        let (released_tx, mut released) = tokio::sync::mpsc::unbounded_channel();
        let mut running = tokio::task::JoinSet::new();
        let spawn = |running: &mut tokio::task::JoinSet<_>| {
            let (core, tx) = (self.clone(), released_tx.clone());
            running.spawn(crate::domain::leader::inherit(async move {
                core.push_round_signalling(Some(tx)).await
            }));
        };
        spawn(&mut running);
        // `wanted`: rounds that took a full batch (so more may be due) and
        // whose follower has not started yet, because DEPTH rounds ran
        // when they said so: it starts as soon as one of them ends.
        let (mut started, mut tried, mut failed, mut wanted) = (1, 0, None, 0usize);
        loop {
            tokio::select! {
                Some(n) = released.recv() => {
                    if n == BATCH as usize {
                        wanted += 1;
                    }
                }
                done = running.join_next() => match done {
                    None => break,
                    Some(Ok(Ok(round))) => tried += round.tried,
                    Some(Ok(Err(e))) => {
                        tracing::error!(error = %e, "a push round failed");
                        failed.get_or_insert(e);
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "a push round's task failed");
                        failed.get_or_insert(CoreError::Internal(format!("a push round's task failed: {e}")));
                    }
                },
            }
            while wanted > 0 && running.len() < DEPTH && started < ROUNDS {
                spawn(&mut running);
                started += 1;
                wanted -= 1;
            }
        }
        match failed {
            Some(e) if tried == 0 => Err(e),
            _ => Ok(tried),
        }
    }

    /// One push round: the due volumes (a batch of them) delivered and
    /// recorded, and how long each step took.
    pub async fn push_round(self: &Arc<Self>) -> Result<PushRound, CoreError> {
        self.push_round_signalling(None).await
    }

    /// [`Core::push_round`], telling `released` how many volumes it took
    /// once their keys are released (the next round may start then).
    async fn push_round_signalling(
        self: &Arc<Self>,
        released: Option<tokio::sync::mpsc::UnboundedSender<usize>>,
    ) -> Result<PushRound, CoreError> {
        let started = std::time::Instant::now();
        let mut round = PushRound::default();
        // The due volumes and their hosts, read together; then which hosts
        // answer: nothing is released for a host that is revoked or cannot
        // be reached. Volumes another round delivers now are left to it
        // (claimed here until this round's outcomes are recorded).
        type Hosts = HashMap<String, Result<EnrolledHost, PushFailure>>;
        let me = self.clone();
        let (due, hosts, claim): (Vec<VolumeInfo>, Hosts, Claim) = self
            .blocking(move |c| {
                // The claims stay locked while the due volumes are read: a
                // round that records its outcomes meanwhile keeps its claim
                // until this read is done, so that its volumes are not taken
                // again from a read that still saw them pending.
                let mut held = c.pushing.lock().unwrap_or_else(|p| p.into_inner());
                let (due, hosts) = c.read(|tx| {
                    let due: Vec<VolumeInfo> = tx
                        .due_volumes(now_unix_ms(), BATCH * DEPTH as u32)?
                        .into_iter()
                        .filter(|v| !held.contains(&v.id))
                        .take(BATCH as usize)
                        .collect();
                    let names: BTreeSet<String> = due.iter().map(|v| v.host.clone()).collect();
                    let hosts = names
                        .into_iter()
                        .map(|n| {
                            let h = enrolled_in(tx, &n).map_err(|e| crate::domain::push::held(&e));
                            (n, h)
                        })
                        .collect();
                    Ok((due, hosts))
                })?;
                let claim = Claim::new(&me, &mut held, &due);
                drop(held);
                Ok((due, hosts, claim))
            })
            .await?;
        round.read = started.elapsed();
        if due.is_empty() {
            return Ok(round);
        }
        let mut reachable: HashMap<String, Result<(), PushFailure>> = HashMap::new();
        for (name, host) in &hosts {
            let r = match host {
                Ok(h) => self.agents.connect(h).await.map_err(PushFailure::from),
                Err(e) => Err(e.clone()),
            };
            reachable.insert(name.clone(), r);
        }
        // Hosts that are to receive keys of `attested` volumes are attested
        // now, all at once, each with its own nonce; a failure holds back
        // those volumes only.
        let mut attesting = tokio::task::JoinSet::new();
        let mut asked = BTreeSet::new();
        for v in due.iter().filter(|v| needs_attestation(v)) {
            if let (Some(Ok(h)), Some(Ok(()))) = (hosts.get(&v.host), reachable.get(&v.host)) {
                if asked.insert(v.host.clone()) {
                    let (core, h) = (self.clone(), h.clone());
                    attesting.spawn(crate::domain::leader::inherit(async move {
                        let r = core.attest(&h).await.map_err(|e| held(&e));
                        (h.name, r)
                    }));
                }
            }
        }
        let mut attested: HashMap<String, Result<(), PushFailure>> = HashMap::new();
        while let Some(done) = attesting.join_next().await {
            match done {
                Ok((name, r)) => {
                    attested.insert(name, r);
                }
                Err(e) => tracing::error!(error = %e, "an attestation task failed"),
            }
        }
        let mut outcomes: Vec<(VolumeInfo, PushOutcome)> = Vec::with_capacity(due.len());
        let mut ready = Vec::with_capacity(due.len());
        for v in due {
            match (reachable.get(&v.host), attested.get(&v.host)) {
                (Some(Ok(())), Some(Err(e))) if needs_attestation(&v) => {
                    outcomes.push((v, Err(e.clone())))
                }
                (Some(Ok(())), _) => ready.push(v),
                (Some(Err(e)), _) => outcomes.push((v, Err(e.clone()))),
                (None, _) => {}
            }
        }
        let batch = ready.clone();
        let at = std::time::Instant::now();
        let prepared = self.blocking(move |c| c.prepare_pushes(&batch)).await?;
        round.release = at.elapsed();
        if let Some(tx) = released {
            let _ = tx.send(ready.len() + outcomes.len());
        }
        let at = std::time::Instant::now();
        let mut running = tokio::task::JoinSet::new();
        for (v, op) in ready.into_iter().zip(prepared) {
            match op {
                Ok(op) => {
                    let core = self.clone();
                    running.spawn(crate::domain::leader::inherit(async move {
                        let r = core
                            .deliver(&v, op, false)
                            .await
                            .map_err(PushFailure::after_connect);
                        (v, r)
                    }));
                }
                Err(e) => outcomes.push((v, Err(held(&e)))),
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
                tracing::warn!(volume = %v.id, host = %v.host, error = %e.message, kind = ?e.kind, "push failed");
            }
        }
        round.deliver = at.elapsed();
        round.tried = outcomes.len();
        let at = std::time::Instant::now();
        // The claim ends with the recording transaction, on its thread (its
        // lock may wait for another round's read).
        self.blocking(move |c| {
            let recorded = c.record_pushes(&outcomes);
            drop(claim);
            recorded
        })
        .await?;
        round.record = at.elapsed();
        round.total = started.elapsed();
        Ok(round)
    }

    /// Records the outcomes of pushes, in one transaction: on success what
    /// the host did, on failure the error (retried with backoff, or given
    /// up after `retry.max_attempts` lasting failures).
    pub(crate) fn record_pushes(
        &self,
        outcomes: &[(VolumeInfo, PushOutcome)],
    ) -> Result<(), CoreError> {
        let recorded = self.write(|tx| {
            for (v, outcome) in outcomes {
                // The volume may have changed while its push was under way
                // (deleted, or shredded with its revoked host): the outcome
                // of the old request must not undo the new one, nor replace
                // its last error. The next push works from the new state.
                if !tx.volume_is(&v.id, v.state, v.key_generation, &v.host)? {
                    tracing::info!(volume = %v.id, was = %v.state, "a push outcome is stale: the volume changed meanwhile");
                    continue;
                }
                let Err(e) = outcome else {
                    if let Ok(done) = outcome {
                        self.record_done(tx, v, done)?;
                    }
                    continue;
                };
                let next = now_unix_ms() + self.retry_delay_ms(v.attempts) as i64;
                match e.kind {
                    FailureKind::Declined if v.state == VolumeState::Rekeying => {
                        self.record_declined_rekey(tx, v, &e.message)?;
                    }
                    FailureKind::Unreachable | FailureKind::HeldBack => {
                        tx.volume_attempt_failed(&v.id, &e.message, next, false)?;
                    }
                    FailureKind::Declined | FailureKind::Lasting => {
                        let failures = v.failures + 1;
                        match v.state.pending_op() {
                            Some(op) if failures >= self.retry.max_attempts => {
                                let why = format!(
                                    "{op} gave up after {failures} failed attempts: {}",
                                    e.message
                                );
                                tx.volume_attempt_failed(&v.id, &e.message, next, true)?;
                                tx.fail_volume(&v.id, op, &why)?;
                                self.log(
                                    tx,
                                    "server",
                                    "volume.failed",
                                    &v.id,
                                    &format!("volume {} on host {}: {why}", v.name, v.host),
                                )?;
                            }
                            _ => tx.volume_attempt_failed(&v.id, &e.message, next, true)?,
                        }
                    }
                }
            }
            Ok(())
        });
        // Counted once recorded (a transaction that failed records nothing).
        if recorded.is_ok() {
            for (_, outcome) in outcomes {
                self.counters.push(outcome.is_ok());
            }
        }
        recorded
    }

    /// Queues again the operation a `failed` volume gave up.
    pub fn retry_volume(&self, caller: &Caller, name_or_id: &str) -> Result<VolumeInfo, CoreError> {
        let v = self.get_volume(name_or_id)?;
        let Some(op) = v.failed_op.filter(|_| v.state == VolumeState::Failed) else {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is {}: only a failed volume is retried",
                v.name, v.state
            )));
        };
        let v = self.write(|tx| {
            // Retrying releases its key to its host again: not a revoked one.
            enrolled_in(tx, &v.host)?;
            tx.queue_volume_op(&v.id, op.pending_state())?;
            self.log(
                tx,
                &caller.actor(),
                "volume.retry-requested",
                &v.id,
                &format!("volume {}: {op} again", v.name),
            )?;
            crate::domain::volumes::find_in(tx, &v.id)
        })?;
        self.wake.notify_one();
        Ok(v)
    }
}

/// What a host returns for an operation that leaves no volume to report.
fn gone() -> VolumeOnHost {
    VolumeOnHost {
        path: String::new(),
        capacity_bytes: 0,
    }
}

impl Core {
    /// The host did what was asked of volume `v`.
    pub(crate) fn record_done(
        &self,
        tx: &mut dyn Tx,
        v: &VolumeInfo,
        done: &VolumeOnHost,
    ) -> Result<(), CoreError> {
        match v.state {
            VolumeState::PendingDelete => {
                let why = format!("deleted on host {}", v.host);
                self.retire(tx, v, VolumeState::Deleted, "", &why)
            }
            VolumeState::Rekeying => {
                let old = v.key_generation;
                let deep = v.rekey.is_some_and(|o| o.kind == RekeyKind::Deep);
                tx.volume_rekeyed(&v.id, old + 1, deep)?;
                tx.delete_volume_key(&v.id, old)?;
                let detail = format!("volume {} generation {old} -> {}", v.name, old + 1);
                self.log(tx, "server", "key.rotated", &v.id, &detail)?;
                let detail = format!("volume {} generation {old}", v.name);
                self.log(tx, "server", "key.destroyed", &v.id, &detail)?;
                Ok(())
            }
            VolumeState::PendingDecrypt => {
                let detail = format!("volume {} on host {} is cleartext now", v.name, v.host);
                self.log(tx, "server", "volume.decrypted", &v.id, &detail)?;
                self.retire(tx, v, VolumeState::Decrypted, "", "decrypted")
            }
            VolumeState::PendingEncrypt | VolumeState::Encrypting => {
                tx.volume_made(&v.id, &done.path, Some(done.capacity_bytes))?;
                let detail = format!(
                    "volume {} on host {} encrypted from cleartext",
                    v.name, v.host
                );
                self.log(tx, "server", "volume.encrypted", &v.id, &detail)?;
                for g in guests::adopt_volume(tx, v, &done.path)? {
                    let detail = format!("its disk on volume {} is encrypted now", v.name);
                    self.log(tx, "server", "guest.define-requested", &g, &detail)?;
                }
                Ok(())
            }
            _ => {
                tx.volume_made(&v.id, &done.path, None)?;
                let detail = format!("volume {} created on host {}", v.name, v.host);
                self.log(tx, "server", "key.pushed", &v.id, &detail)?;
                Ok(())
            }
        }
    }

    /// The host declined a rekey as asked: the new generation goes, the old one
    /// stays active, and the volume is ready again with the reason.
    fn record_declined_rekey(
        &self,
        tx: &mut dyn Tx,
        v: &VolumeInfo,
        why: &str,
    ) -> Result<(), CoreError> {
        let unused = v.key_generation + 1;
        tx.delete_volume_key(&v.id, unused)?;
        tx.rekey_dropped(&v.id, why)?;
        let detail = format!("volume {}: {why}", v.name);
        self.log(tx, "server", "volume.rekey-refused", &v.id, &detail)?;
        let detail = format!("volume {} unused generation {unused}", v.name);
        self.log(tx, "server", "key.destroyed", &v.id, &detail)?;
        Ok(())
    }
}
