//! Harness for the server's integration tests: the real `guestkey-server`
//! and `guestkeyctl` binaries on 127.0.0.1 with real mutual TLS.
//!
//! `TestAgent` is a small, instrumented test implementation of the
//! host-agent gRPC service. It enrolls like a host, serves over mutual TLS
//! with its enrolled certificate, opens every sealed key packet it receives
//! with its own sealing key, and records what it got: what the server sent
//! to which host, which the real `guestkeyd` by design never tells anyone.
//! These tests are the server's own checks, fast and without libvirt; the
//! same flows with the real guestkeyd, libvirtd and KVM are in `tests/`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::print_stderr)]

pub mod legacy;

use std::net::SocketAddr;
use std::path::Path;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use guestkey_proto::agent::{
    self,
    host_agent_server::{HostAgent, HostAgentServer},
};
use guestkey_proto::host::{EnrollRequest, EnrollResponse, host_api_client::HostApiClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use xdr_wipe::packet::VolumeId;
use xdr_wipe::seal::HostSealingKey;

pub const SERVER: &str = env!("CARGO_BIN_EXE_guestkey-server");
/// A pool the test agent lacks: creating a volume in it always fails.
pub const MISSING_POOL: &str = "missing-pool";
/// A guest whose definition the test agent always refuses.
pub const REFUSED_GUEST: &str = "refused-by-libvirt";
pub const CTL: &str = env!("CARGO_BIN_EXE_guestkeyctl");

#[allow(unused_imports)] // each test binary uses a part
pub use guestkey_testkit::{Bins, TestServer, free_port, temp_dir};

/// The programs under test, as Cargo built them for this package.
pub fn bins() -> Bins {
    Bins {
        server: SERVER.into(),
        ctl: CTL.into(),
        daemon: None,
    }
}

/// `guestkey-server init` and `run` (with `config`, TOML, if given) in a
/// scratch directory of its own: the shared harness (`guestkey-testkit`).
pub fn start_server(config: Option<&str>) -> TestServer {
    TestServer::start(bins(), config)
}

/// [`start_server`] on SQLite whatever `GUESTKEY_TEST_DATABASE` says: for
/// tests of the SQLite file itself (tampering with it, restoring a copy,
/// reading its bytes), whose PostgreSQL counterparts are in the domain's
/// unit tests and `tests/postgres.rs`.
pub fn start_sqlite_server(config: Option<&str>) -> TestServer {
    TestServer::start_with_init(bins(), config, &["--database", "sqlite"])
}

/// What the server's tests look at beyond the shared harness.
pub trait ServerExt {
    /// A read-only look at the database (WAL lets it read while the server runs).
    fn db(&self) -> rusqlite::Connection;
    /// Every row of the tables that hold state (not the audit log), as text.
    fn state_snapshot(&self) -> String;
    /// The first column of the first row of `sql`, as text, on either
    /// engine.
    fn scalar(&self, sql: &str) -> String;
    /// Runs `sql` on the database behind the server's back, on either
    /// engine (a test moving a token's expiry into the past).
    fn alter(&self, sql: &str);
    /// An admin API client with the admin credential.
    fn admin_client(
        &self,
    ) -> impl std::future::Future<
        Output = guestkey_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    >;
    /// Audit records with `action`.
    fn audit_count(&self, action: &str) -> usize;
    /// The server CA: what clients of the server trust.
    fn ca_pem(&self) -> String;
    /// The hosts CA: what host certificates chain to.
    fn hosts_ca_pem(&self) -> String;
    /// SHA-256 of the server's certificate.
    fn server_sha256(&self) -> String;
}

impl ServerExt for TestServer {
    /// A read-only look at the database (WAL lets it read while the server runs).
    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.dir.join("guestkey.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    fn alter(&self, sql: &str) {
        match self.database_name() {
            Some(name) => {
                guestkey_testkit::Postgres::shared()
                    .psql(name, sql)
                    .unwrap();
            }
            None => {
                rusqlite::Connection::open(self.dir.join("guestkey.db"))
                    .unwrap()
                    .execute_batch(sql)
                    .unwrap();
            }
        }
    }

    fn scalar(&self, sql: &str) -> String {
        if let Some(name) = self.database_name() {
            let out = guestkey_testkit::Postgres::shared()
                .psql(name, sql)
                .unwrap();
            return out
                .lines()
                .next()
                .unwrap_or("")
                .split('|')
                .next()
                .unwrap_or("")
                .to_owned();
        }
        self.db()
            .query_row(sql, [], |r| {
                Ok(match r.get_ref(0)? {
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                    rusqlite::types::ValueRef::Blob(b) => hex::encode(b),
                    other => format!("{other:?}"),
                })
            })
            .unwrap()
    }

    /// Every row of the tables that hold state (not the audit log), as text.
    fn state_snapshot(&self) -> String {
        const TABLES: [(&str, &str); 8] = [
            ("hosts", "name"),
            ("volumes", "id"),
            ("volume_keys", "volume_id, generation"),
            ("admins", "cert_sha256"),
            ("guests", "uuid"),
            ("guest_disks", "guest_uuid, volume_id"),
            ("policies", "scope, target"),
            ("guest_migrations", "guest_uuid"),
        ];
        if let Some(name) = self.database_name() {
            let pg = guestkey_testkit::Postgres::shared();
            let mut out = String::new();
            for (table, order) in TABLES {
                let rows = pg
                    .psql(name, &format!("SELECT * FROM {table} ORDER BY {order}"))
                    .unwrap();
                for row in rows.lines() {
                    out.push_str(&format!("{table}: {row}\n"));
                }
            }
            // Never empty: a comparison of two empty snapshots tests nothing.
            assert!(out.contains("admins: "), "no admin row read: {out}");
            return out;
        }
        let db = self.db();
        let mut out = String::new();
        for (table, order) in TABLES {
            let mut stmt = db
                .prepare(&format!("SELECT * FROM {table} ORDER BY {order}"))
                .unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    Ok((0..n)
                        .map(|i| match r.get_ref(i).unwrap() {
                            rusqlite::types::ValueRef::Text(t) => {
                                String::from_utf8_lossy(t).into_owned()
                            }
                            other => format!("{other:?}"),
                        })
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .unwrap();
            for row in rows {
                out.push_str(&format!("{table}: {}\n", row.unwrap()));
            }
        }
        out
    }

    /// An admin API client with the admin credential.
    async fn admin_client(
        &self,
    ) -> guestkey_proto::admin::admin_client::AdminClient<tonic::transport::Channel> {
        let dir = self.admin_dir();
        let cert = std::fs::read_to_string(dir.join("admin.pem")).unwrap();
        let key = std::fs::read_to_string(dir.join("admin.key")).unwrap();
        let ch = channel(
            self.url.clone(),
            &self.ca_pem(),
            "localhost",
            Some((&cert, &key)),
        )
        .await
        .unwrap();
        guestkey_proto::admin::admin_client::AdminClient::new(ch)
    }

    /// Audit records with `action`.
    fn audit_count(&self, action: &str) -> usize {
        self.json(&["audit", "--limit", "10000"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == action)
            .count()
    }

    /// The server CA: what clients of the server trust.
    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca/server-ca.pem")).unwrap()
    }

    /// The hosts CA: what host certificates chain to.
    fn hosts_ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca/ca.pem")).unwrap()
    }

    /// SHA-256 of the server's certificate.
    fn server_sha256(&self) -> String {
        let pem = std::fs::read_to_string(self.dir.join("tls/server.pem")).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        mgmt_server::ca::cert_sha256(&der.contents)
    }
}

/// What a test agent received.
#[derive(Debug, Clone)]
pub enum Received {
    Create {
        volume_id: String,
        name: String,
        pool: String,
        generation: u64,
        passphrase: String,
    },
    Delete {
        volume_id: String,
    },
    Define {
        xml: String,
        keys: Vec<(String, u64)>,
        /// Volumes whose key came without a packet (kept by the server,
        /// released at each start).
        on_demand: Vec<String>,
    },
    Guest {
        action: &'static str,
        uuid: String,
    },
}

/// An enrolled host whose host-agent API is a test implementation.
pub struct TestAgent {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA the server's client certificate must chain to (the server CA
    /// its enrollment returned).
    pub ca_pem: String,
    /// The server certificate it accepts calls from (as guestkeyd pins
    /// it); None accepts any certificate of `ca_pem`.
    pub server_sha256: Option<String>,
    pub sealing: Arc<HostSealingKey>,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Every call that reached the service, refused or not.
    pub calls: Arc<AtomicUsize>,
    /// Whether callers must present a certificate of `ca_pem` (as
    /// guestkeyd demands); false serves anyone (an impostor of a server).
    pub client_auth: bool,
    pub port: u16,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<()>>,
}

/// Runs `f` on a runtime of its own that is gone afterwards, with every
/// connection it opened (a server stops only when its clients are gone).
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Registers `name` and returns its enrollment token.
pub fn add_host(server: &TestServer, name: &str, port: u16) -> String {
    let v = server.json(&[
        "host",
        "add",
        name,
        "--address",
        &format!("127.0.0.1:{port}"),
    ]);
    v["enrollment_token"].as_str().unwrap().to_owned()
}

/// Calls Enroll without a client certificate, as a new host does.
pub fn enroll(
    server: &TestServer,
    token: &str,
    csr_der: Vec<u8>,
    sealing_public: Vec<u8>,
) -> Result<(String, String), Status> {
    enroll_full(server, token, csr_der, sealing_public).map(|r| (r.host_name, r.certificate_pem))
}

/// Enroll's whole answer.
pub fn enroll_full(
    server: &TestServer,
    token: &str,
    csr_der: Vec<u8>,
    sealing_public: Vec<u8>,
) -> Result<EnrollResponse, Status> {
    block_on(async {
        let ch = channel(server.url.clone(), &server.ca_pem(), "localhost", None)
            .await
            .unwrap();
        Ok(HostApiClient::new(ch)
            .enroll(EnrollRequest {
                token: token.to_owned(),
                csr_der,
                sealing_public_key: sealing_public,
                ..Default::default()
            })
            .await?
            .into_inner())
    })
}

/// A TLS channel to `url` trusting `ca_pem`, with a client certificate
/// when `identity` (certificate, key in PEM) is given.
pub async fn channel(
    url: String,
    ca_pem: &str,
    domain: &str,
    identity: Option<(&str, &str)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url)?.tls_config(tls)?.connect().await
}

