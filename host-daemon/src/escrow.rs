//! Escrow packets (after `volume_key`'s): for one volume, name-value
//! metadata, the volume's passphrase (its libvirt secret) and the data key
//! of its LUKS header, the whole encrypted with age to offline custodians'
//! X25519 recipients. guestkeyd makes them (in `ops`) only for
//! recipients named in its own `--escrow-recipients` file; `guestkey-recover`
//! opens them with a custodian's identity, with no server.
//!
//! The plaintext is text, one `name: value` per line, after the first line
//! [`FIRST_LINE`]; every name once, no other names, the two secret lines
//! last. Parsing is strict: anything else is refused with the line's
//! number.
//!
//! Imports nothing of this crate. Imported by: [`crate::ops`], the
//! `guestkey-recover` binary.

use std::io::{Read, Write};
use std::str::FromStr;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

/// The first line of a packet's plaintext.
pub const FIRST_LINE: &str = "guestkey escrow packet 1";
/// Most recipients a packet is encrypted to.
pub const MAX_RECIPIENTS: usize = 16;
/// Largest packet (ciphertext or plaintext) read.
pub const MAX_PACKET: usize = 256 << 10;
/// age's payload chunk (a constant of its format).
const AGE_CHUNK: usize = 64 << 10;
/// Largest recipients file read.
pub const MAX_RECIPIENTS_FILE: u64 = 64 << 10;

/// What a packet says of its volume (nothing secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The escrow request's id on the server.
    pub packet_id: String,
    /// The guestkey volume.
    pub volume_id: String,
    /// Its name.
    pub volume_name: String,
    /// The host whose guestkeyd made the packet.
    pub host: String,
    /// "qcow2" or "raw" (raw LUKS).
    pub format: String,
    /// The image's path on that host.
    pub path: String,
    /// The key generation the packet holds.
    pub generation: u64,
    /// When it was made (UTC).
    pub created: String,
    /// The admin who asked for it, and the one who approved it.
    pub requested_by: String,
    /// See `requested_by`.
    pub approved_by: String,
    /// The LUKS header's UUID.
    pub luks_uuid: String,
    /// Its payload offset, in sectors.
    pub payload_sectors: u64,
    /// Where the LUKS header is in the file.
    pub luks_offset: u64,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
}

/// A packet's plaintext: its metadata and the two secrets. Not `Clone`,
/// not `Debug`; the secrets are wiped when it is dropped.
pub struct Packet {
    /// What it says of the volume.
    pub meta: Metadata,
    /// The volume's passphrase (the libvirt secret's value).
    pub passphrase: SecretString,
    /// The LUKS data key (64 bytes, aes-xts-plain64).
    pub data_key: Zeroizing<Vec<u8>>,
}

/// What the `secret` line says a packet holds.
const HOLDS: &str = "passphrase and LUKS data key";

const NAMES: &[&str] = &[
    "packet-id",
    "volume-id",
    "volume-name",
    "host",
    "format",
    "path",
    "generation",
    "created",
    "requested-by",
    "approved-by",
    "luks-uuid",
    "payload-sectors",
    "luks-offset",
    "virtual-size",
    "secret",
    "passphrase",
    "data-key",
];

/// Why a packet or a recipient is refused; the message says what to fix
/// and never holds a secret.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EscrowError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, EscrowError> {
    Err(EscrowError(msg.into()))
}

/// A character a terminal would not show as itself: a control character,
/// or one that reorders or hides text (bidirectional overrides and
/// isolates, zero-width characters, the byte-order mark), with which a
/// packet or a label could show one volume's name and mean another.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// The header UUID of a packet: a restored header takes it, so it must be
/// one (a header guestkeyd or QEMU writes always has one).
fn uuid_field(v: &str) -> Result<String, EscrowError> {
    uuid::Uuid::parse_str(v)
        .map(|_| v.to_owned())
        .map_err(|_| EscrowError("packet field luks-uuid: not a UUID".into()))
}

fn checked_value(name: &str, v: &str) -> Result<(), EscrowError> {
    if v.chars().any(char::is_control) {
        return err(format!("packet field {name}: holds a control character"));
    }
    if v.chars().any(hidden) {
        return err(format!(
            "packet field {name}: holds a character that reorders or hides text"
        ));
    }
    if v.len() > 4096 {
        return err(format!("packet field {name}: over 4096 bytes"));
    }
    Ok(())
}

