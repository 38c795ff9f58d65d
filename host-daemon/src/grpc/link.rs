//! This host's connection to the management server, as the reports and
//! `DescribeDisk` use it: the URLs from `server.url` (one per line: the
//! server's replicas, tried in turn from the last one that answered), then
//! those of `replicas.url` (the list the server gives with each answer to
//! an inventory, on PostgreSQL), only the server CA of
//! `ca.pem`, only the server certificate `server.sha256` names (both from
//! the enrollment, or from `guestkeyd trust-server`), and this host's own
//! certificate. Made through [`guestkey_pinned_tls::Connector`]: tonic's
//! TLS settings could check the CA and the name only, and every host's
//! certificate carries a name and is signed by a CA too.

use std::time::Duration;

use guestkey_pinned_tls::{ConnectError, Connector, Peer};
use tonic::transport::{Channel, Endpoint};

use crate::state::StateDir;

/// The server as this host reaches it: one or more replicas.
#[derive(Clone)]
pub(super) struct ServerLink {
    /// Per replica: `http://HOST:PORT` for tonic (the connector does the
    /// TLS), and its connector.
    replicas: Vec<(String, Connector)>,
    /// Per replica, its URL as listed.
    urls: Vec<String>,
    /// The replica that answered last (tried first).
    last: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Why the link could not be made or used; says what to do.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkError {
    /// A file of the state directory is missing or wrong.
    #[error("{0}")]
    State(String),
    /// The server's certificate was refused (another CA, not the pinned one).
    #[error("{0}")]
    Refused(String),
    /// Any other failure to connect.
    #[error("cannot reach the server: {0}")]
    Connect(String),
}

/// The hint when the server's certificate is not the one this host trusts.
pub(super) const RETRUST: &str = "if the server was migrated (`guestkey-server migrate-roles`) or has a new certificate, stop guestkeyd and run `guestkeyd trust-server --ca-file SERVER-CA.pem --state-dir DIR` with the server CA that `guestkeyctl ca-cert` prints";

impl ServerLink {
    /// The link of this state directory (None: not enrolled).
    pub(super) fn from_state(dir: &StateDir) -> Result<Option<Self>, LinkError> {
        let read = |f: &str| std::fs::read_to_string(dir.file(f)).ok();
        let (Some(url), Some(ca), Some(cert), Some(pin)) = (
            read("server.url"),
            read("ca.pem"),
            read("tls.pem"),
            read("server.sha256"),
        ) else {
            return Ok(None);
        };
        let key = zeroize::Zeroizing::new(read("tls.key").unwrap_or_default());
        let bad = |e: String| LinkError::State(format!("{}: {e}", dir.root().display()));
        let mut urls: Vec<String> = server_urls(&url).into_iter().map(str::to_owned).collect();
        if urls.is_empty() {
            return Err(bad("server.url names no server".into()));
        }
        // The replicas the server named; a damaged list is left out (the
        // next answer to an inventory writes it again).
        let learned = read(REPLICAS).unwrap_or_default();
        match checked_replica_urls(
            server_urls(&learned)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        ) {
            Ok(more) => {
                for u in more {
                    if !urls.contains(&u) {
                        urls.push(u);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(file = %dir.file(REPLICAS).display(), error = %e, "the list of replicas is left out")
            }
        }
        let mut replicas = Vec::with_capacity(urls.len());
        for url in &urls {
            let endpoint = guestkey_pinned_tls::endpoint_uri(url).ok_or_else(|| {
                bad(format!(
                    "server.url: {url:?} is not an https URL (one URL a line)"
                ))
            })?;
            let connector = Connector::new(
                Peer {
                    who: format!("the server at {url}"),
                    roots_pem: ca.clone(),
                    roots_from: format!("the server CA in {}", dir.file("ca.pem").display()),
                    name: guestkey_pinned_tls::tls_name(url).unwrap_or_default(),
                    pin: Some(pin.clone()),
                    hint: RETRUST.into(),
                },
                Some((&cert, &key)),
            )
            .map_err(|e| bad(e.to_string()))?;
            replicas.push((endpoint, connector));
        }
        Ok(Some(Self {
            replicas,
            urls,
            last: Default::default(),
        }))
    }

    /// Keeps `urls`, the replicas the server named in its answer to an
    /// inventory, in `replicas.url` when they differ from what is there;
    /// then the new link, which tries first the replica this one reached
    /// last. None: nothing changed (or the list was refused, logged).
    pub(super) fn learn(&self, dir: &StateDir, urls: Vec<String>) -> Option<Self> {
        if urls.is_empty() {
            return None;
        }
        let urls = match checked_replica_urls(urls) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "the server's list of replicas is refused; the host keeps its own");
                return None;
            }
        };
        let file = dir.file(REPLICAS);
        let had = std::fs::read_to_string(&file).unwrap_or_default();
        if server_urls(&had) == urls.iter().map(String::as_str).collect::<Vec<_>>() {
            return None;
        }
        let mut text = String::from(
            "# The server's replicas, as the server named them (written by guestkeyd; server.url comes first)\n",
        );
        for u in &urls {
            text.push_str(u);
            text.push('\n');
        }
        if let Err(e) = crate::state::write_atomic(&file, text.as_bytes()) {
            tracing::warn!(file = %file.display(), error = %e, "cannot keep the server's list of replicas");
            return None;
        }
        tracing::info!(replicas = %urls.join(", "), "the server's list of replicas changed");
        let link = match Self::from_state(dir) {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "the new list of replicas is not used");
                return None;
            }
        };
        let i = self.last.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(j) = self
            .urls
            .get(i)
            .and_then(|u| link.urls.iter().position(|v| v == u))
        {
            link.last.store(j, std::sync::atomic::Ordering::Relaxed);
        }
        Some(link)
    }

    /// A link to `url` trusting `peer`, presenting `identity` if given.
    pub(super) fn new(
        url: &str,
        peer: Peer,
        identity: Option<(&str, &str)>,
    ) -> Result<Self, LinkError> {
        let endpoint = guestkey_pinned_tls::endpoint_uri(url).ok_or_else(|| {
            LinkError::State(format!("server URL {url:?} must start with https://"))
        })?;
        let connector =
            Connector::new(peer, identity).map_err(|e| LinkError::State(e.to_string()))?;
        Ok(Self {
            replicas: vec![(endpoint, connector)],
            urls: vec![url.to_owned()],
            last: Default::default(),
        })
    }

    /// SHA-256 of the server certificate the last connection verified.
    pub(super) fn verified_sha256(&self) -> Option<String> {
        let i = self.last.load(std::sync::atomic::Ordering::Relaxed);
        self.replicas.get(i)?.1.verified_sha256()
    }

    /// A new channel to the first replica that answers, from the one that
    /// answered last; each call may take up to `timeout`. When none does,
    /// a refused certificate is reported before a replica that is down.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<Channel, LinkError> {
        let n = self.replicas.len();
        let first = self.last.load(std::sync::atomic::Ordering::Relaxed) % n.max(1);
        let mut refused = None;
        let mut down = None;
        for k in 0..n {
            let i = (first + k) % n;
            match self.connect_to(i, timeout).await {
                Ok(c) => {
                    self.last.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(c);
                }
                Err(e @ LinkError::Refused(_)) => refused = refused.or(Some(e)),
                Err(e) => down = Some(e),
            }
        }
        Err(refused
            .or(down)
            .unwrap_or_else(|| LinkError::State("no server URL".into())))
    }

    async fn connect_to(&self, i: usize, timeout: Duration) -> Result<Channel, LinkError> {
        let (endpoint, connector) = &self.replicas[i];
        Endpoint::from_shared(endpoint.clone())
            .map_err(|e| LinkError::State(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .connect_with_connector(connector.clone())
            .await
            .map_err(|e| match guestkey_pinned_tls::find_connect_error(&e) {
                Some(
                    c @ (ConnectError::NotPinned { .. }
                    | ConnectError::NotSigned { .. }
                    | ConnectError::Refused { .. }),
                ) => LinkError::Refused(c.to_string()),
                Some(c) => LinkError::Connect(c.to_string()),
                None => LinkError::Connect(error_chain(&e)),
            })
    }
}

/// The file of the replicas the server named (`STATE_DIR/replicas.url`).
pub(super) const REPLICAS: &str = "replicas.url";

/// At most this many replicas are kept from the server's list.
const MAX_REPLICAS: usize = 32;

/// The server's list of replicas, each checked to be an https URL of at
/// most 512 characters with no space or control character, at most
/// [`MAX_REPLICAS`] of them, each once.
pub(super) fn checked_replica_urls(urls: Vec<String>) -> Result<Vec<String>, String> {
    if urls.len() > MAX_REPLICAS {
        return Err(format!(
            "{} replicas named, at most {MAX_REPLICAS} are kept",
            urls.len()
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(urls.len());
    for u in urls {
        let shown: String = u.chars().take(80).collect();
        if u.len() > 512
            || !u.starts_with("https://")
            || u.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
            || guestkey_pinned_tls::endpoint_uri(&u).is_none()
        {
            return Err(format!(
                "{shown:?} is not an https URL of a replica (https://NAME:PORT)"
            ));
        }
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}

/// The URLs of `server.url`: one a line; blank lines and `#` comments
/// left out.
pub(super) fn server_urls(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// An error and its sources, joined with ": ".
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_list_of_replicas_is_checked_before_it_is_kept() {
        let ok = |v: &[&str]| checked_replica_urls(v.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(
            ok(&["https://a:7443", "https://b:7443", "https://a:7443"]).unwrap(),
            ["https://a:7443", "https://b:7443"]
        );
        for bad in [
            "http://a:7443",
            "a:7443",
            "https://a:7443\nhttps://evil:1",
            "https://a:7443 # b",
            "https://a:7443#",
            "https://a:\u{7}7443",
        ] {
            let e = ok(&["https://a:7443", bad]).unwrap_err();
            assert!(
                e.contains("is not an https URL of a replica"),
                "{bad:?}: {e}"
            );
        }
        let long = format!("https://{}:7443", "a".repeat(600));
        assert!(ok(&[&long]).unwrap_err().contains("https://aaaa"));
        let many: Vec<String> = (0..33).map(|i| format!("https://r{i}:7443")).collect();
        assert!(
            checked_replica_urls(many)
                .unwrap_err()
                .contains("at most 32")
        );
    }
}
