//! Escrow packets (`guestkeyctl volume escrow`): the volume's passphrase
//! and its header's data key, with the metadata a recovery checks, sealed
//! with age to recipients that this host's own `--escrow-recipients` file
//! names. The server asks (after its two-person rule); it cannot name a
//! recipient of its own, so no online party can read a packet. Changes
//! nothing on the host.

use secrecy::SecretString;

use super::requests::EscrowPacket;
use super::{Daemon, OpsError};
use crate::escrow::{Metadata, Packet, parse_recipient};
use crate::model::{Format, InvalidInput};

/// What an escrow packet call returns: the age ciphertext and the LUKS
/// header's UUID.
pub struct Escrowed {
    /// age ciphertext.
    pub packet: Vec<u8>,
    /// The header's UUID.
    pub luks_uuid: String,
}

/// Unix seconds now, as UTC text (`2026-12-01 09:30:00Z`).
fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

impl Daemon {
    /// Sets the recipients this host makes escrow packets for (from
    /// `--escrow-recipients`; none: no packets).
    pub fn set_escrow_recipients(&self, recipients: Vec<String>) {
        if self.escrow_recipients.set(recipients).is_err() {
            tracing::warn!("the escrow recipients were set twice; the first ones stay");
        }
    }

    /// Makes an escrow packet of a volume of this host.
    pub fn make_escrow_packet(&self, r: EscrowPacket) -> Result<Escrowed, OpsError> {
        let host = self.keys.host.to_string();
        let Some(allowed) = self.escrow_recipients.get() else {
            return Err(OpsError::Precondition(format!(
                "guestkeyd on host {host} makes no escrow packets: start it with --escrow-recipients FILE naming the custodians' age recipients"
            )));
        };
        let mut recipients = vec![];
        for text in &r.recipients {
            if !allowed.iter().any(|a| a == text) {
                return Err(OpsError::Invalid(InvalidInput(format!(
                    "recipient {} is not in host {host}'s --escrow-recipients file: this host seals packets only to the custodians named there",
                    crate::escrow::recipient_label(text)
                ))));
            }
            recipients
                .push(parse_recipient(text).map_err(|e| OpsError::Invalid(InvalidInput(e.0)))?);
        }
        let vid = r.volume;
        let registered = || -> Result<crate::model::VolumeEntry, OpsError> {
            let vols = self.store.volumes()?;
            vols.get(&vid.to_string()).cloned().ok_or_else(|| {
                OpsError::Precondition(format!("volume {vid} is not registered on host {host}"))
            })
        };
        // Before the key is opened (a split key asks the verifier).
        registered()?;
        let key = self.open_key(&r.key.sealed, vid, r.key.generation)?;
        let format = Format::of_packet(key.params.format);
        // Not while a change (a rekey, a delete) is under way on the host.
        let _guard = self.lock();
        let v = registered()?;
        let passphrase = std::str::from_utf8(key.secret.expose_secret())
            .map_err(|_| OpsError::Internal("the volume's key is not text".into()))?;
        let facts = self
            .images
            .header_key(&v.path, format, key.secret.expose_secret())?;
        let packet = Packet {
            meta: Metadata {
                packet_id: r.packet_id,
                volume_id: vid.to_string(),
                volume_name: r.volume_name,
                host: r.host_name,
                format: format.as_str().to_owned(),
                path: v.path.clone(),
                generation: key.generation,
                created: now_utc(),
                requested_by: r.requested_by,
                approved_by: r.approved_by,
                luks_uuid: facts.uuid.clone(),
                payload_sectors: facts.payload_sectors,
                luks_offset: facts.region.0,
                virtual_size: facts.virtual_size,
            },
            passphrase: SecretString::from(passphrase.to_owned()),
            data_key: facts.data_key,
        };
        let sealed = packet
            .seal(&recipients)
            .map_err(|e| OpsError::Internal(e.0))?;
        tracing::info!(volume = %vid, generation = key.generation, recipients = recipients.len(), "escrow packet made");
        Ok(Escrowed {
            packet: sealed,
            luks_uuid: facts.uuid,
        })
    }
}