impl Packet {
    /// The plaintext, in wiped memory.
    pub fn to_text(&self) -> Result<Zeroizing<String>, EscrowError> {
        let m = &self.meta;
        let fields: [(&str, String); 15] = [
            ("packet-id", m.packet_id.clone()),
            ("volume-id", m.volume_id.clone()),
            ("volume-name", m.volume_name.clone()),
            ("host", m.host.clone()),
            ("format", m.format.clone()),
            ("path", m.path.clone()),
            ("generation", m.generation.to_string()),
            ("created", m.created.clone()),
            ("requested-by", m.requested_by.clone()),
            ("approved-by", m.approved_by.clone()),
            ("luks-uuid", m.luks_uuid.clone()),
            ("payload-sectors", m.payload_sectors.to_string()),
            ("luks-offset", m.luks_offset.to_string()),
            ("virtual-size", m.virtual_size.to_string()),
            ("secret", HOLDS.to_owned()),
        ];
        // One buffer, never grown: a grown String would free the old one
        // (holding the secrets) unwiped. Every field is bounded, so the
        // whole text is shorter than this.
        let mut out = Zeroizing::new(String::with_capacity(AGE_CHUNK));
        let capacity = out.capacity();
        out.push_str(FIRST_LINE);
        out.push('\n');
        for (name, v) in &fields {
            checked_value(name, v)?;
            out.push_str(name);
            out.push_str(": ");
            out.push_str(v);
            out.push('\n');
        }
        let p = self.passphrase.expose_secret();
        if p.is_empty() || p.chars().any(char::is_control) {
            return err("the volume's passphrase is not one line of text");
        }
        out.push_str("passphrase: ");
        out.push_str(p);
        out.push_str("\ndata-key: ");
        let hex = Zeroizing::new(hex::encode(self.data_key.as_slice()));
        out.push_str(&hex);
        out.push('\n');
        if out.capacity() != capacity || out.len() >= AGE_CHUNK {
            return err("the packet's text is too long");
        }
        Ok(out)
    }

    /// Parses a plaintext made by [`Packet::to_text`].
    pub fn from_text(text: &str) -> Result<Self, EscrowError> {
        let mut lines = text.split('\n');
        if lines.next() != Some(FIRST_LINE) {
            return err(format!(
                "not a guestkey escrow packet (its first line is not {FIRST_LINE:?})"
            ));
        }
        let mut seen: Vec<(&str, &str)> = vec![];
        for (i, line) in lines.enumerate() {
            let n = i + 2;
            if line.is_empty() {
                continue;
            }
            let Some((name, value)) = line.split_once(": ") else {
                return err(format!("packet line {n}: not `name: value`"));
            };
            if !NAMES.contains(&name) {
                return err(format!("packet line {n}: unknown field {name:?}"));
            }
            if seen.iter().any(|(s, _)| *s == name) {
                return err(format!("packet line {n}: field {name} given twice"));
            }
            checked_value(name, value)?;
            seen.push((name, value));
        }
        let get = |name: &str| -> Result<&str, EscrowError> {
            seen.iter()
                .find(|(s, _)| *s == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| EscrowError(format!("packet: no {name} field")))
        };
        let num = |name: &str| -> Result<u64, EscrowError> {
            get(name)?
                .parse()
                .map_err(|_| EscrowError(format!("packet field {name}: not a number")))
        };
        if get("secret")? != HOLDS {
            return err(format!(
                "packet: it holds {:?}, not {HOLDS:?}",
                get("secret")?
            ));
        }
        let format = get("format")?;
        if format != "qcow2" && format != "raw" {
            return err(format!(
                "packet field format: {format:?} is not qcow2 or raw"
            ));
        }
        let key_hex = get("data-key")?;
        if key_hex.len() != 128 {
            return err("packet field data-key: not 64 bytes in hex");
        }
        let mut data_key = Zeroizing::new(vec![0u8; 64]);
        hex::decode_to_slice(key_hex, data_key.as_mut_slice())
            .map_err(|_| EscrowError("packet field data-key: not hex".into()))?;
        let meta = Metadata {
            packet_id: get("packet-id")?.to_owned(),
            volume_id: get("volume-id")?.to_owned(),
            volume_name: get("volume-name")?.to_owned(),
            host: get("host")?.to_owned(),
            format: format.to_owned(),
            path: get("path")?.to_owned(),
            generation: num("generation")?,
            created: get("created")?.to_owned(),
            requested_by: get("requested-by")?.to_owned(),
            approved_by: get("approved-by")?.to_owned(),
            luks_uuid: uuid_field(get("luks-uuid")?)?,
            payload_sectors: num("payload-sectors")?,
            luks_offset: num("luks-offset")?,
            virtual_size: num("virtual-size")?,
        };
        let passphrase = get("passphrase")?;
        if passphrase.is_empty() {
            return err("packet field passphrase: empty");
        }
        Ok(Packet {
            meta,
            passphrase: SecretString::from(passphrase.to_owned()),
            data_key,
        })
    }

