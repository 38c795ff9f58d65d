//! The server's domain logic, written against two traits of ours: the
//! [`Store`] (every read and write, one transaction per mutation together
//! with its audit record) and the [`AgentClient`] (every call to a host).
//!
//! Modules, each depending only on those listed before it:
//! [`audit`] (the MACed hash chain and signed heads), [`keyring`] (the
//! master and audit keys held), [`checkpoints`] (signed heads kept outside
//! the database), [`refusals`] (bounded records of refused calls),
//! [`release`] (key release: audited first, fail closed; rate limits), [`hosts`]
//! (enrollment, authorisation, inventory), [`volumes`], [`guests`],
//! [`rekey`] (rotation and policies), [`push`] and [`guest_push`]
//! (delivering pending operations), [`convert`] (`volume encrypt`), [`migrate`],
//! [`escrow`] (escrow packets under a two-person rule) and
//! [`rotate`] (the master key).
//!
//! Domain methods are synchronous and may block on the store; async
//! callers run them on a blocking thread with [`Core::blocking`]. The
//! async flows here ([`push`], [`convert`], [`migrate`]) do the same for
//! each store step and await only the host calls in between.
//!
//! May import: `model`, `store` (its traits, never an implementation), and
//! the leaf modules (`ca`, `config`, `domxml`, `masterkey`, `tls`). Never
//! tonic, prost or rusqlite. Imported by `transport`, `scheduler`, `init`
//! and the programs.

pub mod adopt;
pub mod agent;
pub mod allowlist;
pub mod approvals;
pub mod attest;
pub mod audit;
pub mod checkpoints;
pub mod console;
pub mod convert;
pub mod escrow;
#[cfg(test)]
pub(crate) mod fake_agent;
pub mod guest_push;
pub mod guests;
pub mod halves;
pub mod hosts;
pub mod keyring;
pub mod leader;
pub mod migrate;
pub mod on_demand;
pub mod pools;
pub mod push;
pub mod recovery;
pub mod refusals;
pub mod rekey;
pub mod release;
pub mod rotate;
#[cfg(test)]
mod tests;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use agent::{AgentClient, AgentError, AgentErrorKind};
pub use keyring::KeyRing;

use crate::ca::Ca;
use crate::config::{Limits, Retry};
use crate::model::{CoreError, Progress};
use crate::store::{Access, Store, Tx};

/// What the domain is built from.
pub struct Parts {
    /// The database.
    pub store: Arc<dyn Store>,
    /// The hosts.
    pub agents: Arc<dyn AgentClient>,
    /// The master key.
    pub keys: KeyRing,
    /// The hosts CA: it signs host certificates at enrollment.
    pub ca: Ca,
    /// The server CA (PEM): what hosts trust the server with.
    pub server_ca_pem: String,
    /// SHA-256 (hex) of the server's certificate, which hosts pin.
    pub server_cert_sha256: String,
    /// The server certificate's names (DNS names and IP addresses): no
    /// host may take one.
    pub server_names: Vec<String>,
    /// Per-host limits.
    pub limits: Limits,
    /// Push retry policy.
    pub retry: Retry,
    /// The file audit checkpoints are appended to (None: the log only).
    pub checkpoints: Option<PathBuf>,
    /// Where volume keys get their randomness (TPM bytes mixed in when the
    /// server's keys are sealed to its TPM).
    pub entropy: guestkey_protect::tpm::Entropy,
}

/// The management server's domain: hosts, volumes, guests, rotation and
/// migration, over a store and the hosts' agents.
pub struct Core {
    store: Arc<dyn Store>,
    agents: Arc<dyn AgentClient>,
    keys: KeyRing,
    ca: Ca,
    server_ca_pem: String,
    server_cert_sha256: String,
    server_names: Vec<String>,
    limits: Limits,
    retry: Retry,
    releases: release::ReleaseLimiter,
    refusals: refusals::Refusals,
    checkpoints: checkpoints::Checkpoints,
    /// Hosts' progress on long volume operations, by volume id.
    progress: Mutex<HashMap<String, Progress>>,
    /// Guests whose migration this process is driving now.
    migrating_now: Mutex<HashSet<String>>,
    /// Volumes a push round delivers now (see `push`).
    pushing: Mutex<HashSet<String>>,
    /// This process as a replica (see `leader`).
    me: std::sync::OnceLock<leader::Me>,
    /// Woken when an operation is queued for a host.
    wake: tokio::sync::Notify,
    entropy: guestkey_protect::tpm::Entropy,
    /// Runs as a verifier (`--role verifier`): never calls hosts.
    verifier: bool,
    /// CAs whose EK certificates a TPM must have (DER; none: not checked).
    ek_anchors: Vec<Vec<u8>>,
    /// What the metrics count (releases, pushes).
    counters: crate::metrics::Counters,
}

