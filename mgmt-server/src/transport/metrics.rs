//! The server's metrics: `GET /metrics` in the Prometheus (OpenMetrics)
//! text format, on a plain-HTTP listener of its own, off unless
//! `[metrics] listen` is set (the example puts it on 127.0.0.1).
//!
//! What it shows, none of it per volume and nothing secret in a label (host
//! names are the only names, as the admin gave them):
//! every gRPC call by service, method and result code, and its latency;
//! key releases by host; pushes to hosts by result; volumes by state
//! (rekeys running, volumes failed); rekeys overdue (how many, since
//! when); hosts by state, how
//! many passed their last attestation, when each enrolled host last
//! reported; whether this replica leads; when the
//! server certificate expires; where the master key is kept. Method labels
//! come from the call's path only when it is a method of our APIs (the
//! list read from the schema's descriptor set); any other path is
//! `unknown`, so a client cannot grow the label set.
//!
//! [`Counters`] (`crate::metrics`) are what the domain counts as it works;
//! [`Metrics`] adds what a scrape reads (hosts, leadership) and the RPC
//! layer (`guestkey_rpc_metrics::RpcLayer`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::domain::Core;
use crate::metrics::{Counters, HostLabel};
use crate::model::CoreError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: &'static str,
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: &'static str,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