    /// The packet encrypted with age to `recipients`.
    pub fn seal(&self, recipients: &[age::x25519::Recipient]) -> Result<Vec<u8>, EscrowError> {
        if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
            return err(format!(
                "an escrow packet needs 1 to {MAX_RECIPIENTS} recipients"
            ));
        }
        let text = self.to_text()?;
        if text.len() >= AGE_CHUNK {
            return err("the packet's text is too long");
        }
        let e =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| EscrowError(format!("age: {e}")))?;
        let mut out = vec![];
        let mut w = e
            .wrap_output(&mut out)
            .map_err(|e| EscrowError(format!("age: {e}")))?;
        // age's writer keeps the plaintext of a chunk in a buffer that it
        // frees without wiping. Zeros up to two whole chunks make the
        // second chunk overwrite every byte of the text in that buffer
        // (the first chunk is encrypted in place, in a copy), so it is
        // freed holding only zeros. The reader drops them.
        let padding = vec![0u8; 2 * AGE_CHUNK - text.len()];
        w.write_all(text.as_bytes())
            .and_then(|()| w.write_all(&padding))
            .and_then(|()| w.finish().map(drop))
            .map_err(|e| EscrowError(format!("age: {e}")))?;
        Ok(out)
    }

    /// Opens the age-encrypted `packet` with one of `identities`.
    pub fn open(
        packet: &[u8],
        identities: &[Box<dyn age::Identity + Send + Sync>],
    ) -> Result<Self, EscrowError> {
        if packet.len() > MAX_PACKET {
            return err(format!(
                "an escrow packet is at most {MAX_PACKET} bytes: this is not one"
            ));
        }
        let d = age::Decryptor::new_buffered(packet)
            .map_err(|e| EscrowError(format!("not an age-encrypted escrow packet ({e})")))?;
        if d.is_scrypt() {
            return err(
                "the packet is encrypted to a passphrase, not to recipients: not a guestkey escrow packet",
            );
        }
        let mut r = d
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => EscrowError(
                    "none of the identities opens this packet: give the identity file of one of its recipients".into(),
                ),
                other => EscrowError(format!(
                    "the packet does not open ({other}): it was altered or damaged"
                )),
            })?;
        // One buffer, never grown (a grown one would be freed unwiped).
        let mut plain = Zeroizing::new(Vec::with_capacity(MAX_PACKET + 1));
        (&mut r)
            .take(MAX_PACKET as u64 + 1)
            .read_to_end(&mut plain)
            .map_err(|e| {
                EscrowError(format!(
                    "the packet does not open ({e}): it was altered or damaged"
                ))
            })?;
        if plain.len() > MAX_PACKET {
            return err("the packet's plaintext is too long: not a guestkey escrow packet");
        }
        let text = std::str::from_utf8(&plain)
            .map_err(|_| EscrowError("the packet's plaintext is not text".into()))?
            .trim_end_matches('\0');
        Self::from_text(text)
    }
}

/// One age X25519 recipient, as `age-keygen -y` prints it.
pub fn parse_recipient(s: &str) -> Result<age::x25519::Recipient, EscrowError> {
    age::x25519::Recipient::from_str(s.trim()).map_err(|e| {
        EscrowError(format!(
            "{:?} is not an age X25519 recipient (age1...): {e}",
            short(s)
        ))
    })
}

fn short(s: &str) -> String {
    let s: String = s.chars().filter(|&c| !hidden(c)).take(70).collect();
    s
}

