//! Escrow packets for offline custody (issue 13), under a two-person rule:
//! one admin asks for a volume's packet ([`Core::request_escrow`]: the
//! recipients, age X25519 public keys, and why), another admin approves it
//! ([`Core::decide_escrow`]), and only then is the volume's current key
//! released, sealed to its host like a rekey's old key, and the host asked
//! to make the packet: the volume's passphrase and LUKS data key,
//! age-encrypted by the host to those recipients (each must be in the
//! host's own `--escrow-recipients` file). The server keeps the packet's
//! ciphertext and never sees what it holds.
//!
//! Bounds (a requester cannot fill the table or keep a host busy): at most
//! [`MAX_OPEN_PER_VOLUME`] requests of a volume pending or made at its
//! current generation, at most [`MAX_PENDING_PER_REQUESTER`] pending per
//! admin, and pending requests expire after [`PENDING_SECS`] (lazily, in
//! the next write that looks). A made packet of a generation the volume
//! no longer has (rekeyed, deleted or decrypted) is obsolete: listed with
//! `--all` only, still fetchable. Every step is audited (`escrow.*`),
//! with ids, names and recipients, never a key.

mod checks;

use std::sync::Arc;

pub use checks::check_recipients;
use checks::{Making, admin, check_text, host_failed, new_id, not_pending};

use crate::domain::agent::{AgentError, EscrowPacketCall};
use crate::domain::hosts::enrolled_in;
use crate::domain::release::seal_for;
use crate::domain::volumes::find_in;
use crate::domain::{Core, now_unix};
use crate::model::{Caller, CoreError, EscrowEntry, EscrowState, VolumeState};
use crate::store::Tx;

/// Recipients of one packet, at most.
pub const MAX_RECIPIENTS: usize = 16;
/// Requests of one volume pending or made at its current generation.
pub const MAX_OPEN_PER_VOLUME: u32 = 8;
/// Pending requests of one admin.
pub const MAX_PENDING_PER_REQUESTER: u32 = 16;
/// A pending request expires after 7 days.
pub const PENDING_SECS: i64 = 7 * 24 * 3600;
/// Characters of a reason or a note, at most.
pub const MAX_TEXT: usize = 200;

/// What an approval found before the host call.
struct Approval {
    entry: EscrowEntry,
    host: crate::model::EnrolledHost,
    call: EscrowPacketCall,
}

impl Core {
    /// Pending requests older than [`PENDING_SECS`] expire (audited).
    fn expire_escrow(&self, tx: &mut dyn Tx) -> Result<(), CoreError> {
        for id in tx.expire_escrow(now_unix() - PENDING_SECS)? {
            self.log(tx, "server", "escrow.expired", &id, "not decided in 7 days")?;
        }
        Ok(())
    }

