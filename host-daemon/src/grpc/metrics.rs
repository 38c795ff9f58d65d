//! guestkeyd's metrics: `GET /metrics` in the Prometheus (OpenMetrics)
//! text format, plain HTTP, off unless `guestkeyd run --metrics-listen
//! IP:PORT` (keep it on 127.0.0.1 or a monitoring network).
//!
//! What it shows, counts only (no volume, guest, secret or key in any
//! label): the server's calls of the host-agent API by method and result
//! code, and their latency; volumes in the registry, guests in the sealed
//! store; libvirt secrets defined now for starting guests, those whose
//! removal failed and is retried, and secrets handed to libvirt since
//! start; when this host's certificate expires; whether its keys are
//! sealed to its TPM.

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ops::Daemon;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

type IntGauge = Gauge<i64, AtomicI64>;

/// guestkeyd's registry.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    volumes: IntGauge,
    guests: IntGauge,
    secrets_now: IntGauge,
    stale: IntGauge,
    prepared: Counter,
    /// What `prepared` was brought up to at the last scrape (held for the
    /// whole scrape: one at a time).
    prepared_seen: Mutex<u64>,
    /// The host-agent API's call paths: the only method names a label holds.
    methods: std::collections::BTreeSet<String>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s (a volume's creation, a shallow rekey); longer
    // operations (deep rekeys, migrations) land in +Inf.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    /// The registry, with this host's certificate expiry (Unix seconds)
    /// and whether its keys are sealed to its TPM.
    pub fn new(cert_expiry_unix: i64, tpm_sealed: bool) -> Self {
        let mut registry = Registry::with_prefix("guestkeyd");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "Host-agent calls of the management server, by method and result code",
            calls.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a host-agent call, by method",
            latency.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = IntGauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let volumes = gauge(&mut registry, "volumes", "Volumes this host manages");
        let guests = gauge(
            &mut registry,
            "guests",
            "Guests whose definition and keys this host keeps (sealed)",
        );
        let secrets_now = gauge(
            &mut registry,
            "libvirt_secrets",
            "Ephemeral libvirt secrets defined now for guests being started",
        );
        let stale = gauge(
            &mut registry,
            "stale_secrets",
            "libvirt secrets whose removal failed and is being retried",
        );
        let prepared = Counter::default();
        registry.register(
            "secrets_prepared",
            "Secrets handed to libvirt for guest starts, restores and incoming migrations",
            prepared.clone(),
        );
        let expiry = gauge(
            &mut registry,
            "certificate_expiry_timestamp_seconds",
            "When this host's TLS certificate expires (Unix time)",
        );
        expiry.set(cert_expiry_unix);
        let sealed = gauge(
            &mut registry,
            "keys_sealed_to_tpm",
            "1 if this host's keys are sealed to its TPM, 0 if kept in files",
        );
        sealed.set(i64::from(tpm_sealed));
        Self {
            registry,
            calls,
            latency,
            volumes,
            guests,
            secrets_now,
            stale,
            prepared,
            prepared_seen: Mutex::new(0),
            methods: guestkey_proto::method_paths(),
        }
    }

    /// Reads the daemon's counts, then encodes everything.
    fn scrape(&self, daemon: &Daemon) -> Result<String, String> {
        let mut seen = self.prepared_seen.lock().unwrap_or_else(|p| p.into_inner());
        let c = daemon.counts().map_err(|e| e.to_string())?;
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.volumes.set(n(c.volumes));
        self.guests.set(n(c.guests));
        self.secrets_now.set(n(c.secrets_now));
        self.stale.set(n(c.stale_secrets));
        self.prepared
            .inc_by(c.secrets_prepared.saturating_sub(*seen));
        *seen = (*seen).max(c.secrets_prepared);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

impl guestkey_rpc_metrics::Observer for Metrics {
    fn call(&self, path: &str, code: i32, seconds: f64) {
        // Only methods of the host-agent API (read from the schema) are
        // names; any other path is `unknown`.
        let method = match path.strip_prefix("/guestkey.agent.v1.HostAgent/") {
            Some(m) if self.methods.contains(path) => m.to_owned(),
            _ => "unknown".to_owned(),
        };
        self.calls
            .get_or_create(&CallLabels {
                method: method.clone(),
                code: guestkey_rpc_metrics::code_name(code),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }
}

/// Serves `/metrics` on `listen` (in a task of its own, for the process's
/// life); returns the address it listens on.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    daemon: Arc<Daemon>,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        format!("--metrics-listen: cannot listen on {listen}: {e} (pick another address)")
    })?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let scrape: guestkey_rpc_metrics::Scrape = Arc::new(move || metrics.scrape(&daemon));
    tokio::spawn(async move {
        let forever = std::future::pending::<()>();
        if let Err(e) = guestkey_rpc_metrics::serve_metrics(listener, scrape, forever).await {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestkey_rpc_metrics::Observer;

    #[test]
    fn calls_are_counted_by_method_and_unknown_paths_under_one_label() {
        let m = Metrics::new(1_900_000_000, true);
        m.call("/guestkey.agent.v1.HostAgent/CreateVolume", 0, 0.01);
        m.call("/guestkey.agent.v1.HostAgent/Rekey", 9, 0.01);
        for i in 0..20 {
            m.call(&format!("/guestkey.agent.v1.HostAgent/Made{i}"), 12, 0.0);
            m.call(&format!("/other{i}/X"), 0, 0.0);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        for want in [
            r#"guestkeyd_rpc_requests_total{method="CreateVolume",code="OK"} 1"#,
            r#"guestkeyd_rpc_requests_total{method="Rekey",code="FAILED_PRECONDITION"} 1"#,
            r#"guestkeyd_rpc_requests_total{method="unknown",code="UNIMPLEMENTED"} 20"#,
            r#"guestkeyd_rpc_requests_total{method="unknown",code="OK"} 20"#,
            "guestkeyd_certificate_expiry_timestamp_seconds 1900000000",
            "guestkeyd_keys_sealed_to_tpm 1",
        ] {
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
        assert!(!out.contains("Made") && !out.contains("other"), "{out}");
    }
}
