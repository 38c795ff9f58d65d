//! A verifier's side of split keys (`guestkey-server run --role
//! verifier`): the other half of each split volume key, released to a host
//! only after this server's own attestation of it.
//!
//! The management server keeps one half (U) of a split volume's
//! passphrase, the verifier the other (V); the passphrase is
//! base64url(U xor V) (`xdr_wipe::packet::combine_halves`), so neither
//! database alone holds it. The verifier never calls hosts: a host asks
//! for a challenge ([`Core::half_challenge`]: a fresh nonce, kept for a
//! minute, and the PCRs this server's allowlist for it names), quotes with
//! its attestation key (which this server pinned at the host's own
//! enrollment here, by its own credential), and sends the quote with the
//! halves it wants ([`Core::release_halves`]). The quote is checked as the
//! management server checks its own (signature with the pinned AK, nonce,
//! selection, digest, clock, allowlist), recorded and audited; only then
//! is each half released, sealed to the host, each release audited first.
//!
//! A half is made at the first request for its volume and generation and
//! bound to the host that asked: no other host ever gets it. The volume's
//! host asks when it creates the volume and at each start. When the host
//! removes a volume or finishes a rekey it asks the verifier to destroy
//! the halves it no longer needs ([`Core::forget_halves`]).

use std::sync::Arc;

use xdr_wipe::packet::{CipherParams, KeyPacket, Mechanism, VolumeFormat, VolumeId};

use crate::domain::agent::{QuoteAnswer, SealedKey};
use crate::domain::attest::QuoteFrom;
use crate::domain::hosts::enrolled_in;
use crate::domain::release::seal_for;
use crate::domain::{Core, now_unix};
use crate::model::{CoreError, InvalidInput};
use crate::store::WrappedKey;

/// How long a challenge's nonce may be answered.
const CHALLENGE_SECS: i64 = 60;
/// Unanswered challenges kept per host.
const CHALLENGES_KEPT: u32 = 16;
/// Halves one request may ask for.
pub const MAX_HALVES: usize = 64;

/// The master key's wrapping of a half is bound to this name, so that a
/// half can never pass for a volume key of the same id.
pub(crate) fn wrap_name(volume: &str) -> String {
    format!("half:{volume}")
}

fn volume_uuid(text: &str) -> Result<uuid::Uuid, CoreError> {
    uuid::Uuid::parse_str(text).map_err(|_| {
        InvalidInput {
            what: "volume id",
            value: text.chars().take(64).collect(),
            why: "not a volume UUID".into(),
        }
        .into()
    })
}

/// A half a host asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Volume UUID.
    pub volume_id: String,
    /// Key generation.
    pub generation: u64,
}

