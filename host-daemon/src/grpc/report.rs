//! Reports to the management server over one mutual-TLS channel:
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
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ops::Daemon;
use crate::state::StateDir;

const ROUND: Duration = Duration::from_secs(5);
/// Progress reports go this often while an operation runs.
const TICK: Duration = Duration::from_secs(1);
const REFRESH: Duration = Duration::from_secs(60);

/// Runs forever (until the process ends).
pub async fn run(dir: StateDir, daemon: Arc<Daemon>) {
    let Some((url, tls)) = server_tls(&dir) else {
        tracing::warn!(
            "no server.url in the state directory (enrolled by an older guestkeyd?): inventory reports disabled"
        );
        return;
    };
    let mut client: Option<HostApiClient<Channel>> = None;
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
            match connected(&mut client, &url, &tls).await {
                Ok(c) => match c.report_progress(report).await {
                    Ok(_) => progress_shown = !empty,
                    Err(e) => {
                        tracing::debug!(error = %e, "progress report failed");
                        client = None;
                    }
                },
                Err(e) => tracing::debug!(error = %e, "progress report failed"),
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
                match connected(&mut client, &url, &tls).await {
                    Ok(c) => match c.report_inventory(Inventory { held }).await {
                        Ok(_) => last = Some((seen, Instant::now())),
                        Err(e) => {
                            tracing::debug!(error = %e, "inventory report failed; will retry");
                            client = None;
                        }
                    },
                    Err(e) => tracing::debug!(error = %e, "inventory report failed; will retry"),
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The server's URL and the mutual-TLS configuration to reach it with this
/// host's certificate, from the state directory (None: not enrolled).
pub(super) fn server_tls(dir: &StateDir) -> Option<(String, ClientTlsConfig)> {
    let read = |f: &str| std::fs::read_to_string(dir.file(f)).ok();
    let (url, ca, cert) = (read("server.url")?, read("ca.pem")?, read("tls.pem")?);
    let key = zeroize::Zeroizing::new(read("tls.key")?);
    let url = url.trim().to_owned();
    let domain = super::enroll::tls_name(&url).unwrap_or_default();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(Identity::from_pem(&cert, key.as_bytes()))
        .domain_name(domain);
    Some((url, tls))
}

/// The client on the open channel, connecting first if there is none.
pub(super) async fn connected<'a>(
    client: &'a mut Option<HostApiClient<Channel>>,
    url: &str,
    tls: &ClientTlsConfig,
) -> Result<&'a mut HostApiClient<Channel>, Box<dyn std::error::Error + Send + Sync>> {
    if client.is_none() {
        let ch = Endpoint::from_shared(url.to_owned())?
            .tls_config(tls.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        *client = Some(HostApiClient::new(ch));
    }
    client
        .as_mut()
        .ok_or_else(|| "no connection to the server".into())
}
