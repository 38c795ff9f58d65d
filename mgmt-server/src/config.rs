//! Server configuration: a TOML file (`--config FILE`), overridden by flags.
//!
//! ```toml
//! listen = "127.0.0.1:7443"          # where the admin and host APIs listen
//! data_dir = "/var/lib/guestkey"     # the data directory made by `init`
//! master_key_source = "file:/var/lib/guestkey/master.key"  # or env:VAR, prompt
//! database = "postgres://guestkey@db.example:5432/guestkey"  # else what init recorded
//! url = "https://kms2.example:7443"  # where hosts reach this replica (PostgreSQL)
//! role = "management"                # or "verifier": keeps the other halves of split keys
//!
//! [limits]
//! max_volumes_per_host = 10000       # volumes one host may be assigned
//! key_releases_per_minute = 1000     # key packets released to one host per minute
//!
//! [attestation]
//! ek_ca_file = "/etc/guestkey/ek-ca.pem"  # TPMs enroll only with an EK certificate one of these CAs signed
//!
//! [retry]                            # failed pushes
//! initial_delay_ms = 500
//! max_delay_ms = 60000
//! max_attempts = 10                  # answered failures before an operation is given up
//! ```
//! Unknown keys are errors, so a typo does not silently keep a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::masterkey::MasterKeySource;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// Limits applied per host.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Volumes one host may be assigned.
    pub max_volumes_per_host: u32,
    /// Key packets released to one host per minute.
    pub key_releases_per_minute: u32,
    /// How long a host's passed attestation lets keys of `attested`
    /// volumes go to it (every flow that releases them attests the host
    /// right before; this bounds what a stalled check could leave trusted).
    pub attestation_max_age_secs: u32,
    /// How long a start whose keys need an operator's approval waits for
    /// it before it fails naming the request (the request stays open).
    pub approval_wait_secs: u32,
    /// How long a request stays open (pending, or approved and unused)
    /// before it expires.
    pub approval_valid_secs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_volumes_per_host: 10_000,
            key_releases_per_minute: 1000,
            attestation_max_age_secs: 120,
            approval_wait_secs: 120,
            approval_valid_secs: 3600,
        }
    }
}

/// A database URL as given (`--database`, `database =`). It may carry a
/// password, so its `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    /// The URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

/// `[leader]`: the lease of the replica that leads (several replicas on
/// PostgreSQL; see `domain::leader`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Leader {
    /// Lifetime of the lease from its last renewal: how long the replicas
    /// wait for a leader that stopped answering before another takes over.
    pub lease_ms: u64,
    /// Time between renewals (at most a third of `lease_ms`).
    pub renew_ms: u64,
}

impl Default for Leader {
    fn default() -> Self {
        Self {
            lease_ms: 10_000,
            renew_ms: 2_000,
        }
    }
}

/// Retry policy for pushes to host daemons.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// First delay after a failed push.
    pub initial_delay_ms: u64,
    /// Longest delay (the delay doubles up to this).
    pub max_delay_ms: u64,
    /// A pending operation is given up (state `failed`, with the reason)
    /// after this many failed attempts that the host answered (or the
    /// server could not prepare). An unreachable host is retried without
    /// limit, and no key is released while it cannot be reached.
    pub max_attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            initial_delay_ms: 500,
            max_delay_ms: 60_000,
            max_attempts: 10,
        }
    }
}

/// The file's contents; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    master_key_source: Option<String>,
    role: Option<String>,
    database: Option<String>,
    url: Option<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    retry: Retry,
    #[serde(default)]
    leader: Leader,
    #[serde(default)]
    attestation: AttestationFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    console: ConsoleFile,
}

/// `[console]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleFile {
    listen: Option<String>,
    session_idle_secs: Option<u64>,
}

/// The web console's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Console {
    /// Where it is served, over HTTPS with the server's certificate.
    pub listen: SocketAddr,
    /// A login session ends after this long without a request.
    pub session_idle_secs: u64,
}

/// `[metrics]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<String>,
}

