//! The hook socket's protocol, in one place for both ends: the hook writes
//! a [`Request`] line, guestkeyd parses it back and answers one line, `ok`
//! or `error MESSAGE`. No request or answer carries a key.
//!
//! ```text
//! prepare DOMAIN-UUID [DISK...]
//! release DOMAIN-UUID [DISK...]
//! DISK = SECRET-UUID,TARGET,SOURCE
//! SOURCE = f<hex of the file or device path> | v<hex of the pool>.<hex of the volume> | (empty)
//! ```
//!
//! UUIDs are accepted in one spelling only, lower-case 8-4-4-4-12 as
//! libvirt writes them: another spelling would match nothing on the other
//! side and could answer `ok` for a guest whose keys were never looked at.
//! Paths are hex-encoded so that no byte of a path can split a line or a
//! word.

use std::fmt::Write as _;

/// The longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// What the hook asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// QEMU is about to open the disks: load their secrets.
    Prepare,
    /// QEMU has them (or the start failed): remove the secrets.
    Release,
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file or block device.
    Path(String),
    /// A volume of a storage pool.
    Volume {
        /// The pool.
        pool: String,
        /// The volume's name.
        volume: String,
    },
    /// Not known (a network disk, say).
    Unknown,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => f.write_str(p),
            Self::Volume { pool, volume } => write!(f, "volume {volume} of pool {pool}"),
            Self::Unknown => f.write_str("its source"),
        }
    }
}

/// An encrypted disk of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The libvirt secret its `<encryption>` names (canonical UUID).
    pub secret: String,
    /// Its `<target dev>`.
    pub target: String,
    /// Its image.
    pub source: Source,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// The domain's UUID (canonical).
    pub domain: String,
    /// Its encrypted disks.
    pub disks: Vec<Disk>,
}

/// `value` if it is a UUID in canonical form; what is wrong otherwise.
pub fn canonical_uuid(what: &str, value: &str) -> Result<String, String> {
    match uuid::Uuid::try_parse(value) {
        Ok(u) if u.hyphenated().to_string() == value => Ok(value.to_owned()),
        Ok(_) => Err(format!(
            "{what} {value:?} is not in canonical form: write it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx in lower case"
        )),
        Err(_) => Err(format!("{what} {value:?} is not a UUID")),
    }
}

fn hex(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(what: &str, s: &str) -> Result<String, String> {
    let bad = || format!("the {what} is not lower-case hex of UTF-8 text");
    if !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(format!("the {what} is empty or holds control characters"));
    }
    Ok(text)
}

