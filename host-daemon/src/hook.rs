//! The local socket the libvirt hook talks to.
//!
//! Root only (checked with SO_PEERCRED), or the one user a session libvirtd
//! runs as (`--hook-uid`), one request per connection, one line each way:
//!
//! ```text
//! prepare DOMAIN-UUID [SECRET-UUID...]   ->  ok | error MESSAGE
//! release DOMAIN-UUID [SECRET-UUID...]   ->  ok | error MESSAGE
//! ```
//!
//! `prepare` defines the guest's volume secrets in libvirt (ephemeral,
//! private) with their values; `release` undefines them. There is no request
//! that returns a key. Every step has a time limit, so a stuck libvirt
//! cannot hang the hook (and libvirtd, which waits for the hook) forever.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::model::canonical_uuid;
use crate::ops::Daemon;

/// Longest a request may take before the hook is told to give up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once; more wait (bounded by the hook's own timeout).
const MAX_CONCURRENT: usize = 16;

/// Serves the socket at `path` until the process ends.
/// `hook_uid` is the user libvirtd (and so the hook) runs as: 0 for the
/// system daemon; a session daemon's user may connect too.
pub async fn serve(path: &Path, daemon: Arc<Daemon>, hook_uid: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The caller holds this socket's instance lock, so no other guestkeyd
    // serves it: a file left there is a dead one's.
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(socket = %path.display(), "removed the socket a stopped guestkeyd left")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        if hook_uid != 0 {
            std::os::unix::fs::chown(path, Some(hook_uid), None)?;
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let (stream, _) = listener.accept().await?;
        let daemon = daemon.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let _permit = slots.acquire().await;
            if let Err(e) = handle(stream, daemon, hook_uid).await {
                tracing::warn!(error = %e, "hook connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, daemon: Arc<Daemon>, hook_uid: u32) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    if cred.uid() != 0 && cred.uid() != hook_uid {
        tracing::warn!(
            uid = cred.uid(),
            "hook socket: refused a peer that is neither root nor libvirtd's user"
        );
        write
            .write_all(b"error only root (or libvirtd's user) may use the guestkey hook socket\n")
            .await?;
        return Ok(());
    }
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within 5 s")
        })??;
    let reply = match parse(&line) {
        Ok((op, domain, secrets)) => {
            let d = daemon.clone();
            let work = tokio::task::spawn_blocking(move || match op {
                Op::Prepare => d.prepare_secrets(&domain, &secrets),
                Op::Release => d.release_secrets(&domain, &secrets),
            });
            match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
                Ok(Ok(Ok(()))) => "ok\n".to_owned(),
                Ok(Ok(Err(e))) => format!("error {}\n", e.to_string().replace('\n', " ")),
                Ok(Err(e)) => format!("error guestkeyd failed: {e}\n"),
                Err(_) => format!(
                    "error guestkeyd did not finish within {} s\n",
                    REQUEST_TIMEOUT.as_secs()
                ),
            }
        }
        Err(msg) => format!("error {msg}\n"),
    };
    write.write_all(reply.as_bytes()).await
}

enum Op {
    Prepare,
    Release,
}

fn parse(line: &str) -> Result<(Op, String, BTreeSet<String>), String> {
    let mut words = line.split_whitespace();
    let op = match words.next() {
        Some("prepare") => Op::Prepare,
        Some("release") => Op::Release,
        _ => {
            return Err(
                "unknown request: the hook socket takes only `prepare` and `release`".into(),
            );
        }
    };
    let domain = words.next().ok_or("no domain UUID in the request")?;
    // One spelling only: another would match nothing here and answer `ok`
    // for a guest whose keys were never looked at.
    canonical_uuid("domain UUID", domain).map_err(|e| e.0)?;
    let mut secrets = BTreeSet::new();
    for s in words {
        canonical_uuid("secret UUID", s).map_err(|e| e.0)?;
        secrets.insert(s.to_owned());
    }
    Ok((op, domain.to_owned(), secrets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let d = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let s = "aaaaaaaa-0000-0000-0000-000000000001";
        let (op, dom, secrets) = parse(&format!("prepare {d} {s}\n")).unwrap();
        assert!(matches!(op, Op::Prepare));
        assert_eq!(dom, d);
        assert_eq!(secrets.into_iter().collect::<Vec<_>>(), vec![s.to_owned()]);
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
                &format!("prepare {d} {}", s.to_uppercase()),
                "canonical form",
            ),
            (&format!("prepare {d} {{{s}}}"), "canonical form"),
        ] {
            let e = parse(line)
                .err()
                .unwrap_or_else(|| panic!("{line:?} accepted"));
            assert!(e.contains(want), "{line:?}: {e}");
        }
    }
}
