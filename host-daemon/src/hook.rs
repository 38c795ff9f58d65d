//! The local socket the libvirt hook talks to.
//!
//! Root only (checked with SO_PEERCRED), or the one user a session libvirtd
//! runs as (`--hook-uid`), one request per connection, one line each way:
//!
//! ```text
//! prepare DOMAIN-UUID [SECRET-UUID,TARGET,SOURCE...]   ->  ok | error MESSAGE
//! release DOMAIN-UUID [SECRET-UUID,TARGET,SOURCE...]   ->  ok | error MESSAGE
//! ```
//!
//! The format is `virt_plugin::protocol`, shared with the hook (canonical
//! UUIDs only, paths hex-encoded).
//!
//! `prepare` defines the guest's volume secrets in libvirt (ephemeral,
//! private) with their values; `release` undefines them. While guestkeyd
//! cannot unseal its keys (a TPM-sealed host booted with PCR values nobody
//! approved), the socket is served by a locked [`Gate`]: a guest with a
//! disk guestkey manages is refused with the reason and the command that
//! unlocks it, every other guest starts as usual. There is no request
//! that returns a key. Every step has a time limit, so a stuck libvirt
//! cannot hang the hook (and libvirtd, which waits for the hook) forever.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use virt_plugin::protocol::{MAX_LINE, Op, Request};

use crate::ops::Daemon;

/// What the hook socket answers with: nothing yet, a locked host's reason,
/// or the daemon.
#[derive(Clone, Default)]
pub struct Gate(Arc<std::sync::RwLock<GateState>>);

#[derive(Clone, Default)]
enum GateState {
    #[default]
    Starting,
    Locked {
        reason: String,
        managed: Vec<String>,
    },
    Open(Arc<Daemon>),
}

impl Gate {
    /// Guests with a disk whose secret is in `managed` are refused with
    /// `reason` until [`Gate::open`].
    pub fn lock(&self, reason: String, managed: Vec<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = GateState::Locked { reason, managed };
    }

    /// Requests go to `daemon` from now on.
    pub fn open(&self, daemon: Arc<Daemon>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = GateState::Open(daemon);
    }

    /// Whether requests reach a daemon.
    pub fn is_open(&self) -> bool {
        matches!(
            *self.0.read().unwrap_or_else(|p| p.into_inner()),
            GateState::Open(_)
        )
    }

    fn state(&self) -> GateState {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Longest a request may take before the hook is told to give up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once; more wait (bounded by the hook's own timeout).
const MAX_CONCURRENT: usize = 16;

/// Serves the socket at `path` until the process ends.
/// `hook_uid` is the user libvirtd (and so the hook) runs as: 0 for the
/// system daemon; a session daemon's user may connect too.
pub async fn serve(path: &Path, gate: Gate, hook_uid: u32) -> std::io::Result<()> {
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
        let gate = gate.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let _permit = slots.acquire().await;
            if let Err(e) = handle(stream, gate, hook_uid).await {
                tracing::warn!(error = %e, "hook connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, gate: Gate, hook_uid: u32) -> std::io::Result<()> {
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
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within 5 s")
        })??;
    let reply = match (Request::parse(line.trim_end_matches('\n')), gate.state()) {
        (Err(msg), _) => format!("error {msg}\n"),
        (Ok(_), GateState::Starting) => "error guestkeyd is starting: try again\n".to_owned(),
        (Ok(r), GateState::Locked { reason, managed }) => {
            let ours = r.disks.iter().any(|d| managed.contains(&d.secret));
            match r.op {
                Op::Prepare if ours => format!("error {}\n", reason.replace('\n', " ")),
                // Not guestkey's guest, or a stop: nothing of ours to do.
                _ => "ok\n".to_owned(),
            }
        }
        (Ok(r), GateState::Open(daemon)) => {
            let d = daemon.clone();
            let work = tokio::task::spawn_blocking(move || match r.op {
                Op::Prepare => d.prepare_secrets(&r.domain, &r.disks),
                Op::Release => d.release_secrets(&r.domain, &r.secrets()),
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
    };
    write.write_all(reply.as_bytes()).await
}
