//! A throw-away PostgreSQL 15 cluster (Debian's `postgresql-15`, which
//! `scripts/setup` installs) on 127.0.0.1: the real engine, nothing set up
//! by hand. [`Postgres::shared`] is one cluster per test process, stopped
//! and removed when the process exits (or on a signal); each test takes a
//! database of its own from it ([`Postgres::database`]). [`Postgres::start`]
//! is a cluster of the caller's own, for tests that stop or kill it.
//!
//! The server runs as the `postgres` user (`setpriv`, with a parent-death
//! signal, so a test killed with -9 leaves no postmaster behind) with
//! `fsync=off`: the tests check the store's logic, not the disk's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cleanup::{Made, ProcessGuard};
use crate::{free_port, temp_dir};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running PostgreSQL cluster.
pub struct Postgres {
    root: PathBuf,
    port: u16,
    /// With TLS: the CA that signed the server's certificate (PEM file).
    tls_ca: Option<PathBuf>,
    child: Mutex<Option<(Child, ProcessGuard)>>,
    _gone: Made,
}

static SHARED: OnceLock<Postgres> = OnceLock::new();
static SHARED_STOP: Mutex<bool> = Mutex::new(false);
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

extern "C" fn stop_shared() {
    let mut stopped = SHARED_STOP.lock().unwrap_or_else(|p| p.into_inner());
    if !*stopped {
        *stopped = true;
        if let Some(pg) = SHARED.get() {
            pg.stop();
            let _ = std::fs::remove_dir_all(&pg.root);
        }
    }
}

/// Stops the shared cluster when the test process exits (the harness
/// returns from main, which calls `exit`).
#[allow(unsafe_code)]
fn at_exit() {
    // SAFETY: `stop_shared` is an `extern "C" fn()` taking nothing that
    // does not unwind (it locks, signals, waits and removes files; every
    // error is ignored), which is all `atexit` asks of its argument.
    let _ = unsafe { libc::atexit(stop_shared) };
}

