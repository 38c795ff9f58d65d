//! What the domain counts for the metrics (key releases by host, push
//! outcomes, database failures): cheap atomics that `transport::metrics` registers and serves
//! at `/metrics` with what a scrape reads. No label names a volume or
//! holds anything secret; host names are the only names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// What the domain counts (cheap to clone: each is an atomic behind an
/// `Arc`).
#[derive(Clone, Default)]
pub struct Counters {
    /// Key packets released (sealed to a host, audited first), by host.
    pub releases: Family<HostLabel, Counter>,
    /// Pushes to hosts whose outcome was recorded, by result.
    pub pushes: Family<ResultLabel, Counter>,
    /// Transactions that failed in the database (either engine), audit
    /// writes included: what they record was rolled back with them.
    pub store_failures: Counter,
}

/// `host="NAME"`: hosts are few and named by the admin; volumes never
/// label anything.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    /// The host's name.
    pub host: String,
}

/// `result="ok"|"failed"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// ok or failed.
    pub result: &'static str,
}

impl Counters {
    /// Counts one key released to `host`.
    pub fn release(&self, host: &str) {
        self.releases
            .get_or_create(&HostLabel {
                host: host.to_owned(),
            })
            .inc();
    }

    /// Counts one push outcome.
    pub fn push(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.pushes.get_or_create(&ResultLabel { result }).inc();
    }
}