/// `[attestation]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestationFile {
    ek_ca_file: Option<PathBuf>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Master key source.
    pub master_key_source: MasterKeySource,
    /// Per-host limits.
    pub limits: Limits,
    /// Push retry policy.
    pub retry: Retry,
    /// The leader's lease.
    pub leader: Leader,
    /// What this server is.
    pub role: ServerRole,
    /// The database when not the data directory's (`database`, `--database`).
    pub database: Option<DatabaseUrl>,
    /// The URL hosts reach this replica at (`url`, `--url`), checked to be
    /// `https://NAME:PORT`.
    pub url: Option<String>,
    /// The CAs (DER) whose EK certificates enrolling TPMs must have
    /// (`attestation.ek_ca_file`; empty: not checked).
    pub ek_anchors: Vec<Vec<u8>>,
    /// Where `/metrics` is served, plain HTTP (`metrics.listen`; None:
    /// not served).
    pub metrics_listen: Option<SocketAddr>,
    /// The web console (`[console] listen`; None: not served).
    pub console: Option<Console>,
}

/// What a guestkey server is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerRole {
    /// The management server: hosts, volumes, guests, keys.
    #[default]
    Management,
    /// A verifier: enrolls and attests hosts on its own and keeps the
    /// other halves of split keys (see docs/release-gates.md); it has no
    /// volumes or guests.
    Verifier,
}

impl std::str::FromStr for ServerRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "management" => Ok(Self::Management),
            "verifier" => Ok(Self::Verifier),
            other => Err(format!(
                "`{other}` is not a role: use management or verifier"
            )),
        }
    }
}