/// The server's registry.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    hosts: Family<StateLabel, Gauge<i64, AtomicI64>>,
    volumes: Family<StateLabel, Gauge<i64, AtomicI64>>,
    attested: Gauge<i64, AtomicI64>,
    leader: Gauge<i64, AtomicI64>,
    overdue: Gauge<i64, AtomicI64>,
    overdue_since: Gauge<i64, AtomicI64>,
    reported: Family<HostLabel, Gauge<i64, AtomicI64>>,
    /// The call paths of our APIs: the only method names a label holds.
    methods: std::collections::BTreeSet<String>,
    /// One scrape at a time (a scrape clears and refills the host series).
    scraping: std::sync::Mutex<()>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    /// The registry over the domain's `counters`, with the server
    /// certificate's expiry (Unix seconds) and the master key's source.
    pub fn new(counters: &Counters, cert_expiry_unix: i64, master_key_source: &str) -> Self {
        let mut registry = Registry::with_prefix("guestkey");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC calls served, by service, method and result code",
            calls.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a gRPC call, by service and method",
            latency.clone(),
        );
        registry.register(
            "key_releases",
            "Key packets released, by host (each audited first; counted when released, before its transaction commits)",
            counters.releases.clone(),
        );
        registry.register(
            "pushes",
            "Operations pushed to hosts whose outcome was recorded, by result",
            counters.pushes.clone(),
        );
        registry.register(
            "store_failures",
            "Database transactions that failed (either engine), audit writes included",
            counters.store_failures.clone(),
        );
        let hosts = Family::<StateLabel, Gauge<i64, AtomicI64>>::default();
        registry.register("hosts", "Hosts by state", hosts.clone());
        let volumes = Family::<StateLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "volumes",
            "Volumes by state (not deleted ones): rekeying ones are rekeys running, failed ones gave up",
            volumes.clone(),
        );
        let overdue = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "rekeys_overdue",
            "Volumes whose key is older than their rotation policy allows, or whose after-migration rekey is past due, and no rekey runs (host unreachable, volume failed, retry waiting)",
            overdue.clone(),
        );
        let overdue_since = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "rekey_overdue_since_timestamp_seconds",
            "When the most overdue of those became due (Unix time; 0: none overdue)",
            overdue_since.clone(),
        );
        let attested = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "hosts_attested",
            "Hosts whose last attestation passed and still counts",
            attested.clone(),
        );
        let reported = Family::<HostLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "host_last_report_timestamp_seconds",
            "When each enrolled host last reported its inventory (Unix time; 0: never)",
            reported.clone(),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader's lease (pushes, rotations), else 0",
            leader.clone(),
        );
        let expiry = Gauge::<i64, AtomicI64>::default();
        expiry.set(cert_expiry_unix);
        registry.register(
            "server_certificate_expiry_timestamp_seconds",
            "When the server's TLS certificate expires (Unix time)",
            expiry,
        );
        let source = Family::<SourceLabel, Gauge<i64, AtomicI64>>::default();
        source
            .get_or_create(&SourceLabel {
                source: master_key_source.to_owned(),
            })
            .set(1);
        registry.register(
            "master_key_source",
            "Where the master key is kept (file, tpm, env, prompt): 1 for the one in use",
            source,
        );
        Self {
            registry,
            calls,
            latency,
            hosts,
            volumes,
            attested,
            leader,
            overdue,
            overdue_since,
            reported,
            methods: guestkey_proto::method_paths(),
            scraping: std::sync::Mutex::new(()),
        }
    }

    /// Counts one answered call.
    fn call(&self, path: &str, code: i32, seconds: f64) {
        let (service, method) = split_path(path);
        // Only a method of our APIs is a name: any other path a client
        // sends (answered UNIMPLEMENTED, or refused by the role before
        // tonic sees it) is `unknown`, so no client can grow the labels.
        let method = if self.methods.contains(path) {
            method.to_owned()
        } else {
            "unknown".to_owned()
        };
        self.calls
            .get_or_create(&CallLabels {
                service,
                method: method.clone(),
                code: guestkey_rpc_metrics::code_name(code),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { service, method })
            .observe(seconds);
    }

    /// Reads what a scrape shows now (hosts), then encodes everything.
    fn scrape(&self, core: &Core, leading: bool) -> Result<String, CoreError> {
        let _one = self.scraping.lock().unwrap_or_else(|p| p.into_inner());
        let hosts = core.list_hosts()?;
        let now = crate::domain::now_unix();
        for &state in crate::model::HostState::ALL {
            let n = hosts.iter().filter(|h| h.state == state).count();
            self.hosts
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
        let counts = core.volume_state_counts()?;
        for &state in crate::model::VolumeState::ALL {
            if state == crate::model::VolumeState::Deleted {
                continue;
            }
            let n = counts
                .iter()
                .find(|(s, _)| s == state.as_str())
                .map_or(0, |(_, n)| *n);
            self.volumes
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let overdue = core.rekeys_overdue()?;
        self.overdue
            .set(i64::try_from(overdue.volumes).unwrap_or(i64::MAX));
        self.overdue_since.set(overdue.oldest_due);
        let attested = hosts
            .iter()
            .filter(|h| {
                h.attestation.as_ref().is_some_and(|a| {
                    a.fresh_until_unix > now && a.last.as_ref().is_some_and(|l| l.ok)
                })
            })
            .count();
        self.attested.set(attested as i64);
        // Revoked or removed hosts drop out.
        self.reported.clear();
        for h in hosts
            .iter()
            .filter(|h| h.state == crate::model::HostState::Enrolled)
        {
            self.reported
                .get_or_create(&HostLabel {
                    host: h.name.clone(),
                })
                .set(h.inventory_reported_unix);
        }
        self.leader.set(i64::from(leading));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| CoreError::Internal(format!("metrics: {e}")))?;
        Ok(out)
    }
}

/// (service, method) of a gRPC path.
fn split_path(path: &str) -> (&'static str, &str) {
    let service = match path.split('/').nth(1) {
        Some("guestkey.admin.v1.Admin") => "admin",
        Some("guestkey.host.v1.HostApi") => "host",
        _ => "other",
    };
    (service, path.rsplit('/').next().unwrap_or(""))
}

/// Serves `/metrics` on `listen` until `stop` fires; returns the address
/// it listens on.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    core: Arc<Core>,
    leading: tokio::sync::watch::Receiver<Option<crate::domain::leader::Fence>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), CoreError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        CoreError::Internal(format!(
            "metrics.listen: cannot listen on {listen}: {e} (pick another address)"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| CoreError::Internal(e.to_string()))?;
    let scrape: guestkey_rpc_metrics::Scrape = Arc::new(move || {
        let is_leading = leading.borrow().is_some();
        metrics.scrape(&core, is_leading).map_err(|e| e.to_string())
    });
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = guestkey_rpc_metrics::serve_metrics(listener, scrape, shutdown).await {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    Ok((local, task))
}

impl guestkey_rpc_metrics::Observer for Metrics {
    fn call(&self, path: &str, code: i32, seconds: f64) {
        Metrics::call(self, path, code, seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_known_method_and_unknown_ones_under_one_label() {
        let m = Metrics::new(&Counters::default(), 1_900_000_000, "file");
        m.call("/guestkey.admin.v1.Admin/ListHosts", 0, 0.001);
        m.call("/guestkey.admin.v1.Admin/ListHosts", 0, 0.002);
        m.call("/guestkey.host.v1.HostApi/Enroll", 16, 0.001);
        for i in 0..50 {
            m.call(&format!("/guestkey.admin.v1.Admin/Made{i}"), 12, 0.0);
            m.call(&format!("/x{i}/y"), 12, 0.0);
            // A verifier's role layer refuses before tonic: not 12.
            m.call(&format!("/guestkey.admin.v1.Admin/Other{i}"), 9, 0.0);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains(
                r#"guestkey_rpc_requests_total{service="admin",method="ListHosts",code="OK"} 2"#
            ),
            "{out}"
        );
        assert!(out.contains(
            r#"guestkey_rpc_requests_total{service="host",method="Enroll",code="UNAUTHENTICATED"} 1"#
        ));
        assert!(out.contains(
            r#"guestkey_rpc_requests_total{service="admin",method="unknown",code="UNIMPLEMENTED"} 50"#
        ));
        assert!(out.contains(
            r#"guestkey_rpc_requests_total{service="admin",method="unknown",code="FAILED_PRECONDITION"} 50"#
        ));
        assert!(
            !out.contains("Made") && !out.contains("Other"),
            "no label from an unknown name"
        );
        assert!(out.contains("guestkey_server_certificate_expiry_timestamp_seconds 1900000000"));
        assert!(out.contains(r#"guestkey_master_key_source{source="file"} 1"#));
        assert!(out.ends_with("# EOF\n"));
    }
}