fn valid_target(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Request {
    /// The request as one line (without the newline).
    pub fn line(&self) -> String {
        let mut out = String::from(match self.op {
            Op::Prepare => "prepare ",
            Op::Release => "release ",
        });
        out.push_str(&self.domain);
        for d in &self.disks {
            let source = match &d.source {
                Source::Path(p) => format!("f{}", hex(p)),
                Source::Volume { pool, volume } => format!("v{}.{}", hex(pool), hex(volume)),
                Source::Unknown => String::new(),
            };
            let _ = write!(out, " {},{},{source}", d.secret, d.target);
        }
        out
    }

    /// Parses a request line; the error says what is wrong.
    pub fn parse(line: &str) -> Result<Self, String> {
        if line.len() > MAX_LINE {
            return Err(format!("the request is longer than {MAX_LINE} bytes"));
        }
        let mut words = line.split_ascii_whitespace();
        let op = match words.next() {
            Some("prepare") => Op::Prepare,
            Some("release") => Op::Release,
            _ => {
                return Err(
                    "unknown request: the hook socket takes only `prepare` and `release`".into(),
                );
            }
        };
        let domain = canonical_uuid(
            "domain UUID",
            words.next().ok_or("no domain UUID in the request")?,
        )?;
        let mut disks = Vec::new();
        for w in words {
            let mut parts = w.splitn(3, ',');
            let secret = canonical_uuid("secret UUID", parts.next().unwrap_or_default())?;
            let (target, source) = match (parts.next(), parts.next()) {
                (Some(t), Some(s)) => (t, s),
                _ => return Err(format!("disk {w:?} is not SECRET,TARGET,SOURCE")),
            };
            if !valid_target(target) {
                return Err(format!(
                    "disk target {target:?} is not a device name like vda"
                ));
            }
            let source = match source.as_bytes().first() {
                None => Source::Unknown,
                Some(b'f') => Source::Path(unhex("disk path", &source[1..])?),
                Some(b'v') => {
                    let (p, v) = source[1..]
                        .split_once('.')
                        .ok_or("a volume source is v<pool>.<volume>")?;
                    Source::Volume {
                        pool: unhex("pool", p)?,
                        volume: unhex("volume", v)?,
                    }
                }
                Some(_) => {
                    return Err(format!(
                        "disk source {source:?} is not f<path> or v<pool>.<volume>"
                    ));
                }
            };
            disks.push(Disk {
                secret,
                target: target.to_owned(),
                source,
            });
        }
        if disks.len() > 256 {
            return Err("more than 256 encrypted disks".into());
        }
        Ok(Self { op, domain, disks })
    }

    /// The secret UUIDs the disks name.
    pub fn secrets(&self) -> std::collections::BTreeSet<String> {
        self.disks.iter().map(|d| d.secret.clone()).collect()
    }
}

/// Checks shared by the fuzz target (`virt-plugin/fuzz`) and the unit
/// tests: any line either is refused, or parses to a request whose own line
/// parses back to the same request.
#[cfg(any(test, fuzzing))]
pub mod fuzzing {
    use super::Request;

    /// Returns whether `data` parsed.
    pub fn request_roundtrip(data: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(data) else {
            return false;
        };
        match Request::parse(text) {
            Ok(r) => {
                let again =
                    Request::parse(&r.line()).unwrap_or_else(|e| panic!("own line refused: {e}"));
                assert_eq!(again, r, "the line does not parse back to the request");
                true
            }
            Err(e) => {
                assert!(!e.is_empty());
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const S: &str = "aaaaaaaa-0000-0000-0000-000000000001";

    #[test]
    fn requests_round_trip_with_any_path() {
        let r = Request {
            op: Op::Prepare,
            domain: D.into(),
            disks: vec![
                Disk {
                    secret: S.into(),
                    target: "vda".into(),
                    source: Source::Path("/a b,c\\nd/é".into()),
                },
                Disk {
                    secret: S.into(),
                    target: "vdb".into(),
                    source: Source::Volume {
                        pool: "p.1".into(),
                        volume: "v".into(),
                    },
                },
                Disk {
                    secret: S.into(),
                    target: "sda".into(),
                    source: Source::Unknown,
                },
            ],
        };
        assert_eq!(Request::parse(&r.line()).unwrap(), r);
        assert!(!r.line().contains(' ') || r.line().split(' ').count() == 5);
    }

    #[test]
    fn bad_requests_are_refused_with_what_is_wrong() {
        for (line, want) in [
            ("", "unknown request"),
            ("start x", "unknown request"),
            ("prepare", "no domain UUID"),
            ("prepare not-a-uuid", "not a UUID"),
            (
                "prepare 1B4E28BA-2FA1-11D2-883F-0016D3CCA427",
                "canonical form",
            ),
            ("release 1b4e28ba2fa111d2883f0016d3cca427", "canonical form"),
            (
                &format!("prepare {D} {}", S.to_uppercase()),
                "canonical form",
            ),
            (&format!("prepare {D} {{{S}}},vda,"), "canonical form"),
            (&format!("prepare {D} {S}"), "SECRET,TARGET,SOURCE"),
            (&format!("prepare {D} {S},v/a,"), "device name"),
            (&format!("prepare {D} {S},vda,fzz"), "hex"),
            (&format!("prepare {D} {S},vda,f0a"), "control characters"),
            (&format!("prepare {D} {S},vda,v70"), "v<pool>.<volume>"),
            (&format!("prepare {D} {S},vda,x70"), "f<path>"),
        ] {
            let e = Request::parse(line)
                .err()
                .unwrap_or_else(|| panic!("{line:?} accepted"));
            assert!(e.contains(want), "{line:?}: {e}");
        }
        assert!(
            Request::parse(&"x".repeat(MAX_LINE + 1))
                .unwrap_err()
                .contains("longer")
        );
    }

    #[test]
    fn fuzz_seeds_round_trip() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/request");
        let mut parsed = 0;
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            seen += 1;
            parsed += usize::from(fuzzing::request_roundtrip(
                &std::fs::read(e.unwrap().path()).unwrap(),
            ));
        }
        assert!(
            seen >= 4 && parsed >= 2,
            "seeds in {}: {seen} seen, {parsed} parsed",
            dir.display()
        );
    }
}