/// The recipients of an `--escrow-recipients` file: one per line, `#`
/// comments and blank lines ignored, as age's `-R` files. Every bad line
/// is refused with its number.
pub fn parse_recipients_file(text: &str, shown: &str) -> Result<Vec<String>, EscrowError> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        parse_recipient(line)
            .map_err(|e| EscrowError(format!("{shown} line {}: {}", i + 1, e.0)))?;
        if !out.iter().any(|r: &String| r == line) {
            out.push(line.to_owned());
        }
    }
    Ok(out)
}

/// A passphrase read from a file for `guestkey-recover add-passphrase`:
/// its first line. Kept in wiped memory.
pub fn passphrase_line(raw: &[u8]) -> Result<Zeroizing<Vec<u8>>, EscrowError> {
    let end = raw.iter().position(|&b| b == b'\n').unwrap_or(raw.len());
    let line = &raw[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return err("the new passphrase is empty");
    }
    Ok(Zeroizing::new(line.to_vec()))
}

/// A short, non-secret name of a recipient for lists: its first and last
/// characters.
pub fn recipient_label(r: &str) -> String {
    let chars: Vec<char> = r.chars().filter(|&c| !hidden(c)).collect();
    if chars.len() <= 20 {
        return chars.into_iter().collect();
    }
    let head: String = chars[..12].iter().collect();
    let tail: String = chars[chars.len() - 6..].iter().collect();
    format!("{head}...{tail}")
}

