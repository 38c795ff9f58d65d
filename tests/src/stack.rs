//! The whole guestkey stack on this machine: the real `guestkey-server`
//! (embedded SQLite) and a real `guestkeyd` enrolled with it, the
//! `guestkey-hook` installed where libvirt's hook wrapper (installed by
//! scripts/setup) runs it, and a directory storage pool.
//!
//! Only one guestkeyd can own the hook socket, so tests that use a
//! [`Stack`] hold [`Stack::lock`] for their whole run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

pub use guestkey_testkit::{Bins, Proc, TestServer};

use crate::{Cleanup, scratch_dir, unique_name, virsh};

static ONE_STACK: Mutex<()> = Mutex::new(());

/// `127.0.0.1:PORT` with a port free right now.
fn free_address() -> String {
    format!("127.0.0.1:{}", guestkey_testkit::free_port())
}

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built binary of the workspace (scripts/test builds them first).
pub fn bin(name: &str) -> PathBuf {
    guestkey_testkit::target_bin(&workspace(), name)
}

/// Server, enrolled host daemon, hook and pool.
pub struct Stack {
    _lock: MutexGuard<'static, ()>,
    /// Scratch directory (server data, host state, pool).
    pub dir: PathBuf,
    /// The server (the shared harness's).
    pub server: TestServer,
    /// The host daemon.
    pub daemon: Option<Proc>,
    /// Host name.
    pub host: String,
    /// Storage pool name.
    pub pool: String,
    daemon_addr: String,
    /// What `guestkeyd enroll` gets beyond the usual.
    enroll_args: Vec<String>,
    /// Undo steps (pool, domains).
    pub cleanup: Cleanup,
}

impl Stack {
    /// Starts everything.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts everything, with `enroll_args` added to `guestkeyd enroll`
    /// (e.g. `--tpm ...`).
    pub fn start_with(enroll_args: &[String]) -> Self {
        Self::start_configured(enroll_args, None)
    }

    /// As [`Stack::start_with`], the server run with `config` (TOML).
    pub fn start_configured(enroll_args: &[String], config: Option<&str>) -> Self {
        Self::start_full(enroll_args, config, &[])
    }

    /// Starts everything with the server on the PostgreSQL database `url`
    /// (`init --database`), run with `config` (TOML).
    pub fn start_on_database(url: &str, config: Option<&str>) -> Self {
        Self::start_full(&[], config, &["--database", url])
    }

    fn start_full(enroll_args: &[String], config: Option<&str>, init_args: &[&str]) -> Self {
        let lock = ONE_STACK.lock().unwrap_or_else(|p| p.into_inner());
        crate::require_libvirt();
        let mut cleanup = Cleanup::default();
        let name = unique_name("stack");
        let dir = scratch_dir(&mut cleanup, &name);
        // The hook binary where the wrapper from scripts/setup runs it.
        std::fs::create_dir_all("/usr/local/lib/guestkey").expect("create /usr/local/lib/guestkey");
        let hook = Path::new("/usr/local/lib/guestkey/guestkey-hook");
        let tmp = hook.with_extension("new");
        std::fs::copy(bin("guestkey-hook"), &tmp).expect("install guestkey-hook");
        std::fs::rename(&tmp, hook).expect("install guestkey-hook");
        assert!(
            Path::new("/etc/libvirt/hooks/qemu.d/guestkey").exists(),
            "the libvirt hook wrapper is missing: run scripts/setup"
        );

        let server = TestServer::start_in_with(
            dir.join("server"),
            Bins::from_target_dir(&workspace()),
            config,
            init_args,
        );
        let mut s = Self {
            _lock: lock,
            dir,
            server,
            daemon: None,
            host: unique_name("host"),
            pool: unique_name("pool"),
            daemon_addr: String::new(),
            enroll_args: enroll_args.to_vec(),
            cleanup,
        };
        s.enroll_and_run();
        let pool_dir = s.dir.join("pool");
        std::fs::create_dir_all(&pool_dir).expect("pool dir");
        virsh(&[
            "pool-create-as",
            &s.pool,
            "dir",
            "--target",
            pool_dir.to_str().expect("utf-8"),
        ])
        .expect("pool");
        s.cleanup.virsh(&["pool-destroy", &s.pool]);
        s
    }

    /// (Re)starts the server on its data directory and port.
    pub fn run_server(&mut self) {
        self.server.restart();
    }

    /// The server's URL (`https://127.0.0.1:PORT`).
    pub fn server_url(&self) -> &str {
        &self.server.url
    }

