//! Refused calls, recorded without letting a peer grow the audit log at
//! will. Any peer that reaches the port can be refused; within each window
//! (a minute) the first few refusals of each kind (actor, subject, reason)
//! are recorded one by one, the rest only counted, and at the window's end
//! (or when the server stops) one record per kind says how many more there
//! were. A window adds at most `KINDS * (PER_KIND + 1) + 1` records,
//! however many calls are refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::Core;
use crate::model::CoreError;

/// How long a window lasts.
const WINDOW: Duration = Duration::from_secs(60);
/// Refusals of one kind recorded one by one per window.
const PER_KIND: u32 = 3;
/// Kinds tracked per window; refusals of further kinds are counted together.
const KINDS: usize = 8;

type Kind = (String, String, String);

/// A record summing up refusals that were only counted.
pub(crate) struct Summary {
    actor: String,
    subject: String,
    detail: String,
}

struct Window {
    start: Instant,
    /// Per kind: recorded one by one, counted only.
    kinds: HashMap<Kind, (u32, u64)>,
    /// Refusals of kinds beyond `KINDS`.
    others: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            kinds: HashMap::new(),
            others: 0,
        }
    }

    fn summaries(&self) -> Vec<Summary> {
        let secs = self.start.elapsed().as_secs().max(1);
        let mut out: Vec<Summary> = self
            .kinds
            .iter()
            .filter(|(_, (_, counted))| *counted > 0)
            .map(|((actor, subject, why), (_, counted))| Summary {
                actor: actor.clone(),
                subject: subject.clone(),
                detail: format!(
                    "{why} (repeated {counted} more times within {secs} s, not recorded one by one)"
                ),
            })
            .collect();
        out.sort_by(|a, b| (&a.actor, &a.subject).cmp(&(&b.actor, &b.subject)));
        if self.others > 0 {
            out.push(Summary {
                actor: "various".into(),
                subject: "various".into(),
                detail: format!(
                    "{} refusals of other kinds within {secs} s, not recorded one by one",
                    self.others
                ),
            });
        }
        out
    }
}

/// The refusal counters.
pub(crate) struct Refusals {
    window: Mutex<Window>,
}

impl Refusals {
    pub(crate) fn new() -> Self {
        Self {
            window: Mutex::new(Window::new()),
        }
    }

    /// Notes a refusal: returns the summaries of a window that ended, and
    /// whether to record this refusal one by one.
    fn note(&self, actor: &str, subject: &str, why: &str) -> (Vec<Summary>, bool) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let ended = if w.start.elapsed() >= WINDOW {
            let s = w.summaries();
            *w = Window::new();
            s
        } else {
            vec![]
        };
        let kind = (actor.to_owned(), subject.to_owned(), why.to_owned());
        let known = w.kinds.len();
        let record = match w.kinds.get_mut(&kind) {
            Some((recorded, _)) if *recorded < PER_KIND => {
                *recorded += 1;
                true
            }
            Some((_, counted)) => {
                *counted += 1;
                false
            }
            None if known < KINDS => {
                w.kinds.insert(kind, (1, 0));
                true
            }
            None => {
                w.others += 1;
                false
            }
        };
        (ended, record)
    }

    /// The summaries of the current window if it ended (or `now`), which
    /// then starts afresh.
    fn take(&self, now: bool) -> Vec<Summary> {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if !now && w.start.elapsed() < WINDOW {
            return vec![];
        }
        let s = w.summaries();
        *w = Window::new();
        s
    }
}

impl Core {
    /// Records a refused request in the audit log (within the bounds
    /// above).
    pub fn audit_refusal(&self, actor: &str, subject: &str, why: &str) {
        let (ended, record) = self.refusals.note(actor, subject, why);
        if !record && ended.is_empty() {
            tracing::debug!(%actor, %subject, %why, "refusal counted, not recorded one by one");
            return;
        }
        let r = self.write(|tx| {
            for s in &ended {
                self.log(tx, &s.actor, "refused", &s.subject, &s.detail)?;
            }
            if record {
                self.log(tx, actor, "refused", subject, why)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot write an audit record for a refusal");
        }
    }

    /// Records the counted refusals of a window that ended (all of them
    /// when `now`, e.g. at shutdown).
    pub fn flush_refusals(&self, now: bool) -> Result<(), CoreError> {
        let due = self.refusals.take(now);
        if due.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for s in &due {
                self.log(tx, &s.actor, "refused", &s.subject, &s.detail)?;
            }
            Ok(())
        })
    }
}