pub fn csr() -> (Vec<u8>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["ignored.example".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (csr.der().to_vec(), key.serialize_pem())
}

impl TestAgent {
    /// Registers and enrolls host `name` (not yet serving).
    pub fn enroll(server: &TestServer, name: &str) -> Self {
        let port = free_port();
        let token = add_host(server, name, port);
        let sealing = HostSealingKey::generate();
        let (csr_der, key_pem) = csr();
        let r = enroll_full(
            server,
            &token,
            csr_der,
            sealing.public_key().as_bytes().to_vec(),
        )
        .unwrap();
        assert_eq!(r.host_name, name);
        assert_eq!(r.ca_certificate_pem, server.ca_pem(), "the server CA");
        assert_eq!(r.server_certificate_sha256, server.server_sha256());
        let mut a = Self::from_parts(
            name,
            r.certificate_pem,
            key_pem,
            r.ca_certificate_pem,
            sealing,
            port,
        );
        a.server_sha256 = Some(r.server_certificate_sha256);
        a
    }

    /// An agent from an enrollment done elsewhere.
    pub fn from_parts(
        name: &str,
        cert_pem: String,
        key_pem: String,
        ca_pem: String,
        sealing: HostSealingKey,
        port: u16,
    ) -> Self {
        Self {
            name: name.to_owned(),
            cert_pem,
            key_pem,
            ca_pem,
            server_sha256: None,
            sealing: Arc::new(sealing),
            received: Default::default(),
            calls: Default::default(),
            client_auth: true,
            port,
            // One worker a core, as guestkeyd's runtime.
            rt: tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap(),
            stop: None,
            serving: None,
        }
    }

    /// The agent served by a runtime of `n` workers (before `serve`).
    #[allow(dead_code)]
    pub fn with_workers(mut self, n: usize) -> Self {
        self.rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()
            .unwrap();
        self
    }

    /// Starts serving the host-agent API on 127.0.0.1:port.
    pub fn serve(&mut self) {
        let svc = AgentImpl {
            name: self.name.clone(),
            sealing: self.sealing.clone(),
            received: self.received.clone(),
            calls: self.calls.clone(),
            server_sha256: self.server_sha256.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap();
        let stop = async {
            let _ = rx.await;
        };
        let task = if self.client_auth {
            let router = Server::builder().add_service(HostAgentServer::new(svc));
            // As guestkeyd serves: guestkey_pinned_tls's handshakes.
            let acceptor = guestkey_pinned_tls::Acceptor::new(
                &self.cert_pem,
                &self.key_pem,
                &self.ca_pem,
                "the test agent's CA",
                guestkey_pinned_tls::ClientAuth::Required,
                "a test agent",
            )
            .unwrap();
            let _guard = self.rt.enter();
            let incoming = acceptor.incoming(listener);
            self.rt.spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await
                    .unwrap();
            })
        } else {
            let tls =
                ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
            self.rt.spawn(async move {
                Server::builder()
                    .tls_config(tls)
                    .unwrap()
                    .add_service(HostAgentServer::new(svc))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        stop,
                    )
                    .await
                    .unwrap();
            })
        };
        self.stop = Some(tx);
        self.serving = Some(task);
    }

    /// Stops serving and waits until the port is free again.
    pub fn stop_serving(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.serving.take() {
            self.rt.block_on(t).unwrap();
        }
    }

    /// How many creations it received (without copying them).
    #[allow(dead_code)]
    pub fn creates_count(&self) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches!(r, Received::Create { .. }))
            .count()
    }

    pub fn creates(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches!(r, Received::Create { .. }))
            .cloned()
            .collect()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct AgentImpl {
    name: String,
    sealing: Arc<HostSealingKey>,
    received: Arc<Mutex<Vec<Received>>>,
    calls: Arc<AtomicUsize>,
    server_sha256: Option<String>,
}

