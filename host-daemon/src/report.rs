//! Inventory reports to the management server: which volumes this host
//! holds keys for (volume ids, generations, guest UUIDs), never key bytes.
//! Sent when the inventory changes, and at least every minute; an
//! unreachable server is retried at the next round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestkey_proto::host::{HeldKey, Inventory, host_api_client::HostApiClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::agent::Daemon;
use crate::state::StateDir;

const ROUND: Duration = Duration::from_secs(5);
const REFRESH: Duration = Duration::from_secs(60);

/// Runs forever (until the process ends).
pub async fn run(dir: StateDir, daemon: Arc<Daemon>) {
    let read = |f: &str| std::fs::read_to_string(dir.file(f)).ok();
    let (Some(url), Some(ca), Some(cert), Some(key)) = (
        read("server.url"),
        read("ca.pem"),
        read("tls.pem"),
        read("tls.key"),
    ) else {
        tracing::warn!(
            "no server.url in the state directory (enrolled by an older guestkeyd?): inventory reports disabled"
        );
        return;
    };
    let key = zeroize::Zeroizing::new(key);
    let url = url.trim().to_owned();
    let domain = crate::enroll::tls_name(&url).unwrap_or_default();
    // (store change count, when sent) of the last report that got through.
    let mut last: Option<(u64, Instant)> = None;
    loop {
        let seen = daemon.store.changes();
        let due = match last {
            Some((changes, at)) => changes != seen || at.elapsed() >= REFRESH,
            None => true,
        };
        if due {
            // Unsealing every record is work: only when something changed.
            let d = daemon.clone();
            let held: Vec<HeldKey> = match tokio::task::spawn_blocking(move || d.inventory()).await
            {
                Ok(Ok(h)) => h
                    .into_iter()
                    .map(|k| HeldKey {
                        volume_id: k.volume_id,
                        generation: k.generation,
                        guest_uuid: k.guest_uuid,
                    })
                    .collect(),
                _ => vec![],
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .identity(Identity::from_pem(&cert, key.as_bytes()))
                .domain_name(domain.clone());
            let sent = async {
                let ch = Endpoint::from_shared(url.clone())?
                    .tls_config(tls)?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(10))
                    .connect()
                    .await?;
                HostApiClient::new(ch)
                    .report_inventory(Inventory { held: held.clone() })
                    .await
                    .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match sent.await {
                Ok(()) => last = Some((seen, Instant::now())),
                Err(e) => tracing::debug!(error = %e, "inventory report failed; will retry"),
            }
        }
        tokio::time::sleep(ROUND).await;
    }
}
