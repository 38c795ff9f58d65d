//! Checkpoints of the audit log outside the database: signed heads
//! ([`SignedHead`]) appended to `DATA_DIR/audit-checkpoints` (a file that
//! only grows) and written to the server's log, by the scheduler every ten
//! seconds while the log grows, when the server stops, and whenever an
//! admin fetches the head to keep (`Core::audit_head`). `audit --verify`
//! checks the log against every one of them, and against a head the admin
//! kept, so deleting the newest records or restoring an older copy of the
//! database is detected even though the chain inside stays consistent.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::Core;
use crate::domain::audit::{self, KeptHead, SignedHead};
use crate::model::{CoreError, Verification};

/// How often the scheduler writes a checkpoint while the log grows.
const EVERY: Duration = Duration::from_secs(10);

/// The checkpoint file, and the last head written to it.
pub(crate) struct Checkpoints {
    path: Option<PathBuf>,
    last: Mutex<Option<(u64, Instant)>>,
}

impl Checkpoints {
    /// Checkpoints appended to `path` (None: to the log only).
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            last: Mutex::new(None),
        }
    }

    fn write(&self, head: &SignedHead) -> Result<(), CoreError> {
        tracing::info!(head = %head, "audit checkpoint");
        if let Some(path) = &self.path {
            let io = |e: std::io::Error| {
                CoreError::Internal(format!("cannot append to {}: {e}", path.display()))
            };
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{head}\n").as_bytes()).map_err(io)?;
            f.sync_data().map_err(io)?;
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((head.seq, Instant::now()));
        Ok(())
    }

    /// The complete lines of the file (a last line without its newline was
    /// cut by a crash and is left out).
    fn lines(&self) -> Result<Vec<String>, CoreError> {
        let Some(path) = &self.path else {
            return Ok(vec![]);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(CoreError::Internal(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        Ok(complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn label(&self, n: usize) -> String {
        match &self.path {
            Some(p) => format!("checkpoint {n} of {}", p.display()),
            None => format!("checkpoint {n}"),
        }
    }
}

impl Core {
    /// The log's current head, signed with the audit key: for the admin to
    /// keep outside the server. It is also written as a checkpoint.
    pub fn audit_head(&self) -> Result<SignedHead, CoreError> {
        let head = self.read(|tx| {
            let key = self.keys.audit_key(tx)?;
            let (seq, hash) = audit::head(tx)?;
            Ok(SignedHead::sign(&key, seq, &hash))
        })?;
        self.checkpoints.write(&head)?;
        Ok(head)
    }

    /// Writes a checkpoint if the log grew since the last one, at most
    /// every ten seconds unless `now`.
    pub fn checkpoint_audit(&self, now: bool) -> Result<(), CoreError> {
        let last = *self
            .checkpoints
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !now && last.is_some_and(|(_, at)| at.elapsed() < EVERY) {
            return Ok(());
        }
        let (seq, _) = self.read(|tx| Ok(audit::head(tx)?))?;
        if last.is_some_and(|(s, _)| s == seq) || (last.is_none() && seq == 0) {
            return Ok(());
        }
        self.audit_head().map(drop)
    }

    /// Walks the whole audit chain and checks it against every checkpoint
    /// and, if given, a head the admin kept.
    pub fn verify_audit(&self, kept: Option<&str>) -> Result<Verification, CoreError> {
        let lines = self.checkpoints.lines()?;
        let mut heads: Vec<KeptHead<'_>> = lines
            .iter()
            .enumerate()
            .map(|(i, text)| KeptHead {
                label: self.checkpoints.label(i + 1),
                text,
            })
            .collect();
        if let Some(text) = kept {
            heads.push(KeptHead {
                label: "the kept head".into(),
                text,
            });
        }
        self.read(|tx| {
            let key = self.keys.audit_key(tx)?;
            Ok(audit::verify(tx, &key, &heads)?)
        })
    }

    /// At start-up: says loudly when the database is behind its newest
    /// checkpoint (newest records deleted, or an older copy restored).
    pub(crate) fn check_newest_checkpoint(&self) -> Result<(), CoreError> {
        let lines = self.checkpoints.lines()?;
        let Some(last) = lines.last() else {
            return Ok(());
        };
        let heads = [KeptHead {
            label: self.checkpoints.label(lines.len()),
            text: last,
        }];
        let problem = self.read(|tx| {
            let key = self.keys.audit_key(tx)?;
            let (records, _) = audit::head(tx)?;
            Ok(audit::check_head(tx, &key, records, &heads[0])?)
        })?;
        if let Some((_, problem)) = problem {
            tracing::error!(%problem, "THE AUDIT LOG DOES NOT VERIFY: see `guestkeyctl audit --verify`");
        }
        Ok(())
    }
}