impl Core {
    /// A challenge for `host`: a fresh 32-byte nonce, good for one
    /// [`Core::release_halves`] within a minute, and the PCRs to quote.
    pub fn half_challenge(&self, host: &str) -> Result<([u8; 32], Vec<u8>), CoreError> {
        let (_, allow, _) = self.attestation_plan(host)?;
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce)
            .map_err(|e| CoreError::Internal(format!("no random bytes: {e}")))?;
        let now = now_unix();
        self.write(|tx| {
            enrolled_in(tx, host)?;
            tx.prune_half_challenges(host, now - CHALLENGE_SECS, CHALLENGES_KEPT - 1)?;
            tx.insert_half_challenge(&hex::encode(nonce), host, now)?;
            Ok(())
        })?;
        let mut pcrs: Vec<u8> = allow.values.iter().map(|(p, _)| *p).collect();
        pcrs.dedup();
        Ok((nonce, pcrs))
    }

    /// Checks `host`'s quote for `nonce`, then releases the halves it
    /// wants, each sealed to it. A half not made yet is made here and
    /// bound to `host`; one bound to another host refuses the request.
    pub async fn release_halves(
        self: &Arc<Self>,
        host: &str,
        nonce: &[u8],
        answer: QuoteAnswer,
        wanted: Vec<Wanted>,
    ) -> Result<Vec<SealedKey>, CoreError> {
        if wanted.is_empty() || wanted.len() > MAX_HALVES {
            return Err(InvalidInput {
                what: "halves",
                value: wanted.len().to_string(),
                why: format!("ask for 1 to {MAX_HALVES} halves at once"),
            }
            .into());
        }
        for w in &wanted {
            volume_uuid(&w.volume_id)?;
            if w.generation == 0 {
                return Err(InvalidInput {
                    what: "generation",
                    value: "0".into(),
                    why: format!("volume {}: key generations start at 1", w.volume_id),
                }
                .into());
            }
        }
        let nonce: [u8; 32] = nonce.try_into().map_err(|_| InvalidInput {
            what: "nonce",
            value: format!("{} bytes", nonce.len()),
            why: "a challenge's nonce is 32 bytes (HostApi.HalfChallenge)".into(),
        })?;
        // The nonce once, and only for the host it was issued to.
        let (h, n) = (host.to_owned(), hex::encode(nonce));
        let issued = self
            .blocking(move |c| c.write(|tx| Ok(tx.take_half_challenge(&n, &h)?)))
            .await?;
        let issued = match issued {
            Some(t) if now_unix() - t <= CHALLENGE_SECS => t,
            Some(_) => {
                return Err(CoreError::Unattested(format!(
                    "host {host}'s challenge is older than {CHALLENGE_SECS} s: ask for a new one"
                )));
            }
            None => {
                return Err(CoreError::Unattested(format!(
                    "that nonce was not issued to host {host}, or was used already (a replayed quote?)"
                )));
            }
        };
        self.attest_with(host, issued, &nonce, QuoteFrom::Sent(answer))
            .await?;
        let h = host.to_owned();
        self.blocking(move |c| c.release_halves_now(&h, &wanted))
            .await
    }

    pub(crate) fn release_halves_now(
        &self,
        host: &str,
        wanted: &[Wanted],
    ) -> Result<Vec<SealedKey>, CoreError> {
        self.write(|tx| {
            let enrolled = enrolled_in(tx, host)?;
            self.require_attested(tx, host)?;
            self.take_releases(host, wanted.len() as u32)?;
            let mut out = Vec::with_capacity(wanted.len());
            for w in wanted {
                let name = wrap_name(&w.volume_id);
                let existing = tx.key_half(&w.volume_id, w.generation)?;
                if let Some((bound, _)) = &existing {
                    if bound != host {
                        return Err(CoreError::Denied(format!(
                            "the half of volume {} generation {} is bound to host {bound}: this verifier releases it to that host only",
                            w.volume_id, w.generation
                        )));
                    }
                }
                let (made, kept) = match existing {
                    Some((_, wrapped)) => (None, Some(wrapped)),
                    None => {
                        let half = self.new_half()?;
                        let wrapped = {
                            let master = self.keys.current(tx)?;
                            WrappedKey {
                                master_key_id: master.id().to_owned(),
                                wrapped: master.wrap(&name, w.generation, &half),
                            }
                        };
                        tx.insert_key_half(&w.volume_id, w.generation, host, &wrapped, now_unix())?;
                        self.log(
                            tx,
                            &format!("host:{host}"),
                            "half.created",
                            &w.volume_id,
                            &format!("generation {} bound to host {host}", w.generation),
                        )?;
                        (Some(half), None)
                    }
                };
                // The record first, then the clear half (as for any key).
                self.log(
                    tx,
                    "server",
                    "half.released",
                    &w.volume_id,
                    &format!("generation {} sealed to host {host}", w.generation),
                )?;
                let half = match (made, kept) {
                    (Some(h), _) => h,
                    (None, Some(wrapped)) => self
                        .keys
                        .current(tx)?
                        .unwrap_key(&name, w.generation, &wrapped.master_key_id, &wrapped.wrapped)
                        .map_err(|e| CoreError::Internal(e.to_string()))?,
                    (None, None) => {
                        return Err(CoreError::Internal(format!(
                            "volume {}: neither a new nor a kept half",
                            w.volume_id
                        )));
                    }
                };
                let uuid = volume_uuid(&w.volume_id)?;
                let mut packet = KeyPacket::passphrase(
                    VolumeId(uuid),
                    w.generation,
                    // The host takes the parameters from the management
                    // server's half.
                    CipherParams::aes_xts(VolumeFormat::Qcow2),
                    half,
                );
                packet.mechanism = Mechanism::QemuLuksPassphraseHalf;
                // The clear half is wiped when `packet` drops, right here.
                out.push(seal_for(&packet, &enrolled).map_err(CoreError::Internal)?);
            }
            Ok(out)
        })
    }

    /// `host` removed `volume_id` or rekeyed it: its halves below
    /// generation `below` (0: all) are destroyed. Returns how many.
    pub fn forget_halves(&self, host: &str, volume_id: &str, below: u64) -> Result<u32, CoreError> {
        volume_uuid(volume_id)?;
        self.write(|tx| {
            enrolled_in(tx, host)?;
            let n = tx.delete_key_halves(volume_id, host, below)?;
            if n > 0 {
                let which = if below == 0 {
                    "all generations".to_owned()
                } else {
                    format!("generations below {below}")
                };
                self.log(
                    tx,
                    &format!("host:{host}"),
                    "half.destroyed",
                    volume_id,
                    &format!("{n} half(s), {which}, at host {host}'s request"),
                )?;
            }
            Ok(n)
        })
    }
}