impl Postgres {
    /// This process's cluster, started by the first caller.
    pub fn shared() -> &'static Postgres {
        SHARED.get_or_init(|| {
            // The parent-death signal follows the thread that started the
            // server, so a thread that lives as long as the process does.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(Postgres::start());
                loop {
                    std::thread::park();
                }
            });
            let pg = rx.recv().expect("the PostgreSQL starter thread ran");
            at_exit();
            pg
        })
    }

    /// A cluster of the caller's own (stopped and removed when dropped).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// As [`Postgres::start`], serving TLS too, with a certificate for
    /// 127.0.0.1 and localhost from a CA of its own ([`Postgres::tls_ca`]).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// As [`Postgres::start_tls`], and the role `guestkey` (a superuser)
    /// may log in over TCP only with TLS and a client certificate of that
    /// CA for `CN=guestkey` (`hostssl ... cert`); the test kit's own
    /// `postgres` role still logs in as before. The certificate and its
    /// key: [`Postgres::client_identity`].
    pub fn start_client_certs() -> Self {
        let pg = Self::start_with(true);
        let root = &pg.root;
        std::fs::write(
            root.join("data/pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             hostssl all guestkey 127.0.0.1/32 cert\n\
             host all all 127.0.0.1/32 reject\n",
        )
        .expect("pg_hba.conf");
        pg.psql("postgres", "CREATE ROLE guestkey LOGIN SUPERUSER")
            .expect("role guestkey");
        pg.restart();
        pg
    }

    /// With [`Postgres::start_client_certs`]: the client certificate and
    /// key (mode 0600) of role `guestkey`.
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        (self.root.join("client.crt"), self.root.join("client.key"))
    }

    /// The URL of database `db` as role `user`.
    pub fn url_as(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    fn start_with(tls: bool) -> Self {
        let root = temp_dir("postgres");
        let gone = Made::dir(&root);
        chown_postgres(&root);
        let data = root.join("data");
        let out = as_postgres(&format!("{BIN}/initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("initdb runs (Debian package postgresql-15; scripts/setup installs it)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tls_ca = tls.then(|| make_certificates(&root));
        let pg = Self {
            root,
            port: free_port(),
            tls_ca,
            child: Mutex::new(None),
            _gone: gone,
        };
        pg.run();
        pg
    }

    fn run(&self) {
        let child = as_postgres(&format!("{BIN}/postgres"))
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.root)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ])
            .arg("-c")
            .arg(format!("log_directory={}", self.root.display()))
            .args(self.tls_ca.iter().flat_map(|_| {
                [
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!("ssl_cert_file={}", self.root.join("server.crt").display()),
                    "-c".to_owned(),
                    format!("ssl_key_file={}", self.root.join("server.key").display()),
                    "-c".to_owned(),
                    format!("ssl_ca_file={}", self.root.join("ca.pem").display()),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.root.join("server.log")).expect("server.log"),
            ))
            .spawn()
            .expect("postgres runs");
        let guard = Made::process(child.id(), "postgres");
        *self.lock() = Some((child, guard));
        let end = Instant::now() + Duration::from_secs(30);
        while self.psql("postgres", "SELECT 1").is_err() {
            if let Some((c, _)) = self.lock().as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("postgres exited ({status}): {}", self.log());
                }
            }
            assert!(
                Instant::now() < end,
                "postgres did not answer within 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Child, ProcessGuard)>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// With [`Postgres::start_tls`]: the CA certificate (PEM) to trust.
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls_ca.as_deref()
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database (dropped with its guard).
    pub fn database(&self) -> TestDatabase<'_> {
        let name = format!(
            "gk_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDatabase {
            pg: self,
            url: self.url(&name),
            name,
        }
    }

    /// Runs SQL with psql on database `db`; its output (unaligned, tuples
    /// only) or its error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(format!("{BIN}/psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Stops the server at once (as a power cut: SIGKILL to the postmaster;
    /// its backends end when they notice).
    pub fn kill(&self) {
        if let Some((mut c, _guard)) = self.lock().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Backends that still run keep the port until they notice.
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: open connections are ended).
    pub fn stop(&self) {
        if let Some((mut c, _guard)) = self.lock().take() {
            signal(c.id(), rustix::process::Signal::INT);
            let end = Instant::now() + Duration::from_secs(10);
            while !matches!(c.try_wait(), Ok(Some(_))) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data and port.
    pub fn restart(&self) {
        self.stop();
        self.run();
    }

    /// Its folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A database of a test; dropped (with its connections ended) with this.
pub struct TestDatabase<'a> {
    pg: &'a Postgres,
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl Drop for TestDatabase<'_> {
    fn drop(&mut self) {
        let _ = self.pg.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// A command run as the `postgres` user, killed when the thread that
/// started it ends.
fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--pdeathsig=KILL",
        program,
    ]);
    c
}

/// A CA and a server certificate for 127.0.0.1 and localhost in `root`
/// (`server.crt`, `server.key` 0600 for the postgres user); the CA's path.
fn make_certificates(root: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("a key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "guestkey test PostgreSQL CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("a key");
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server parameters");
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = leaf.signed_by(&key, &issuer).expect("server certificate");
    // A client certificate for role guestkey (used where the cluster asks
    // for one: Postgres::start_client_certs).
    let client_key = KeyPair::generate().expect("a key");
    let mut client = CertificateParams::new(Vec::<String>::new()).expect("client parameters");
    client
        .distinguished_name
        .push(DnType::CommonName, "guestkey");
    let client_cert = client
        .signed_by(&client_key, &issuer)
        .expect("client certificate");
    std::fs::write(root.join("client.crt"), client_cert.pem()).expect("client.crt");
    let client_key_path = root.join("client.key");
    std::fs::write(&client_key_path, client_key.serialize_pem()).expect("client.key");
    let ca_path = root.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).expect("ca.pem");
    std::fs::write(root.join("server.crt"), cert.pem()).expect("server.crt");
    let key_path = root.join("server.key");
    std::fs::write(&key_path, key.serialize_pem()).expect("server.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(&client_key_path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    for f in ["server.crt", "server.key"] {
        chown_postgres(&root.join(f));
    }
    ca_path
}

fn chown_postgres(dir: &Path) {
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .output()
        .expect("chown runs");
    assert!(
        out.status.success(),
        "chown postgres {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