    /// A guestkeyctl command against this stack's server, to run.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        self.server.ctl_command(args)
    }

    /// guestkeyctl against this stack's server.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.server.ctl(args)
    }

    /// guestkeyctl --json that must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.server.json(args)
    }

    /// The host daemon's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("host")
    }

    fn enroll_and_run(&mut self) {
        self.daemon_addr = free_address();
        std::fs::copy(
            self.dir.join("server/admin/ca.pem"),
            self.dir.join("ca.pem"),
        )
        .expect("ca");
        self.enroll(
            &self.host.clone(),
            &self.daemon_addr.clone(),
            &self.state_dir(),
        );
        self.run_daemon();
    }

    /// Registers host `name` at `addr` and enrolls a guestkeyd state
    /// directory `state` with its token.
    fn enroll(&self, name: &str, addr: &str, state: &Path) {
        guestkey_testkit::enroll_guestkeyd_with(
            &self.server,
            name,
            addr,
            state,
            &self.dir.join("ca.pem"),
            &self.enroll_args,
        );
    }

    /// (Re)starts guestkeyd.
    pub fn run_daemon(&mut self) {
        self.daemon_with(None, &[]);
    }

    /// (Re)starts guestkeyd with `args` added to `guestkeyd run`.
    pub fn run_daemon_with(&mut self, args: &[&str]) {
        self.daemon_with(None, args);
    }

    /// (Re)starts guestkeyd with `filter` as its log filter (`RUST_LOG`).
    pub fn run_daemon_logging(&mut self, filter: &str) {
        self.daemon_with(Some(filter), &[]);
    }

    fn daemon_with(&mut self, filter: Option<&str>, args: &[&str]) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
        let mut cmd = Command::new(bin("guestkeyd"));
        cmd.args(["run", "--state-dir"])
            .arg(self.state_dir())
            .args(["--listen", &self.daemon_addr])
            .args(args);
        if let Some(f) = filter {
            cmd.env("RUST_LOG", f);
        }
        self.daemon = Some(Proc::start(cmd, "listening on https://"));
    }

    /// Enrolls and runs a second host daemon on this machine (own state
    /// directory, hook socket and managed list, which libvirt does not use:
    /// it stands for another host). Returns its name, state directory and
    /// process.
    pub fn second_host(&self) -> (String, PathBuf, Proc) {
        let name = unique_name("host2");
        let addr = free_address();
        let state = self.dir.join("host2");
        self.enroll(&name, &addr, &state);
        let mut cmd = Command::new(bin("guestkeyd"));
        cmd.args(["run", "--state-dir"])
            .arg(&state)
            .args(["--listen", &addr, "--hook-socket"])
            .arg(self.dir.join("host2.sock"))
            .arg("--managed-list")
            .arg(self.dir.join("host2-managed"));
        let p = Proc::start(cmd, "listening on https://");
        (name, state, p)
    }

    /// Enrolls and runs a guestkeyd for the session libvirtd of `user`
    /// (gkh1 or gkh2, made by scripts/setup): a second and third libvirt
    /// host on this machine, with their own host UUIDs, for migrations. Its
    /// hook socket is the one the hook looks for when it runs as `user`,
    /// and the server knows how to migrate guests to it.
    pub fn session_host(&self, user: &str) -> SessionHost {
        let uid: u32 = crate::run("id", &["-u", user])
            .unwrap_or_else(|e| panic!("{e}: run scripts/setup (it makes the users gkh1 and gkh2)"))
            .trim()
            .parse()
            .expect("uid");
        let uri = format!("qemu+unix:///session?socket=/home/{user}/.cache/libvirt/libvirt-sock");
        assert!(
            crate::run("virsh", &["-c", &uri, "version"]).is_ok(),
            "the session libvirtd of {user} does not answer: run scripts/setup"
        );
        let name = unique_name(user);
        let addr = free_address();
        let state = self.dir.join(user);
        self.enroll(&name, &addr, &state);
        let mut cmd = Command::new(bin("guestkeyd"));
        cmd.args(["run", "--state-dir"])
            .arg(&state)
            .args(["--listen", &addr, "--libvirt-uri", &uri])
            .args(["--hook-socket", &format!("/run/guestkey/hook-{uid}.sock")])
            .args([
                "--managed-list",
                &format!("/run/guestkey/managed-secrets-{uid}"),
            ])
            .args(["--hook-uid", &uid.to_string()]);
        let daemon = Proc::start(cmd, "listening on https://");
        let port = free_address();
        let port = port.rsplit(':').next().expect("port");
        self.json(&[
            "host",
            "set-migration",
            &name,
            "--libvirt-uri",
            &uri,
            "--migration-uri",
            &format!("tcp://127.0.0.1:{port}"),
        ]);
        SessionHost {
            name,
            uri,
            state,
            daemon,
        }
    }

    /// What guestkeyd logged so far.
    pub fn daemon_log(&self) -> String {
        self.daemon.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Polls `f` for at most `secs` seconds.
    pub fn wait_for(&self, secs: u64, what: &str, f: impl FnMut() -> bool) {
        guestkey_testkit::wait_for(secs, what, f, || {
            format!(
                "server:\n{}\nguestkeyd:\n{}",
                self.server.log(),
                self.daemon.as_ref().map(Proc::log_text).unwrap_or_default()
            )
        });
    }

    /// Defines `name` from `xml` through guestkey on this stack's host,
    /// waits until the host has it, and registers its removal with
    /// `cleanup`. Returns its UUID.
    pub fn define_guest(&self, cleanup: &mut Cleanup, name: &str, xml: &str) -> String {
        let uuid = self.define_guest_on(&self.host, name, xml);
        cleanup.virsh(&["undefine", name]);
        cleanup.virsh(&["destroy", name]);
        uuid
    }

    /// Defines `name` from `xml` through guestkey on `host` and waits until
    /// the host has it (removing it is the caller's). Returns its UUID.
    pub fn define_guest_on(&self, host: &str, name: &str, xml: &str) -> String {
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write domain XML");
        self.json(&[
            "guest",
            "define",
            "--host",
            host,
            "--xml",
            file.to_str().expect("utf-8"),
        ]);
        self.wait_for(60, "guest defined", || {
            self.json(&["guest", "show", name])["pending"] == ""
        });
        self.json(&["guest", "show", name])["uuid"]
            .as_str()
            .expect("uuid")
            .to_owned()
    }

    /// The volume key as the server stores it: unwrapped here with the
    /// server's master key file (the test owns the data directory).
    pub fn server_key(&self, volume_id: &str) -> xdr_wipe::packet::PacketSecret {
        let data = self.dir.join("server");
        let db = rusqlite::Connection::open(data.join("guestkey.db")).expect("server key");
        let (generation, mk_id, wrapped): (i64, String, Vec<u8>) = db
            .query_row(
                "SELECT generation, master_key_id, wrapped FROM volume_keys WHERE volume_id = ?1",
                [volume_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("server key");
        let source = mgmt_server::masterkey::MasterKeySource::File(data.join("master.key"));
        let mk = mgmt_server::masterkey::MasterKey::load(&source).expect("server key");
        mk.unwrap_key(volume_id, generation as u64, &mk_id, &wrapped)
            .expect("server key")
    }

    /// The audit records of `action` (`guestkeyctl audit`, all of them).
    pub fn audit(&self, action: &str) -> Vec<serde_json::Value> {
        self.json(&["audit", "--limit", "10000"])
            .as_array()
            .expect("audit records")
            .iter()
            .filter(|r| r["action"] == action)
            .cloned()
            .collect()
    }

    /// Creates a qcow2 volume and waits until the host made it; returns its
    /// JSON.
    pub fn volume(&self, name: &str, size: &str) -> serde_json::Value {
        self.volume_fmt(name, size, "qcow2")
    }

    /// Creates a volume of `format` (qcow2 or raw) and waits until the host
    /// made it; returns its JSON.
    pub fn volume_fmt(&self, name: &str, size: &str, format: &str) -> serde_json::Value {
        self.create_volume(name, size, format, &[]);
        self.wait_for(60, "volume ready", || {
            self.json(&["volume", "show", name])["state"] == "ready"
        });
        self.json(&["volume", "show", name])
    }
}

impl Stack {
    /// Asks for a volume of `format` on this stack's host and pool
    /// (`--no-wait`: the request is queued, the host makes it later).
    pub fn ask_volume(&self, name: &str, size: &str, format: &str) -> serde_json::Value {
        self.create_volume(name, size, format, &["--no-wait"])
    }

    /// `guestkeyctl volume create` on this stack's host and pool, with
    /// `extra` arguments.
    fn create_volume(
        &self,
        name: &str,
        size: &str,
        format: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let mut args = vec![
            "volume", "create", "--host", &self.host, "--pool", &self.pool, "--name", name,
            "--size", size, "--format", format,
        ];
        args.extend_from_slice(extra);
        self.json(&args)
    }
}

/// A guestkeyd serving a session libvirtd ([`Stack::session_host`]).
pub struct SessionHost {
    /// Host name at the server.
    pub name: String,
    /// libvirt URI of its session daemon.
    pub uri: String,
    /// guestkeyd's state directory.
    pub state: PathBuf,
    /// guestkeyd.
    pub daemon: Proc,
}

impl SessionHost {
    /// `virsh -c URI ARGS` against this host's libvirtd.
    pub fn virsh(&self, args: &[&str]) -> Result<String, crate::CommandFailed> {
        let mut all = vec!["-c", self.uri.as_str()];
        all.extend_from_slice(args);
        crate::run("virsh", &all)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.daemon.take();
        self.server.stop();
    }
}