    /// An admin asks for an escrow packet of a volume (name or UUID) for
    /// `recipients`; another admin must approve it. Audited.
    pub fn request_escrow(
        &self,
        caller: &Caller,
        volume: &str,
        recipients: &[String],
        reason: &str,
    ) -> Result<EscrowEntry, CoreError> {
        admin(caller, "asking for an escrow packet")?;
        let recipients = check_recipients(recipients)?;
        check_text("reason", reason)?;
        let actor = caller.actor();
        self.write(|tx| {
            self.expire_escrow(tx)?;
            let v = find_in(tx, volume)?;
            if !v.state.is_live()
                || matches!(
                    v.state,
                    VolumeState::PendingDelete | VolumeState::PendingDecrypt
                )
            {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} is {}: its key is destroyed or about to be, there is nothing to escrow",
                    v.name, v.state
                )));
            }
            if v.split {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} has a split key: this server holds one half only, and the verifier releases the other to an attested host {} alone, so no packet made here could open it; for an offline copy, copy its data to a volume created without --split and escrow that one",
                    v.name, v.host
                )));
            }
            let open = tx.escrow_open_count(&v.id, v.key_generation)?;
            if open >= MAX_OPEN_PER_VOLUME {
                return Err(CoreError::Exhausted(format!(
                    "volume {} has {open} escrow requests pending or made at its key generation {} (at most {MAX_OPEN_PER_VOLUME}): deny pending ones (`guestkeyctl escrow deny ID`) or let them expire; made ones stop counting when the volume is rekeyed (`guestkeyctl escrow list --volume {}`)",
                    v.name, v.key_generation, v.name
                )));
            }
            let mine = tx.escrow_pending_count(&actor)?;
            if mine >= MAX_PENDING_PER_REQUESTER {
                return Err(CoreError::Exhausted(format!(
                    "{actor} has {mine} escrow requests pending (at most {MAX_PENDING_PER_REQUESTER}): have them decided, deny those not needed (`guestkeyctl escrow deny ID`) or let them expire (7 days)"
                )));
            }
            let e = EscrowEntry {
                id: new_id()?,
                volume_id: v.id.clone(),
                volume_name: v.name.clone(),
                host: v.host.clone(),
                generation: v.key_generation,
                recipients: recipients.clone(),
                reason: reason.to_owned(),
                requested_by: actor.clone(),
                requested_unix: now_unix(),
                state: EscrowState::Pending,
                decided_by: String::new(),
                decided_unix: 0,
                note: String::new(),
                luks_uuid: String::new(),
                packet_bytes: 0,
                obsolete: false,
            };
            tx.insert_escrow(&e)?;
            self.log(
                tx,
                &actor,
                "escrow.requested",
                &v.id,
                &format!(
                    "request {} for volume {} generation {} on host {}, to {}; reason: {}",
                    e.id,
                    v.name,
                    v.key_generation,
                    v.host,
                    recipients.join(", "),
                    if reason.is_empty() { "-" } else { reason }
                ),
            )?;
            Ok(e)
        })
    }

    /// Requests, newest first: of one volume (name or UUID) or all; the
    /// pending and current ones, or with `all` every one.
    pub fn list_escrow(
        &self,
        volume: Option<&str>,
        all: bool,
    ) -> Result<Vec<EscrowEntry>, CoreError> {
        self.write(|tx| {
            self.expire_escrow(tx)?;
            let id = match volume {
                Some(v) => Some(find_in(tx, v)?.id),
                None => None,
            };
            Ok(tx.escrow_entries(id.as_deref(), !all)?)
        })
    }

    /// A request by id, or the error naming the listing.
    fn escrow_in(tx: &mut dyn Tx, id: &str) -> Result<EscrowEntry, CoreError> {
        tx.escrow(id)?.ok_or_else(|| {
            CoreError::NotFound(format!(
                "no escrow request {id}: `guestkeyctl escrow list --all` shows them"
            ))
        })
    }

    /// An admin decides a pending request. A denial is recorded at once.
    /// An approval must come from another admin than the requester; the
    /// volume must be ready at the generation asked for; the host then
    /// makes the packet (no transaction is open meanwhile). A host that
    /// fails leaves the request pending. Audited.
    pub async fn decide_escrow(
        self: &Arc<Self>,
        caller: Caller,
        id: String,
        approve: bool,
        note: String,
    ) -> Result<EscrowEntry, CoreError> {
        admin(&caller, "deciding an escrow request")?;
        check_text("note", &note)?;
        if !approve {
            return self
                .blocking(move |c| c.deny_escrow(&caller, &id, &note))
                .await;
        }
        let _making = Making::take(&id)?;
        let (c2, i2) = (caller.clone(), id.clone());
        let a = self
            // A refusal of the two-person rule is audited: its record is
            // committed, the refusal returned after.
            .blocking(move |c| c.write(|tx| c.prepare_escrow(tx, &c2, &i2))?)
            .await?;
        let Approval { entry, host, call } = a;
        let made = self.agents.make_escrow_packet(&host, call).await;
        let actor = caller.actor();
        self.blocking(move |c| c.write(|tx| c.record_escrow(tx, &actor, entry, &note, made)))
            .await?
    }

    fn deny_escrow(&self, caller: &Caller, id: &str, note: &str) -> Result<EscrowEntry, CoreError> {
        let actor = caller.actor();
        self.write(|tx| {
            self.expire_escrow(tx)?;
            let e = Self::escrow_in(tx, id)?;
            if !tx.decide_escrow(id, EscrowState::Denied, now_unix(), &actor, note, None)? {
                return Err(not_pending(&e));
            }
            self.log(
                tx,
                &actor,
                "escrow.denied",
                &e.volume_id,
                &format!(
                    "request {id} of {} for volume {}{}",
                    e.requested_by,
                    e.volume_name,
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(": {note}")
                    }
                ),
            )?;
            Self::escrow_in(tx, id)
        })
    }

    /// Checks an approval and releases the volume's key sealed for its
    /// host. `Ok(Err(..))`: refused, with the refusal's audit record to
    /// commit.
    fn prepare_escrow(
        &self,
        tx: &mut dyn Tx,
        caller: &Caller,
        id: &str,
    ) -> Result<Result<Approval, CoreError>, CoreError> {
        self.expire_escrow(tx)?;
        let e = Self::escrow_in(tx, id)?;
        if e.state != EscrowState::Pending {
            return Err(not_pending(&e));
        }
        let actor = caller.actor();
        if actor == e.requested_by {
            self.log(
                tx,
                &actor,
                "escrow.refused",
                &e.volume_id,
                &format!("request {id}: its requester may not approve it (two-person rule)"),
            )?;
            return Ok(Err(CoreError::Denied(format!(
                "escrow request {id} was made by {actor}: another admin must approve it (two-person rule). An admin with access to the data directory makes another credential with `guestkey-server admin add NAME --data-dir DIR --out DIR`"
            ))));
        }
        let v = find_in(tx, &e.volume_id)?;
        if v.state != VolumeState::Ready {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is {}: an escrow packet is made only of a ready volume, whose key is settled (not during a rekey, migration or conversion); request {id} stays pending: approve it again once `guestkeyctl volume show {}` says ready",
                v.name, v.state, v.name
            )));
        }
        if v.key_generation != e.generation {
            return Err(CoreError::FailedPrecondition(format!(
                "escrow request {id} is for key generation {} of volume {}, which is at generation {} now: ask again (`guestkeyctl volume escrow {}`) and deny this one (`guestkeyctl escrow deny {id}`)",
                e.generation, v.name, v.key_generation, v.name
            )));
        }
        let host = enrolled_in(tx, &v.host)?;
        self.take_releases(&host.name, 1)?;
        let why = format!(" for escrow packet {id}");
        let packet = self.release(tx, &v.id, v.format, v.key_generation, &host, &why)?;
        let key = seal_for(&packet, &host).map_err(|err| {
            CoreError::Internal(format!("cannot seal a key to host {}: {err}", host.name))
        })?;
        drop(packet);
        let call = EscrowPacketCall {
            volume_id: v.id.clone(),
            key,
            recipients: e.recipients.clone(),
            packet_id: e.id.clone(),
            host_name: host.name.clone(),
            volume_name: v.name.clone(),
            requested_by: e.requested_by.clone(),
            approved_by: actor,
        };
        Ok(Ok(Approval {
            entry: e,
            host,
            call,
        }))
    }

    /// Records what the host answered to an approval.
    fn record_escrow(
        &self,
        tx: &mut dyn Tx,
        actor: &str,
        e: EscrowEntry,
        note: &str,
        made: Result<crate::domain::agent::EscrowPacketMade, AgentError>,
    ) -> Result<Result<EscrowEntry, CoreError>, CoreError> {
        let id = e.id.as_str();
        let made = match made {
            Ok(m) => m,
            Err(err) => {
                self.log(
                    tx,
                    actor,
                    "escrow.failed",
                    &e.volume_id,
                    &format!("request {id}: {}", err.message),
                )?;
                return Ok(Err(host_failed(id, &err)));
            }
        };
        let stored = (made.luks_uuid.as_str(), made.packet.as_slice());
        if !tx.decide_escrow(id, EscrowState::Made, now_unix(), actor, note, Some(stored))? {
            let now = Self::escrow_in(tx, id)?;
            return Ok(Err(CoreError::FailedPrecondition(format!(
                "escrow request {id} was {} meanwhile (by {}): the packet the host made was not kept",
                now.state,
                if now.decided_by.is_empty() {
                    "the server"
                } else {
                    &now.decided_by
                }
            ))));
        }
        self.log(
            tx,
            actor,
            "escrow.made",
            &e.volume_id,
            &format!(
                "request {id} of {} approved: volume {} generation {} on host {}, to {}; packet of {} bytes, LUKS UUID {}",
                e.requested_by,
                e.volume_name,
                e.generation,
                e.host,
                e.recipients.join(", "),
                made.packet.len(),
                made.luks_uuid
            ),
        )?;
        Ok(Ok(Self::escrow_in(tx, id)?))
    }

    /// The packet of a made request, for an admin; audited. Obsolete
    /// packets too (the entry says so).
    pub fn get_escrow_packet(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(EscrowEntry, Vec<u8>), CoreError> {
        admin(caller, "fetching an escrow packet")?;
        let actor = caller.actor();
        self.write(|tx| {
            self.expire_escrow(tx)?;
            let e = Self::escrow_in(tx, id)?;
            if e.state != EscrowState::Made {
                let what = match e.state {
                    EscrowState::Pending => format!(
                        "another admin approves it first (`guestkeyctl escrow approve {id}`)"
                    ),
                    _ => "ask again (`guestkeyctl volume escrow VOLUME --to RECIPIENT`)".into(),
                };
                return Err(CoreError::FailedPrecondition(format!(
                    "escrow request {id} is {}: it has no packet; {what}",
                    e.state
                )));
            }
            let packet = tx
                .escrow_packet(id)?
                .ok_or_else(|| CoreError::Internal(format!("escrow request {id} vanished")))?;
            self.log(
                tx,
                &actor,
                "escrow.fetched",
                &e.volume_id,
                &format!(
                    "request {id}, volume {} generation {}{}",
                    e.volume_name,
                    e.generation,
                    if e.obsolete { " (obsolete)" } else { "" }
                ),
            )?;
            Ok((e, packet))
        })
    }
}
