//! Waiting for a volume's host: `follow` polls a volume until no
//! operation is pending or the time is up, with the progress bar on
//! stderr; `created` and `still_pending` say how a wait ended. Used by
//! `volume create` (by default) and `volume rekey --wait`.

use std::time::{Duration, Instant};

use guestkey_proto::admin as pb;

use super::get;
use crate::Failure;
use crate::connect::Client;
use crate::output::Bar;

/// The end of `volume create`'s wait: the volume if the host made it.
pub(super) fn created(outcome: Followed, timeout: &str) -> Result<pb::Volume, Failure> {
    match outcome {
        Followed::Done(v) if v.state == "ready" => Ok(v),
        Followed::Done(v) => Err(Failure(format!(
            "volume {} was not created: it is {}{}",
            v.name,
            v.state,
            if v.last_error.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.last_error)
            }
        ))),
        Followed::TimedOut(v) => Err(still_pending(&v, timeout)),
    }
}

/// Waited `waited` for volume `v`, still pending: the server goes on.
pub(super) fn still_pending(v: &pb::Volume, waited: &str) -> Failure {
    let last_error = if v.last_error.is_empty() {
        String::new()
    } else {
        format!(" (last error: {})", v.last_error)
    };
    Failure(format!(
        "volume {} is still {} after {waited}{last_error}: it stays pending and the server keeps retrying; see `guestkeyctl volume show {}`",
        v.name, v.state, v.name
    ))
}

/// Whether the host still works on a volume in `state` (the server's own
/// list: one place, `VolumeState::HOST_WORKING`).
fn pending(state: &str) -> bool {
    state
        .parse::<mgmt_server::model::VolumeState>()
        .is_ok_and(|s| s.is_pending())
}

/// How following a volume ended.
pub(super) enum Followed {
    /// No operation is pending any more: the volume as it is now.
    Done(pb::Volume),
    /// Still pending when the time was up: the volume as it was last seen.
    TimedOut(pb::Volume),
}

/// Polls volume `id` until no operation is pending or `limit` has passed,
/// with a progress bar on stderr when it is a terminal. The first polls
/// come quickly (a volume is made in well under a second: 20 ms, then
/// twice as long each time), then every 500 ms.
pub(super) async fn follow(
    c: &mut Client,
    id: &str,
    json: bool,
    limit: Duration,
) -> Result<Followed, Failure> {
    let mut bar = Bar::new(json);
    let end = Instant::now() + limit;
    let mut wait = Duration::from_millis(20);
    loop {
        let v = get(c, id).await?;
        if !pending(&v.state) {
            bar.clear();
            return Ok(Followed::Done(v));
        }
        if Instant::now() > end {
            bar.clear();
            return Ok(Followed::TimedOut(v));
        }
        bar.draw(&v);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `volume create` says at the end of its wait.
    #[test]
    fn the_end_of_a_create() {
        let ready = pb::Volume {
            name: "vm1-disk".into(),
            state: "ready".into(),
            ..Default::default()
        };
        let pending = pb::Volume {
            name: "late".into(),
            state: "pending-create".into(),
            last_error: "host kvm-late unreachable: tcp connect error".into(),
            ..Default::default()
        };
        let quiet = pb::Volume {
            last_error: String::new(),
            ..pending.clone()
        };
        let deleted = pb::Volume {
            name: "gone".into(),
            state: "deleted".into(),
            last_error: "host kvm-r is revoked: its image was left there".into(),
            ..Default::default()
        };
        let mut text = String::new();
        for (what, outcome) in [
            ("ready", Followed::Done(ready)),
            ("deleted meanwhile", Followed::Done(deleted)),
            ("timed out", Followed::TimedOut(pending)),
            ("timed out, no error yet", Followed::TimedOut(quiet)),
        ] {
            let said = match created(outcome, "10m") {
                Ok(v) => format!("ok: {} {}", v.name, v.state),
                Err(Failure(e)) => format!("error: {e}"),
            };
            text.push_str(&format!("{what}:\n{said}\n"));
        }
        insta::assert_snapshot!(text);
    }
}
