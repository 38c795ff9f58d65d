//! Reports to the management server over one mutual-TLS channel (the
//! server CA and the pinned server certificate, [`super::link`]):
//! - inventory: which volumes this host holds keys for (volume ids,
//!   generations, guest UUIDs), never key bytes; sent when it changes, and
//!   at least every minute;
//! - progress of long operations ([`crate::progress`]), every second while
//!   any runs.
//!
//! An unreachable server is retried at the next round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestkey_proto::host::{
    HeldKey, Inventory, ProgressReport, VolumeProgress, host_api_client::HostApiClient,
};
use tonic::transport::Channel;

use super::link::{LinkError, ServerLink};
use crate::ops::Daemon;
use crate::state::StateDir;

const ROUND: Duration = Duration::from_secs(5);
/// Progress reports go this often while an operation runs.
const TICK: Duration = Duration::from_secs(1);
const REFRESH: Duration = Duration::from_secs(60);

/// Runs forever (until the process ends).
pub async fn run(dir: StateDir, daemon: Arc<Daemon>) {
    let mut link = match ServerLink::from_state(&dir) {
        Ok(Some(l)) => l,
        Ok(None) => {
            tracing::warn!(
                "no server.url, ca.pem or server.sha256 in the state directory (enrolled by an older guestkeyd?): inventory reports disabled"
            );
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "inventory reports disabled");
            return;
        }
    };
    let mut client: Option<HostApiClient<Channel>> = None;
    let mut refused = Refusals::default();
    // (store change count, when sent) of the last report that got through.
    let mut last: Option<(u64, Instant)> = None;
    let mut last_round = Instant::now() - ROUND;
    let mut progress_shown = false;
    loop {
        // Progress of long operations: every second while any runs.
        let running = crate::progress::snapshot();
        if !running.is_empty() || progress_shown {
            let by_path: std::collections::HashMap<String, String> = daemon
                .store
                .volumes()
                .map(|v| v.into_values().map(|e| (e.path, e.volume_id)).collect())
                .unwrap_or_default();
            let report = ProgressReport {
                running: running
                    .iter()
                    .filter_map(|(path, e)| {
                        by_path.get(path).map(|id| VolumeProgress {
                            volume_id: id.clone(),
                            phase: e.phase.to_owned(),
                            done_bytes: e.done,
                            total_bytes: e.total,
                        })
                    })
                    .collect(),
            };
            let empty = report.running.is_empty();
            match connected(&mut client, &link).await {
                Ok(c) => match c.report_progress(report).await {
                    Ok(_) => progress_shown = !empty,
                    Err(e) => {
                        tracing::debug!(error = %e, "progress report failed");
                        client = None;
                    }
                },
                Err(e) => refused.log(&e, "progress report failed"),
            }
        }
        if last_round.elapsed() >= ROUND {
            last_round = Instant::now();
            let seen = daemon.store.changes();
            let due = match last {
                Some((changes, at)) => changes != seen || at.elapsed() >= REFRESH,
                None => true,
            };
            if due {
                // Unsealing every record is work: only when something changed.
                let d = daemon.clone();
                let held: Vec<HeldKey> = match tokio::task::spawn_blocking(move || d.inventory())
                    .await
                {
                    Ok(Ok(h)) => h
                        .into_iter()
                        .map(|k| HeldKey {
                            volume_id: k.volume,
                            generation: k.generation,
                            guest_uuid: k.guest,
                        })
                        .collect(),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read the inventory; it is not reported this round");
                        tokio::time::sleep(TICK).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the inventory task failed");
                        tokio::time::sleep(TICK).await;
                        continue;
                    }
                };
                match connected(&mut client, &link).await {
                    Ok(c) => match c.report_inventory(Inventory { held }).await {
                        Ok(answer) => {
                            last = Some((seen, Instant::now()));
                            // The server's replicas (PostgreSQL): kept, and
                            // tried when this one stops answering.
                            let urls = answer.into_inner().replica_urls;
                            if let Some(l) = link.learn(&dir, urls) {
                                link = l;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "inventory report failed; will retry");
                            client = None;
                        }
                    },
                    Err(e) => refused.log(&e, "inventory report failed; will retry"),
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// A refused server certificate is said once at warning level (it needs
/// the operator), then at debug level until it changes.
#[derive(Default)]
struct Refusals {
    last: Option<String>,
}

impl Refusals {
    fn log(&mut self, e: &LinkError, what: &str) {
        match e {
            LinkError::Refused(m) if self.last.as_deref() != Some(m.as_str()) => {
                tracing::warn!(error = %e, "{what}: the server's certificate is refused");
                self.last = Some(m.clone());
            }
            _ => tracing::debug!(error = %e, "{what}"),
        }
    }
}

/// The client on the open channel, connecting first if there is none.
pub(super) async fn connected<'a>(
    client: &'a mut Option<HostApiClient<Channel>>,
    link: &ServerLink,
) -> Result<&'a mut HostApiClient<Channel>, LinkError> {
    if client.is_none() {
        *client = Some(HostApiClient::new(
            link.connect(Duration::from_secs(10)).await?,
        ));
    }
    client
        .as_mut()
        .ok_or_else(|| LinkError::Connect("no connection to the server".into()))
}