/// Base64 of bytes, for messages that show a packet's size or digest.
pub fn digest_of(packet: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&Sha256::digest(packet)[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> Packet {
        Packet {
            meta: Metadata {
                packet_id: "es-0123456789ab".into(),
                volume_id: "6f1c1f3e-4a7b-4c55-9f0e-2d8f5b1a9c11".into(),
                volume_name: "db-disk".into(),
                host: "kvm1".into(),
                format: "qcow2".into(),
                path: "/var/lib/libvirt/images/db-disk.qcow2".into(),
                generation: 3,
                created: "2026-12-03 18:00:00Z".into(),
                requested_by: "alice".into(),
                approved_by: "bob".into(),
                luks_uuid: "0f0e0d0c-0b0a-4908-8706-050403020100".into(),
                payload_sectors: 4040,
                luks_offset: 327_680,
                virtual_size: 1 << 30,
            },
            passphrase: SecretString::from(
                "c2VjcmV0LXBhc3NwaHJhc2UtZm9yLXRlc3RzLW9ubHk".to_owned(),
            ),
            data_key: Zeroizing::new((0u8..64).collect()),
        }
    }

    fn ids(i: &age::x25519::Identity) -> Vec<Box<dyn age::Identity + Send + Sync>> {
        vec![Box::new(i.clone())]
    }

    #[test]
    fn a_packet_opens_with_any_recipients_identity_only() {
        let (a, b, c) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let sealed = packet().seal(&[a.to_public(), b.to_public()]).unwrap();
        for who in [&a, &b] {
            let p = Packet::open(&sealed, &ids(who)).unwrap();
            assert_eq!(p.meta, packet().meta);
            assert_eq!(
                p.passphrase.expose_secret(),
                packet().passphrase.expose_secret()
            );
            assert!(p.data_key == packet().data_key);
        }
        let e = Packet::open(&sealed, &ids(&c)).err().unwrap().0;
        assert!(
            e.contains("none of the identities opens this packet"),
            "{e}"
        );
        // No secret in the ciphertext.
        let hay = String::from_utf8_lossy(&sealed);
        assert!(!hay.contains("c2VjcmV0"));
        assert!(!hay.contains("db-disk"), "the metadata is encrypted too");
    }

    #[test]
    fn a_tampered_or_foreign_packet_is_refused() {
        let a = age::x25519::Identity::generate();
        let sealed = packet().seal(&[a.to_public()]).unwrap();
        // Every byte of the payload is authenticated.
        for at in [sealed.len() - 1, sealed.len() / 2 + 40] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            let e = Packet::open(&bad, &ids(&a)).err().unwrap().0;
            assert!(
                e.contains("altered or damaged") || e.contains("not an age"),
                "{e}"
            );
        }
        let e = Packet::open(b"hello", &ids(&a)).err().unwrap().0;
        assert!(e.contains("not an age-encrypted escrow packet"), "{e}");
        let e = Packet::open(&vec![0u8; MAX_PACKET + 1], &ids(&a))
            .err()
            .unwrap()
            .0;
        assert!(e.contains("at most"), "{e}");
        // An age file that is not a packet.
        let e =
            age::Encryptor::with_recipients(std::iter::once(&a.to_public() as &dyn age::Recipient))
                .unwrap();
        let mut other = vec![];
        let mut w = e.wrap_output(&mut other).unwrap();
        w.write_all(b"just a file\n").unwrap();
        w.finish().unwrap();
        let e = Packet::open(&other, &ids(&a)).err().unwrap().0;
        assert!(e.contains("not a guestkey escrow packet"), "{e}");
    }

    #[test]
    fn the_text_form_is_parsed_strictly() {
        let text = packet().to_text().unwrap();
        let ok = Packet::from_text(&text).unwrap();
        assert_eq!(ok.meta, packet().meta);
        let cases: Vec<(String, &str)> = vec![
            (
                text.replace("generation: 3", "generation: three"),
                "generation: not a number",
            ),
            (text.replace("host: kvm1\n", ""), "no host field"),
            (
                text.replace("luks-uuid: 0f0e0d0c-", "luks-uuid: zz"),
                "luks-uuid: not a UUID",
            ),
            (
                text.replace("host: kvm1\n", "host: kvm1\nhost: kvm2\n"),
                "given twice",
            ),
            (
                text.replace("host: kvm1\n", "host: kvm1\ncolour: blue\n"),
                "unknown field",
            ),
            (
                text.replace("format: qcow2", "format: vmdk"),
                "not qcow2 or raw",
            ),
            (
                text.replace("guestkey escrow packet 1", "guestkey escrow packet 2"),
                "first line",
            ),
            (text.replace("host: kvm1", "host kvm1"), "not `name: value`"),
            (
                text.replace("secret: passphrase and LUKS data key", "secret: passphrase"),
                "it holds",
            ),
        ];
        for (bad, want) in cases {
            let e = Packet::from_text(&bad).err().unwrap().0;
            assert!(e.contains(want), "{want}: {e}");
            assert!(!e.contains("c2VjcmV0"), "no secret in an error: {e}");
        }
        let key_line = format!("data-key: {}", hex::encode((0u8..64).collect::<Vec<_>>()));
        let e = Packet::from_text(&text.replace(&key_line, "data-key: 00ff"))
            .err()
            .unwrap()
            .0;
        assert!(e.contains("not 64 bytes"), "{e}");
        let mut p = packet();
        p.meta.volume_name = "a\nb".into();
        assert!(p.to_text().err().unwrap().0.contains("control character"));
        for c in ['\u{202E}', '\u{2067}', '\u{200B}', '\u{FEFF}', '\u{061C}'] {
            let mut p = packet();
            p.meta.volume_name = format!("db{c}gpj.2mocq");
            let e = p.to_text().err().unwrap().0;
            assert!(e.contains("reorders or hides"), "{c:?}: {e}");
            let e = Packet::from_text(&text.replace("volume-name: ", &format!("volume-name: {c}")))
                .err()
                .unwrap()
                .0;
            assert!(e.contains("reorders or hides"), "{c:?}: {e}");
            assert_eq!(recipient_label(&format!("age1{c}x")), "age1x");
        }
    }

    #[test]
    fn a_recipients_file_names_each_bad_line() {
        let a = age::x25519::Identity::generate().to_public().to_string();
        let b = age::x25519::Identity::generate().to_public().to_string();
        let text = format!("# custodians\n\n{a}\n  {b}  \n{a}\n");
        assert_eq!(
            parse_recipients_file(&text, "r").unwrap(),
            vec![a.clone(), b]
        );
        let e = parse_recipients_file(&format!("{a}\nage1nope\n"), "r")
            .err()
            .unwrap()
            .0;
        assert!(e.starts_with("r line 2: "), "{e}");
        let e = parse_recipient("AGE-SECRET-KEY-1XYZ").err().unwrap().0;
        assert!(e.contains("not an age X25519 recipient"), "{e}");
        assert!(passphrase_line(b"\n").is_err());
        assert_eq!(
            passphrase_line(b"pass word\r\nrest").unwrap().as_slice(),
            b"pass word"
        );
    }
}