impl Core {
    /// The domain over `parts`. A database without an audit key gets one
    /// here; a database behind its newest audit checkpoint is reported in
    /// the log.
    pub fn new(parts: Parts) -> Result<Self, CoreError> {
        parts.keys.ensure_audit_key(parts.store.as_ref())?;
        let core = Self {
            releases: release::ReleaseLimiter::new(parts.limits.key_releases_per_minute),
            refusals: refusals::Refusals::new(),
            checkpoints: checkpoints::Checkpoints::new(parts.checkpoints),
            // Writes made as leader check its fence (see `leader`).
            store: Arc::new(leader::FencedStore(parts.store)),
            agents: parts.agents,
            keys: parts.keys,
            ca: parts.ca,
            server_ca_pem: parts.server_ca_pem,
            server_cert_sha256: parts.server_cert_sha256,
            server_names: parts.server_names,
            limits: parts.limits,
            retry: parts.retry,
            progress: Mutex::new(HashMap::new()),
            migrating_now: Mutex::new(HashSet::new()),
            pushing: Mutex::new(HashSet::new()),
            me: std::sync::OnceLock::new(),
            wake: tokio::sync::Notify::new(),
            entropy: parts.entropy,
            verifier: false,
            ek_anchors: vec![],
            counters: crate::metrics::Counters::default(),
        };
        core.check_newest_checkpoint()?;
        Ok(core)
    }

    /// How many volumes are in each state, for the metrics.
    pub fn volume_state_counts(&self) -> Result<Vec<(String, u64)>, CoreError> {
        self.read(|tx| Ok(tx.volume_state_counts()?))
    }

    /// What this domain counts for the metrics.
    pub fn counters(&self) -> &crate::metrics::Counters {
        &self.counters
    }

    /// This domain as a verifier's: it keeps halves of split keys and
    /// never calls hosts (what needs a call says so).
    pub fn as_verifier(mut self) -> Self {
        self.verifier = true;
        self
    }

    /// This domain with EK CAs: TPMs enroll only with an EK certificate one
    /// of them signed.
    pub fn with_ek_anchors(mut self, anchors: Vec<Vec<u8>>) -> Self {
        self.ek_anchors = anchors;
        self
    }

    /// A new volume key (a LUKS passphrase) from the OS's random bytes,
    /// with the TPM's mixed in when there is one.
    pub(crate) fn new_passphrase(&self) -> Result<xdr_wipe::packet::PacketSecret, CoreError> {
        let k = self
            .entropy
            .key(32)
            .map_err(|e| CoreError::Internal(format!("no random bytes for a key: {e}")))?;
        let raw: &[u8; 32] = k
            .expose_secret()
            .try_into()
            .map_err(|_| CoreError::Internal("a 32-byte key came out another size".into()))?;
        Ok(xdr_wipe::packet::passphrase_from_random(raw))
    }

    /// A new volume key: a passphrase, or for a split key this server's
    /// half of one (32 random bytes, the TPM's mixed in as above).
    pub(crate) fn new_key(&self, split: bool) -> Result<xdr_wipe::packet::PacketSecret, CoreError> {
        if !split {
            return self.new_passphrase();
        }
        self.new_half()
    }

    /// 32 random bytes: one half of a split passphrase.
    pub(crate) fn new_half(&self) -> Result<xdr_wipe::packet::PacketSecret, CoreError> {
        let k = self
            .entropy
            .key(32)
            .map_err(|e| CoreError::Internal(format!("no random bytes for a key: {e}")))?;
        xdr_wipe::packet::PacketSecret::copy_from_secret_slice(k.expose_secret())
            .map_err(|e| CoreError::Internal(e.to_string()))
    }

    /// The hosts CA certificate (PEM): host certificates chain to it.
    pub fn hosts_ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The database's round trips so far, and the time waited for them
    /// (benchmarks show the database's share of a push with it).
    pub fn store_stats(&self) -> crate::store::StoreStats {
        self.store.stats()
    }

    /// The server CA certificate (PEM): what `guestkeyd enroll --ca-file`
    /// needs, and what hosts trust the server with.
    pub fn server_ca_pem(&self) -> &str {
        &self.server_ca_pem
    }

    /// SHA-256 (hex) of the server's certificate, which host daemons pin.
    pub fn server_cert_sha256(&self) -> &str {
        &self.server_cert_sha256
    }

    /// Notified whenever an operation is queued for a host.
    pub fn queued(&self) -> &tokio::sync::Notify {
        &self.wake
    }

    /// Runs `f` in a read transaction.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        let out = self
            .store
            .begin(Access::Read)
            .map_err(CoreError::from)
            .and_then(|mut tx| f(&mut *tx));
        self.count_store_failure(out)
    }

    /// Counts a database failure for the metrics; passes `out` on.
    fn count_store_failure<T>(&self, out: Result<T, CoreError>) -> Result<T, CoreError> {
        if let Err(CoreError::Store(_)) = &out {
            self.counters.store_failures.inc();
        }
        out
    }

    /// Runs `f` in a write transaction and commits it if `f` succeeds (a
    /// failure rolls everything back, audit records included).
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        let out = (|| {
            let mut tx = self.store.begin(Access::Write)?;
            let out = f(&mut *tx)?;
            tx.commit()?;
            Ok(out)
        })();
        self.count_store_failure(out)
    }

    /// Runs blocking domain code (the store) on a thread meant for it, off
    /// the async runtime's workers.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, CoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Core) -> Result<T, CoreError> + Send + 'static,
    {
        let core = self.clone();
        // Leader work stays leader work on the blocking thread.
        let fence = leader::current();
        tokio::task::spawn_blocking(move || leader::on_thread(fence, || f(&core)))
            .await
            .map_err(|e| CoreError::Internal(format!("a blocking task failed: {e}")))?
    }

    /// Delay before the next attempt after `attempts` failures: doubling
    /// from `retry.initial_delay_ms` up to `retry.max_delay_ms`.
    pub(crate) fn retry_delay_ms(&self, attempts: u32) -> u64 {
        self.retry
            .initial_delay_ms
            .saturating_mul(1u64 << attempts.min(20))
            .min(self.retry.max_delay_ms)
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
