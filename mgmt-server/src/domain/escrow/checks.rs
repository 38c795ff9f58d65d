//! The checks of escrow requests: who may ask and decide, the recipients
//! and texts they give, the request ids, and the errors an approval ends
//! with (see the parent module).

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Mutex;

use super::{MAX_RECIPIENTS, MAX_TEXT};
use crate::domain::agent::{AgentError, AgentErrorKind};
use crate::model::{Caller, CoreError, EscrowEntry, InvalidInput};

/// Requests being approved by this process now: a second approval of the
/// same one waits for the first's outcome instead of asking the host again.
static MAKING: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Holds a request in [`MAKING`] until dropped.
pub(super) struct Making(String);

impl Making {
    pub(super) fn take(id: &str) -> Result<Self, CoreError> {
        let mut set = MAKING.lock().unwrap_or_else(|p| p.into_inner());
        if !set.get_or_insert_with(HashSet::new).insert(id.to_owned()) {
            return Err(CoreError::FailedPrecondition(format!(
                "escrow request {id} is being approved now: see `guestkeyctl escrow list` in a moment"
            )));
        }
        Ok(Self(id.to_owned()))
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        let mut set = MAKING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = set.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// A new request id: `es-` and 12 hex digits.
pub(super) fn new_id() -> Result<String, CoreError> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| CoreError::Internal(format!("no random bytes: {e}")))?;
    Ok(format!("es-{}", hex::encode(b)))
}

/// The admin's name, or a refusal: escrow packets are for admins.
pub(super) fn admin(caller: &Caller, what: &str) -> Result<String, CoreError> {
    match caller {
        Caller::Admin(name) => Ok(name.clone()),
        other => Err(CoreError::Denied(format!(
            "{what} is for admins; {} is not one",
            other.actor()
        ))),
    }
}

/// A reason or note: at most [`MAX_TEXT`] characters, no control ones.
pub(super) fn check_text(what: &'static str, text: &str) -> Result<(), InvalidInput> {
    let n = text.chars().count();
    if n > MAX_TEXT {
        return Err(InvalidInput {
            what,
            value: format!("{n} characters"),
            why: format!("give at most {MAX_TEXT} characters"),
        });
    }
    if text.chars().any(char::is_control) {
        return Err(InvalidInput {
            what,
            value: text.escape_debug().to_string(),
            why: "give one line without control characters (newlines, tabs)".into(),
        });
    }
    Ok(())
}

/// The recipients in their canonical form (`age1...`), or why not: 1 to
/// [`MAX_RECIPIENTS`], each an age X25519 recipient, none twice.
pub fn check_recipients(given: &[String]) -> Result<Vec<String>, InvalidInput> {
    let bad = |value: String, why: String| InvalidInput {
        what: "recipient",
        value,
        why,
    };
    if given.is_empty() || given.len() > MAX_RECIPIENTS {
        return Err(bad(
            format!("{} recipients", given.len()),
            format!(
                "give 1 to {MAX_RECIPIENTS} age recipients (--to age1..., each in the host's --escrow-recipients file)"
            ),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(given.len());
    for r in given {
        let parsed = age::x25519::Recipient::from_str(r).map_err(|e| {
            bad(
                r.clone(),
                format!(
                    "not an age X25519 recipient ({e}): give the public key `age-keygen -y IDENTITY_FILE` prints (age1...)"
                ),
            )
        })?;
        let canonical = parsed.to_string();
        if out.contains(&canonical) {
            return Err(bad(
                r.clone(),
                "given twice: name each recipient once".into(),
            ));
        }
        out.push(canonical);
    }
    Ok(out)
}

/// The admin's error for a host that could not make the packet.
pub(super) fn host_failed(id: &str, e: &AgentError) -> CoreError {
    let tail = format!(
        "request {id} stays pending: fix that, then approve it again (`guestkeyctl escrow approve {id}`)"
    );
    // The host's failure, not the server's: each kind is the admin's to
    // act on (reach the host, or fix what it refused).
    match e.kind {
        AgentErrorKind::Unreachable => CoreError::FailedPrecondition(format!(
            "{}: no packet was made; {tail} when the host answers",
            e.message
        )),
        AgentErrorKind::Refused | AgentErrorKind::Declined | AgentErrorKind::Failed => {
            CoreError::FailedPrecondition(format!("{}: no packet was made; {tail}", e.message))
        }
    }
}

/// The error for deciding a request that is not pending.
pub(super) fn not_pending(e: &EscrowEntry) -> CoreError {
    CoreError::FailedPrecondition(format!(
        "escrow request {} is {}, not pending: nothing to decide",
        e.id, e.state
    ))
}
