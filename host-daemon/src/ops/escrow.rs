//! Escrow packets (`guestkeyctl volume escrow`): the volume's passphrase
//! and its header's data key, with the metadata a recovery checks, sealed
//! with age to recipients that this host's own `--escrow-recipients` file
//! names. The server asks (after its two-person rule); it cannot name a
//! recipient of its own, so no online party can read a packet. Changes
//! nothing on the host.

use secrecy::SecretString;

use super::requests::EscrowPacket;
use super::{Daemon, OpsError};
use std::path::Path;

use crate::escrow::{
    EscrowError, MAX_RECIPIENTS_FILE, Metadata, Packet, parse_recipient, parse_recipients_file,
};
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

/// Reads an `--escrow-recipients` file. It must be a regular file (not a
/// link) that only root can write: whoever can write it chooses who can
/// read the keys of this host's volumes.
pub fn load_recipients_file(path: &Path) -> Result<Vec<String>, EscrowError> {
    use crate::image::fs::SafeDir;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| EscrowError(format!("cannot resolve --escrow-recipients {shown}: {e}")))?
            .join(path)
    };
    // The directory is opened by descriptor, without following a link
    // someone other than root planted, and the file in it by that
    // descriptor: no path is walked twice.
    let (dir, name) = SafeDir::of_file(&absolute.to_string_lossy())
        .map_err(|e| EscrowError(format!("cannot open --escrow-recipients {shown}: {e}")))?;
    match dir
        .first_untrusted_ancestor()
        .map_err(|e| EscrowError(format!("cannot check --escrow-recipients {shown}: {e}")))?
    {
        Some(d) if d == dir.path() => {
            return refuse(format!(
                "the directory of --escrow-recipients {shown} must be owned by root and writable by no one else"
            ));
        }
        Some(d) => {
            return refuse(format!(
                "--escrow-recipients {shown} is below {}, which a user other than root can change (not root's, or writable by others and not sticky): keep the file in a directory chain only root can write",
                d.display()
            ));
        }
        None => {}
    }
    let f = dir
        .open_file(&name, false)
        .map_err(|e| EscrowError(format!("cannot open --escrow-recipients {shown}: {e}")))?;
    let m = f
        .metadata()
        .map_err(|e| EscrowError(format!("cannot inspect {shown}: {e}")))?;
    if !m.is_file() {
        return refuse(format!("--escrow-recipients {shown} is not a regular file"));
    }
    if m.uid() != 0 || m.mode() & 0o022 != 0 {
        return refuse(format!(
            "--escrow-recipients {shown} must be owned by root and writable by no one else (chown root {shown}; chmod go-w {shown})"
        ));
    }
    if m.len() > MAX_RECIPIENTS_FILE {
        return refuse(format!("--escrow-recipients {shown} is over 64 KiB"));
    }
    let mut text = String::new();
    (&f).take(MAX_RECIPIENTS_FILE)
        .read_to_string(&mut text)
        .map_err(|e| EscrowError(format!("cannot read {shown}: {e}")))?;
    let list = parse_recipients_file(&text, &shown.to_string())?;
    if list.is_empty() {
        return refuse(format!("--escrow-recipients {shown} names no recipient"));
    }
    Ok(list)
}

fn refuse<T>(msg: String) -> Result<T, EscrowError> {
    Err(EscrowError(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipients_file_others_can_write_or_a_link_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gk-escrow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.join("recipients");
        let a = age::x25519::Identity::generate().to_public().to_string();
        std::fs::write(&f, format!("{a}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_recipients_file(&f).unwrap(), vec![a.clone()]);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load_recipients_file(&f).err().unwrap().0;
        assert!(e.contains("writable by no one else"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let l = dir.join("link");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let e = load_recipients_file(&l).err().unwrap().0;
        assert!(e.contains("is a symbolic link, not a regular file"), "{e}");
        // A second name of the file elsewhere: refused.
        let h = dir.join("hard");
        std::fs::hard_link(&f, &h).unwrap();
        let e = load_recipients_file(&f).err().unwrap().0;
        assert!(e.contains("other hard links"), "{e}");
        std::fs::remove_file(&h).unwrap();
        // A directory group or others can write, the file's own or one
        // above it (unless sticky, as /tmp itself is): refused, naming it.
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(&dir, 0o775).unwrap();
        let e = load_recipients_file(&f).err().unwrap().0;
        assert!(e.contains("the directory of --escrow-recipients"), "{e}");
        let inner = dir.join("inner");
        std::fs::create_dir(&inner).unwrap();
        mode(&inner, 0o755).unwrap();
        let g = inner.join("recipients");
        std::fs::write(&g, format!("{a}\n")).unwrap();
        mode(&g, 0o644).unwrap();
        let e = load_recipients_file(&g).err().unwrap().0;
        assert!(
            e.contains(&format!(
                "is below {}, which a user other than root",
                dir.display()
            )),
            "{e}"
        );
        mode(&dir, 0o1777).unwrap();
        assert_eq!(load_recipients_file(&g).unwrap(), vec![a.clone()]);
        mode(&dir, 0o755).unwrap();
        std::fs::write(&f, "# nobody\n").unwrap();
        let e = load_recipients_file(&f).err().unwrap().0;
        assert!(e.contains("names no recipient"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