type R<T> = Result<Response<T>, Status>;

impl AgentImpl {
    /// Counts the call; refuses a caller whose certificate is not the
    /// pinned server's, as guestkeyd does.
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let Some(pin) = &self.server_sha256 else {
            return Ok(());
        };
        let seen = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| mgmt_server::ca::cert_sha256(c.as_ref())));
        if seen.as_deref() == Some(pin.as_str()) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "only this host's management server may call the host-agent API",
            ))
        }
    }

    fn guest(
        &self,
        action: &'static str,
        r: agent::GuestRequest,
        state: &str,
    ) -> R<agent::GuestResult> {
        self.received.lock().unwrap().push(Received::Guest {
            action,
            uuid: r.guest_uuid.clone(),
        });
        Ok(Response::new(agent::GuestResult {
            op_id: r.op_id,
            guest_uuid: r.guest_uuid,
            state: state.into(),
        }))
    }
}

#[tonic::async_trait]
impl HostAgent for AgentImpl {
    async fn create_volume(
        &self,
        req: Request<agent::CreateVolumeRequest>,
    ) -> R<agent::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let key = r.key.ok_or_else(|| Status::invalid_argument("no key"))?;
        if r.pool == MISSING_POOL {
            // As guestkeyd answers for a pool its libvirt lacks.
            return Err(Status::failed_precondition(format!(
                "there is no storage pool {MISSING_POOL} on this host"
            )));
        }
        let vid = VolumeId(
            uuid::Uuid::parse_str(&r.volume_id)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        );
        let host = xdr_wipe::XdrString::new(self.name.clone()).unwrap();
        let packet = xdr_wipe::seal::open(
            &key.sealed_packet,
            &self.sealing,
            &host,
            vid,
            key.generation,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let passphrase = String::from_utf8(packet.secret.expose_secret().to_vec()).unwrap();
        let pool_of_create = r.pool.clone();
        self.received.lock().unwrap().push(Received::Create {
            volume_id: r.volume_id.clone(),
            name: r.name,
            pool: r.pool,
            generation: key.generation,
            passphrase,
        });
        let path = format!("/srv/test-agent/{}/{}", pool_of_create, r.volume_id);
        Ok(Response::new(agent::VolumeResult {
            op_id: r.op_id,
            volume_id: r.volume_id,
            path,
            capacity_bytes: r.capacity_bytes,
        }))
    }
    async fn delete_volume(
        &self,
        req: Request<agent::DeleteVolumeRequest>,
    ) -> R<agent::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        self.received.lock().unwrap().push(Received::Delete {
            volume_id: r.volume_id.clone(),
        });
        Ok(Response::new(agent::VolumeResult {
            op_id: r.op_id,
            volume_id: r.volume_id,
            path: String::new(),
            capacity_bytes: 0,
        }))
    }
    async fn decrypt_volume(
        &self,
        req: Request<agent::DecryptVolumeRequest>,
    ) -> R<agent::VolumeResult> {
        self.check(&req)?;
        Err(Status::unimplemented("test agent"))
    }
    async fn define_guest(&self, req: Request<agent::DefineGuestRequest>) -> R<agent::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        if r.domain_xml
            .contains(&format!("<name>{REFUSED_GUEST}</name>"))
        {
            // As guestkeyd answers when libvirt refuses the XML.
            return Err(Status::failed_precondition(
                "libvirt refused the domain XML: unsupported configuration",
            ));
        }
        let host = xdr_wipe::XdrString::new(self.name.clone()).unwrap();
        let mut keys = vec![];
        let mut on_demand = vec![];
        for k in &r.keys {
            if k.sealed_packet.is_empty() {
                on_demand.push(k.volume_id.clone());
                continue;
            }
            let vid = VolumeId(
                uuid::Uuid::parse_str(&k.volume_id)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            );
            xdr_wipe::seal::open(&k.sealed_packet, &self.sealing, &host, vid, k.generation)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            keys.push((k.volume_id.clone(), k.generation));
        }
        self.received.lock().unwrap().push(Received::Define {
            xml: r.domain_xml,
            keys,
            on_demand,
        });
        Ok(Response::new(agent::GuestResult {
            op_id: r.op_id,
            guest_uuid: String::new(),
            state: "shut off".into(),
        }))
    }
    async fn undefine_guest(&self, req: Request<agent::GuestRequest>) -> R<agent::GuestResult> {
        self.check(&req)?;
        self.guest("undefine", req.into_inner(), "")
    }
    async fn start_guest(&self, req: Request<agent::GuestRequest>) -> R<agent::GuestResult> {
        self.check(&req)?;
        self.guest("start", req.into_inner(), "running")
    }
    async fn stop_guest(&self, req: Request<agent::GuestRequest>) -> R<agent::GuestResult> {
        self.check(&req)?;
        self.guest("stop", req.into_inner(), "shut off")
    }
    // Migration and rekeys are tested against the real guestkeyd
    // (tests/tests/host.rs, tests/tests/migration.rs).
    async fn prepare_migration(
        &self,
        req: Request<agent::PrepareMigrationRequest>,
    ) -> R<agent::GuestResult> {
        self.check(&req)?;
        Err(Status::unimplemented("test agent"))
    }
    async fn abort_migration(&self, req: Request<agent::GuestRequest>) -> R<agent::GuestResult> {
        self.check(&req)?;
        Err(Status::unimplemented("test agent"))
    }
    async fn migrate_guest(
        &self,
        req: Request<agent::MigrateGuestRequest>,
    ) -> R<agent::GuestResult> {
        self.check(&req)?;
        Err(Status::unimplemented("test agent"))
    }
    async fn rekey(&self, req: Request<agent::RekeyRequest>) -> R<agent::RekeyResult> {
        self.check(&req)?;
        Err(Status::unimplemented("test agent"))
    }
    async fn ping(&self, req: Request<agent::PingRequest>) -> R<agent::PingResult> {
        self.check(&req)?;
        Ok(Response::new(agent::PingResult {}))
    }
    async fn attest(&self, req: Request<agent::AttestRequest>) -> R<agent::AttestResult> {
        // A stand-in host without a TPM (attestation is tested against
        // swtpm and the real guestkeyd in tests/tests/attestation.rs).
        self.check(&req)?;
        Err(Status::failed_precondition("this test host has no TPM"))
    }
    async fn get_inventory(
        &self,
        req: Request<agent::InventoryRequest>,
    ) -> R<agent::InventoryResult> {
        self.check(&req)?;
        Ok(Response::new(agent::InventoryResult::default()))
    }
    async fn describe_domain(
        &self,
        req: Request<agent::DescribeDomainRequest>,
    ) -> R<agent::DomainDescription> {
        self.check(&req)?;
        // `guest adopt` runs against the real guestkeyd and libvirtd
        // (tests/tests/adoption.rs); this peer has no libvirt.
        Err(Status::failed_precondition("this test host has no libvirt"))
    }
    async fn make_escrow_packet(
        &self,
        req: Request<agent::EscrowPacketRequest>,
    ) -> R<agent::EscrowPacketResult> {
        self.check(&req)?;
        // Opens the key as guestkeyd would (sealed to this host); the
        // packet itself (age, the LUKS header) is guestkeyd's, tested
        // there: this peer answers fixed, non-secret bytes.
        let r = req.into_inner();
        let key = r.key.ok_or_else(|| Status::invalid_argument("no key"))?;
        let vid = VolumeId(
            uuid::Uuid::parse_str(&r.volume_id)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        );
        let host = xdr_wipe::XdrString::new(self.name.clone()).unwrap();
        xdr_wipe::seal::open(
            &key.sealed_packet,
            &self.sealing,
            &host,
            vid,
            key.generation,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.recipients.is_empty() {
            return Err(Status::invalid_argument("no recipient"));
        }
        Ok(Response::new(agent::EscrowPacketResult {
            volume_id: r.volume_id,
            packet: format!("test escrow packet {}", r.packet_id).into_bytes(),
            luks_uuid: "0d6f1a3e-7c2b-4e59-9a41-3b8c5d2e1f00".into(),
        }))
    }
    async fn describe_pool(
        &self,
        req: Request<agent::DescribePoolRequest>,
    ) -> R<agent::PoolDescription> {
        self.check(&req)?;
        // Managed pools run against the real guestkeyd and libvirtd
        // (tests/tests/adoption.rs); this peer has no libvirt.
        Err(Status::failed_precondition("this test host has no libvirt"))
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
