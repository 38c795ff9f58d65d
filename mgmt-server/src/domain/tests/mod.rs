//! Unit tests of the domain's state machines on the in-memory store (or on
//! PostgreSQL: see `store::testing`), with
//! [`FakeAgents`] standing in for the hosts (see its header: the real host
//! flows are in `mgmt-server/tests/` and `tests/`).

#![allow(clippy::unwrap_used)]

mod adopt;
mod bounds;
mod checkpoints;
mod console;
mod escrow;
mod gates;
mod hosts;
mod leader;
mod migrate;
mod plans;
mod pools;
mod rekey;
mod trips;
mod volumes;

use std::sync::Arc;

use xdr_wipe::seal::HostSealingKey;

use crate::ca::{Ca, Role};
use crate::config::{Limits, Retry};
use crate::domain::fake_agent::FakeAgents;
use crate::domain::{Core, KeyRing, Parts};
use crate::masterkey::MasterKey;
use crate::model::{Caller, GuestInfo, VolumeFormat, VolumeInfo, VolumeState};
use crate::store::testing::TestStore;
use crate::store::{Access, Store};

/// A domain over an in-memory store and fake hosts.
pub(super) struct Bed {
    pub(super) core: Arc<Core>,
    pub(super) agents: Arc<FakeAgents>,
    pub(super) store: Arc<TestStore>,
    pub(super) admin: Caller,
}

impl Bed {
    pub(super) fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub(super) fn with_limits(limits: Limits) -> Self {
        Self::build(limits, None)
    }

    /// A bed whose audit checkpoints go to `path`.
    pub(super) fn with_checkpoints(path: std::path::PathBuf) -> Self {
        Self::build(Limits::default(), Some(path))
    }

    /// A bed on SQLite in memory, whatever `GUESTKEY_TEST_DATABASE` says.
    pub(super) fn on_sqlite() -> Self {
        Self::build_on(
            TestStore::Sqlite(crate::store::sqlite::SqliteStore::in_memory().unwrap()),
            Limits::default(),
            None,
        )
    }

    fn build(limits: Limits, checkpoints: Option<std::path::PathBuf>) -> Self {
        Self::build_on(TestStore::new(), limits, checkpoints)
    }

    fn build_on(store: TestStore, limits: Limits, checkpoints: Option<std::path::PathBuf>) -> Self {
        let store = Arc::new(store);
        let mk = MasterKey::generate().unwrap();
        {
            let mut tx = store.begin(Access::Write).unwrap();
            tx.set_master_key_id(mk.id()).unwrap();
            tx.commit().unwrap();
        }
        let agents = Arc::new(FakeAgents::default());
        let (ca, _) = Ca::generate(Role::Host, "unit").unwrap();
        let (server_ca, _) = Ca::generate(Role::Server, "unit").unwrap();
        let core = Core::new(Parts {
            store: store.clone(),
            agents: agents.clone(),
            keys: KeyRing::fixed(mk),
            ca,
            server_ca_pem: server_ca.cert_pem().to_owned(),
            server_cert_sha256: "00".repeat(32),
            server_names: vec!["kms.example".into(), "10.0.0.5".into()],
            limits,
            // No backoff: a failed operation is due again at once.
            retry: Retry {
                initial_delay_ms: 0,
                max_delay_ms: 0,
                max_attempts: 4,
            },
            checkpoints,
            entropy: guestkey_protect::tpm::Entropy::os_only(),
        })
        .unwrap();
        Self {
            core: Arc::new(core),
            agents,
            store,
            admin: Caller::Admin("admin".into()),
        }
    }

    /// Registers and enrolls a host (address NAME:7444), known to the fakes.
    pub(super) fn host(&self, name: &str) {
        let (_, token, _) = self
            .core
            .add_host(&self.admin, name, &format!("{name}:7444"))
            .unwrap();
        let sealing = HostSealingKey::generate();
        self.core
            .enroll(&token, &csr(), sealing.public_key().as_bytes())
            .unwrap();
        self.agents.add_host(name, sealing);
    }

    /// Runs the pusher's volume and guest rounds once.
    pub(super) async fn push(&self) {
        self.core.push_volumes().await.unwrap();
        self.core.push_guests(|| false).await.unwrap();
    }

    /// A volume made on `host` and ready.
    pub(super) async fn volume(&self, host: &str, name: &str) -> VolumeInfo {
        self.core
            .create_volume(
                &self.admin,
                host,
                "default",
                name,
                1 << 20,
                VolumeFormat::Qcow2,
            )
            .unwrap();
        self.push().await;
        let v = self.core.get_volume(name).unwrap();
        assert_eq!(v.state, VolumeState::Ready, "{v:?}");
        v
    }

    /// A guest defined on `host` with disks on `volumes`, defined there.
    pub(super) async fn guest(&self, host: &str, name: &str, volumes: &[&str]) -> GuestInfo {
        let disks: String = volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "<disk type='volume' device='disk'><source pool='default' volume='{v}'/><target dev='vd{}'/></disk>",
                    (b'a' + i as u8) as char
                )
            })
            .collect();
        let xml = format!(
            "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><devices>{disks}</devices></domain>"
        );
        self.core.define_guest(&self.admin, host, &xml).unwrap();
        self.push().await;
        let g = self.core.get_guest(name).unwrap();
        assert_eq!(g.pending, None, "{g:?}");
        g
    }

    /// Key generations the store holds for a volume.
    pub(super) fn generations(&self, id: &str) -> Vec<u64> {
        let mut tx = self.store.begin(Access::Read).unwrap();
        (1..=8)
            .filter(|g| tx.volume_key(id, *g).unwrap().is_some())
            .collect()
    }

    /// Audit actions, in order.
    pub(super) fn actions(&self) -> Vec<String> {
        self.core
            .list_audit(0, 10_000)
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect()
    }

    /// Everything the store holds but the audit log, as text.
    pub(super) fn snapshot(&self) -> String {
        let mut tx = self.store.begin(Access::Read).unwrap();
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            tx.hosts().unwrap(),
            tx.volumes(None).unwrap(),
            tx.guests(None).unwrap(),
            tx.policies().unwrap(),
            tx.migrations().unwrap(),
            tx.managed_pools(None).unwrap()
        )
    }
}

/// A host's CSR (only its public key is used).
pub(super) fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec!["ignored.example".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}