/// Configuration errors name the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What toml said (names the key and line).
        message: String,
    },
    /// A value is invalid.
    #[error("{setting}: {message}")]
    Invalid {
        /// Which setting (flag or key).
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Flag values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--master-key-source`
    pub master_key_source: Option<MasterKeySource>,
    /// `--role`
    pub role: Option<ServerRole>,
    /// `--database`
    pub database: Option<DatabaseUrl>,
    /// `--url`
    pub url: Option<String>,
}

impl Config {
    /// Reads `file` (if given) and applies `flags`.
    pub fn load(file: Option<&Path>, flags: Overrides) -> Result<Self, ConfigError> {
        let fc = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string().trim().to_owned(),
                })?
            }
            None => FileConfig::default(),
        };
        let listen_text = flags
            .listen
            .or(fc.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse().map_err(|_| ConfigError::Invalid {
            setting: "listen",
            message: format!("`{listen_text}` is not an IP:PORT address, e.g. 127.0.0.1:7443"),
        })?;
        let data_dir = flags.data_dir.or(fc.data_dir).ok_or(ConfigError::Invalid {
            setting: "data_dir",
            message: "no data directory: pass --data-dir DIR or set data_dir in the config file"
                .into(),
        })?;
        let dir = crate::datadir::DataDir::new(&data_dir);
        // A reseal that stopped between its two renames is finished first,
        // so that the keys are found where they are.
        if let Err(e) = dir.recover_tpm() {
            return Err(ConfigError::Invalid {
                setting: "data_dir",
                message: format!(
                    "cannot finish an interrupted reseal in {}: {e}",
                    data_dir.display()
                ),
            });
        }
        let master_key_source = match (flags.master_key_source, fc.master_key_source) {
            (Some(s), _) => dir.resolve_master_key_source(s),
            (None, Some(text)) => {
                dir.resolve_master_key_source(text.parse().map_err(|message| {
                    ConfigError::Invalid {
                        setting: "master_key_source",
                        message,
                    }
                })?)
            }
            (None, None) => dir.default_master_key_source(),
        };
        if fc.limits.key_releases_per_minute == 0 || fc.limits.max_volumes_per_host == 0 {
            return Err(ConfigError::Invalid {
                setting: "limits",
                message: "limits must be at least 1".into(),
            });
        }
        if fc.leader.renew_ms < 100 || fc.leader.lease_ms < fc.leader.renew_ms.saturating_mul(3) {
            return Err(ConfigError::Invalid {
                setting: "leader",
                message: format!(
                    "renew_ms ({}) must be at least 100 and lease_ms ({}) at least three times renew_ms, so that a lease is renewed well before it lapses",
                    fc.leader.renew_ms, fc.leader.lease_ms
                ),
            });
        }
        if fc.retry.initial_delay_ms == 0 || fc.retry.max_delay_ms < fc.retry.initial_delay_ms {
            return Err(ConfigError::Invalid {
                setting: "retry",
                message: "need 0 < initial_delay_ms <= max_delay_ms".into(),
            });
        }
        if fc.retry.max_attempts == 0 {
            return Err(ConfigError::Invalid {
                setting: "retry",
                message: "max_attempts must be at least 1".into(),
            });
        }
        let role = match (flags.role, fc.role) {
            (Some(r), _) => r,
            (None, Some(text)) => text.parse().map_err(|message| ConfigError::Invalid {
                setting: "role",
                message,
            })?,
            (None, None) => ServerRole::Management,
        };
        let url = match flags.url.or(fc.url) {
            None => None,
            Some(text) => Some(host_url(&text).map_err(|message| ConfigError::Invalid {
                setting: "url",
                message,
            })?),
        };
        let ek_anchors = match &fc.attestation.ek_ca_file {
            None => vec![],
            Some(path) => ek_anchors(path)?,
        };
        let metrics_listen = match &fc.metrics.listen {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| ConfigError::Invalid {
                setting: "metrics.listen",
                message: format!(
                    "`{text}` is not an IP:PORT address, e.g. 127.0.0.1:9464 (metrics are plain HTTP: keep them on a local or monitoring-only address)"
                ),
            })?),
        };
        let console = match &fc.console.listen {
            None if fc.console.session_idle_secs.is_some() => {
                return Err(ConfigError::Invalid {
                    setting: "console.session_idle_secs",
                    message: "set console.listen too (the console is off without it)".into(),
                });
            }
            None => None,
            Some(text) => {
                let listen = text.parse().map_err(|_| ConfigError::Invalid {
                    setting: "console.listen",
                    message: format!("`{text}` is not an IP:PORT address, e.g. 127.0.0.1:7445"),
                })?;
                let session_idle_secs = fc.console.session_idle_secs.unwrap_or(1800);
                if !(60..=86_400).contains(&session_idle_secs) {
                    return Err(ConfigError::Invalid {
                        setting: "console.session_idle_secs",
                        message: format!(
                            "{session_idle_secs} is outside 60..=86400 (one minute to one day)"
                        ),
                    });
                }
                Some(Console {
                    listen,
                    session_idle_secs,
                })
            }
        };
        Ok(Self {
            listen,
            data_dir,
            master_key_source,
            limits: fc.limits,
            retry: fc.retry,
            leader: fc.leader,
            role,
            database: flags.database.or(fc.database.map(DatabaseUrl)),
            url,
            ek_anchors,
            metrics_listen,
            console,
        })
    }
}

/// A URL hosts can reach a server at: `https://NAME:PORT` (a DNS name, an
/// IPv4 address or a bracketed IPv6 one; a trailing `/` is dropped), the
/// name part returned by [`url_name`].
pub fn host_url(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    let bad = |why: &str| {
        Err(format!(
            "`{text}` {why}: give https://NAME:PORT, a name the server certificate holds"
        ))
    };
    let Some(rest) = url.strip_prefix("https://") else {
        return bad("is not an https URL");
    };
    let Some((name, port)) = rest.rsplit_once(':') else {
        return bad("has no port");
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return bad("has no valid port");
    }
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    let ok_name = !name.is_empty()
        && name.len() <= 253
        && (name.parse::<std::net::IpAddr>().is_ok()
            || name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !ok_name {
        return bad("does not name a host");
    }
    Ok(url.to_owned())
}

/// The name (DNS name or IP address, without brackets) of a URL that
/// [`host_url`] accepted.
pub fn url_name(url: &str) -> &str {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let name = rest.rsplit_once(':').map_or(rest, |(n, _)| n);
    name.strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
}

/// The CA certificates in the PEM file `path`: at least one, each a CA.
fn ek_anchors(path: &Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    let bad = |message: String| ConfigError::Invalid {
        setting: "attestation.ek_ca_file",
        message,
    };
    let text =
        std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let mut out = vec![];
    for pem in x509_parser::pem::Pem::iter_from_buffer(&text) {
        let pem = pem.map_err(|e| bad(format!("{} is not PEM text: {e}", path.display())))?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let cert = pem.parse_x509().map_err(|e| {
            bad(format!(
                "{} holds a certificate that does not parse: {e}",
                path.display()
            ))
        })?;
        if !cert.is_ca() {
            return Err(bad(format!(
                "{} holds {}, which is not a CA certificate",
                path.display(),
                cert.subject()
            )));
        }
        out.push(pem.contents.clone());
    }
    if out.is_empty() {
        return Err(bad(format!(
            "{} holds no PEM certificate: give the CA certificates of your TPMs' manufacturers",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file with `text`, in a directory of its own that goes
    /// when the guard drops.
    fn file(text: &str) -> (PathBuf, guestkey_testkit::cleanup::Made) {
        let dir = guestkey_testkit::temp_dir("cfg");
        let gone = guestkey_testkit::cleanup::Made::dir(&dir);
        let p = dir.join("server.toml");
        std::fs::write(&p, text).unwrap();
        (p, gone)
    }

    #[test]
    fn a_bad_ek_ca_file_is_named() {
        let (ca, _gone) = file("not pem");
        let (p, _gone2) = file(&format!(
            "data_dir = \"/d\"\n[attestation]\nek_ca_file = \"{}\"\n",
            ca.display()
        ));
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("attestation.ek_ca_file: "), "{e}");
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let (p, _gone3) =
            file("data_dir = \"/d\"\n[attestation]\nek_ca_file = \"/nonexistent/ek.pem\"\n");
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read /nonexistent/ek.pem"), "{e}");
        let (p, _gone4) = file("data_dir = \"/d\"\n[attestation]\nek_ca = 1\n");
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ek_ca"), "{e}");
        let (p, _gone5) = file("data_dir = \"/d\"\nrole = \"judge\"\n");
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("use management or verifier"), "{e}");
    }

    #[test]
    fn file_then_flags() {
        let (p, _gone) = file(
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/d\"\n[limits]\nkey_releases_per_minute = 5\n",
        );
        let c = Config::load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.key_releases_per_minute, 5);
        assert_eq!(c.limits.max_volumes_per_host, 10_000);
        assert_eq!(
            c.master_key_source,
            MasterKeySource::File("/d/master.key".into())
        );
        let c = Config::load(
            Some(&p),
            Overrides {
                listen: Some("127.0.0.1:9001".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9001);
    }

    #[test]
    fn mistakes_are_named() {
        let (p, _gone) = file("data_dir = \"/d\"\nlisten_addr = \"x\"\n");
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let (p, _gone) = file("data_dir = \"/d\"\nlisten = \"nowhere\"\n");
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("listen: `nowhere`"), "{e}");
        let e = Config::load(None, Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--data-dir"), "{e}");
        let (p, _gone) = file("data_dir = \"/d\"\n[retry]\ninitial_delay_ms = 0\n");
        assert!(Config::load(Some(&p), Overrides::default()).is_err());
    }

    #[test]
    fn the_url_hosts_reach_a_replica_at_is_checked() {
        for (good, name) in [
            ("https://kms2.example:7443", "kms2.example"),
            ("https://10.0.0.6:7443/", "10.0.0.6"),
            ("https://[fd00::6]:7443", "fd00::6"),
        ] {
            let url = host_url(good).unwrap();
            assert!(!url.ends_with('/'), "{url}");
            assert_eq!(url_name(&url), name);
        }
        for (bad, why) in [
            ("http://kms2.example:7443", "not an https URL"),
            ("https://kms2.example", "no port"),
            ("https://kms2.example:0", "no valid port"),
            ("https://kms2.example:99999", "no valid port"),
            ("https://:7443", "does not name a host"),
            ("https://kms 2:7443", "does not name a host"),
            ("https://kms2.example/path:7443", "does not name a host"),
        ] {
            let e = host_url(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains("https://NAME:PORT"),
                "{bad}: {e}"
            );
        }
        // From the file and from the flag, which wins.
        let (p, _gone) = file("data_dir = \"/d\"\nurl = \"https://a.example:7443\"\n");
        let c = Config::load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(c.url.as_deref(), Some("https://a.example:7443"));
        let flags = Overrides {
            url: Some("https://b.example:7443".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&p), flags).unwrap();
        assert_eq!(c.url.as_deref(), Some("https://b.example:7443"));
        let (p, _gone) = file("data_dir = \"/d\"\nurl = \"kms2:7443\"\n");
        let e = Config::load(Some(&p), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("url: `kms2:7443` is not an https URL"), "{e}");
    }
}
