//! The whole guestkey stack on this machine: the real `guestkey-server`
//! (embedded SQLite) and a real `guestkeyd` enrolled with it, the
//! `guestkey-hook` installed where libvirt's hook wrapper (installed by
//! scripts/setup) runs it, and a directory storage pool.
//!
//! Only one guestkeyd can own the hook socket, so tests that use a
//! [`Stack`] hold [`Stack::lock`] for their whole run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Cleanup, scratch_dir, unique_name, virsh};

static ONE_STACK: Mutex<()> = Mutex::new(());

/// `127.0.0.1:PORT` with a port free right now.
fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    format!("127.0.0.1:{port}")
}

/// A built binary of the workspace (scripts/test builds them first).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

/// A running process, killed on drop.
pub struct Proc {
    child: Child,
    /// The first line it printed on stdout.
    pub first_line: String,
    /// Its stderr so far.
    pub log: std::sync::Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd`; waits for a first stdout line starting with `ready`.
    pub fn start(mut cmd: Command, ready: &str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("read");
        let log = std::sync::Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&(line + "\n"));
            }
        });
        assert!(
            line.starts_with(ready),
            "expected {ready:?}, got {line:?}: {}",
            log.lock().unwrap_or_else(|p| p.into_inner())
        );
        Self {
            child,
            first_line: line.trim().to_owned(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (SIGTERM, then waits).
    pub fn stop(mut self) {
        self.terminate();
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Server, enrolled host daemon, hook and pool.
pub struct Stack {
    _lock: MutexGuard<'static, ()>,
    /// Scratch directory (server data, host state, pool).
    pub dir: PathBuf,
    /// The server.
    pub server: Option<Proc>,
    /// The host daemon.
    pub daemon: Option<Proc>,
    /// Host name.
    pub host: String,
    /// Storage pool name.
    pub pool: String,
    server_url: String,
    daemon_addr: String,
    /// Undo steps (pool, domains).
    pub cleanup: Cleanup,
}

impl Stack {
    /// Starts everything.
    pub fn start() -> Self {
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

        let data = dir.join("server");
        let out = Command::new(bin("guestkey-server"))
            .args(["init", "--data-dir"])
            .arg(&data)
            .output()
            .expect("init");
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A fixed port, so that a restarted server is found again.
        let addr = free_address();
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let server_url = format!("https://{addr}");
        let server = Self::server_proc(&data, port);
        let mut s = Self {
            _lock: lock,
            dir,
            server: Some(server),
            daemon: None,
            host: unique_name("host"),
            pool: unique_name("pool"),
            server_url,
            daemon_addr: String::new(),
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

    fn server_proc(data: &Path, port: u16) -> Proc {
        let mut cmd = Command::new(bin("guestkey-server"));
        cmd.args(["run", "--data-dir"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        Proc::start(cmd, "listening on https://")
    }

    /// (Re)starts the server on its data directory and port.
    pub fn run_server(&mut self) {
        if let Some(p) = self.server.take() {
            p.stop();
        }
        let port: u16 = self
            .server_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        self.server = Some(Self::server_proc(&self.dir.join("server"), port));
    }

    /// The server's URL (`https://127.0.0.1:PORT`).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// A guestkeyctl command against this stack's server, to run.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("guestkeyctl"));
        c.args(args)
            .env("GUESTKEY_SERVER", &self.server_url)
            .env("GUESTKEY_ADMIN_DIR", self.dir.join("server/admin"));
        c
    }

    /// guestkeyctl against this stack's server.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_command(args).output().expect("guestkeyctl")
    }

    /// guestkeyctl --json that must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.ctl(&a);
        assert!(
            o.status.success(),
            "guestkeyctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("json")
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
        let v = self.json(&["host", "add", name, "--address", addr]);
        let token = v["enrollment_token"].as_str().expect("token").to_owned();
        // The token on standard input: never in argv.
        let mut child = Command::new(bin("guestkeyd"))
            .args([
                "enroll",
                "--server",
                &self.server_url,
                "--token-file",
                "-",
                "--ca-file",
            ])
            .arg(self.dir.join("ca.pem"))
            .arg("--state-dir")
            .arg(state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("enroll");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), token.as_bytes())
            .expect("token to enroll");
        let out = child.wait_with_output().expect("enroll");
        assert!(
            out.status.success(),
            "enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// (Re)starts guestkeyd.
    pub fn run_daemon(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
        let mut cmd = Command::new(bin("guestkeyd"));
        cmd.args(["run", "--state-dir"])
            .arg(self.state_dir())
            .args(["--listen", &self.daemon_addr]);
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

    /// Polls `f` for at most `secs` seconds.
    pub fn wait_for(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = |p: &Option<Proc>| {
            p.as_ref()
                .map(|p| p.log.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .unwrap_or_default()
        };
        panic!(
            "timed out waiting for {what}\nserver:\n{}\nguestkeyd:\n{}",
            log(&self.server),
            log(&self.daemon)
        );
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

    /// Creates a qcow2 volume and waits until the host made it; returns its
    /// JSON.
    pub fn volume(&self, name: &str, size: &str) -> serde_json::Value {
        self.volume_fmt(name, size, "qcow2")
    }

    /// Creates a volume of `format` (qcow2 or raw) and waits until the host
    /// made it; returns its JSON.
    pub fn volume_fmt(&self, name: &str, size: &str, format: &str) -> serde_json::Value {
        self.json(&[
            "volume", "create", "--host", &self.host, "--pool", &self.pool, "--name", name,
            "--size", size, "--format", format,
        ]);
        self.wait_for(60, "volume ready", || {
            self.json(&["volume", "show", name])["state"] == "ready"
        });
        self.json(&["volume", "show", name])
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
        self.server.take();
    }
}
