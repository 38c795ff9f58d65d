//! The real guestkey-server on 127.0.0.1, and guestkeyctl against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::Proc;

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// guestkey-server.
    pub server: PathBuf,
    /// guestkeyctl.
    pub ctl: PathBuf,
    /// guestkeyd (the end-to-end tests only).
    pub daemon: Option<PathBuf>,
}

/// The binary `name` of the workspace at `workspace` (its target
/// directory, or `CARGO_TARGET_DIR`); it must be built. The debug build,
/// or the one `GUESTKEY_PROFILE` names (`release`, for benchmarks).
pub fn target_bin(workspace: &Path, name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let profile = std::env::var("GUESTKEY_PROFILE").unwrap_or_else(|_| "debug".into());
    assert!(
        matches!(profile.as_str(), "debug" | "release"),
        "GUESTKEY_PROFILE is {profile:?}: debug or release"
    );
    let p = target.join(&profile).join(name);
    let build = if profile == "release" {
        "cargo build --workspace --bins --release"
    } else {
        "cargo build --workspace --bins"
    };
    assert!(
        p.exists(),
        "{} is missing: run `{build}` first (scripts/test builds the debug ones)",
        p.display()
    );
    p
}

impl Bins {
    /// The debug binaries of the workspace's target directory (the
    /// end-to-end tests: `cargo build --workspace --bins` builds them first).
    pub fn from_target_dir(workspace: &Path) -> Self {
        Self {
            server: target_bin(workspace, "guestkey-server"),
            ctl: target_bin(workspace, "guestkeyctl"),
            daemon: Some(target_bin(workspace, "guestkeyd")),
        }
    }
}

/// A running guestkey-server with its own data directory.
pub struct TestServer {
    /// The data directory.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// The programs.
    pub bins: Bins,
    config: Option<PathBuf>,
    proc: Option<Proc>,
    /// A scratch directory of its own, removed when it is dropped (or on
    /// a signal).
    scratch: Option<crate::cleanup::Made>,
    /// What the processes that ended wrote on stderr.
    history: String,
    /// With `GUESTKEY_TEST_DATABASE=postgres`: its database (dropped after
    /// the server stopped: fields drop in order).
    database: Option<crate::TestDatabase<'static>>,
}

impl TestServer {
    /// `init` in a scratch directory of its own (removed when the server is
    /// dropped), then `run` with `config` (TOML) if given, on a free port.
    pub fn start(bins: Bins, config: Option<&str>) -> Self {
        let scratch = crate::temp_dir("server");
        let gone = crate::cleanup::Made::dir(&scratch);
        let mut s = Self::start_in(scratch.join("data"), bins, config);
        s.scratch = Some(gone);
        s
    }

    /// `init` in `dir` (which must not exist or be empty), then `run` with
    /// `config` (TOML) if given, on a free port.
    pub fn start_in(dir: PathBuf, bins: Bins, config: Option<&str>) -> Self {
        Self::start_in_with(dir, bins, config, &[])
    }

    /// As [`TestServer::start_in`], with `init_args` added to `init` (e.g.
    /// `--master-key-source tpm ...`).
    pub fn start_in_with(
        dir: PathBuf,
        bins: Bins,
        config: Option<&str>,
        init_args: &[&str],
    ) -> Self {
        // `GUESTKEY_TEST_DATABASE=postgres`: the store in a fresh database
        // of this test process's PostgreSQL cluster, unless the test names
        // one (`--database sqlite` for a test of the SQLite file itself).
        let database = (std::env::var("GUESTKEY_TEST_DATABASE").as_deref() == Ok("postgres")
            && !init_args.contains(&"--database"))
        .then(|| crate::Postgres::shared().database());
        let mut args: Vec<String> = init_args.iter().map(|a| (*a).to_owned()).collect();
        if let Some(db) = &database {
            args.extend(["--database".to_owned(), db.url.clone()]);
        }
        let out = Command::new(&bins.server)
            .args(["init", "--data-dir"])
            .arg(&dir)
            .args(&args)
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = Self::run_in(dir, bins, config);
        s.database = database;
        s
    }

    /// As [`TestServer::start`], with `init_args` added to `init`.
    pub fn start_with_init(bins: Bins, config: Option<&str>, init_args: &[&str]) -> Self {
        let scratch = crate::temp_dir("server");
        let gone = crate::cleanup::Made::dir(&scratch);
        let mut s = Self::start_in_with(scratch.join("data"), bins, config, init_args);
        s.scratch = Some(gone);
        s
    }

    /// With `GUESTKEY_TEST_DATABASE=postgres`: the name of its database in
    /// the test process's PostgreSQL cluster ([`crate::Postgres::shared`]).
    pub fn database_name(&self) -> Option<&str> {
        self.database.as_ref().map(|d| d.name.as_str())
    }

    /// Whether its store is on PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.database.is_some()
            || std::fs::read_to_string(self.dir.join("database"))
                .is_ok_and(|t| t.starts_with("postgres"))
    }

    /// `run` on a data directory made before (a replica's copy of one),
    /// with `config` (TOML) if given, on a free port.
    pub fn run_in(dir: PathBuf, bins: Bins, config: Option<&str>) -> Self {
        let config = config.map(|c| {
            let p = dir.with_extension("toml");
            std::fs::write(&p, c).unwrap();
            p
        });
        let mut s = Self {
            dir,
            url: String::new(),
            addr: "127.0.0.1:0".parse().unwrap(),
            bins,
            config,
            proc: None,
            scratch: None,
            history: String::new(),
            database: None,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let mut cmd = Command::new(&self.bins.server);
        cmd.args(["run", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.addr.port())])
            .env("RUST_LOG", "debug");
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let p = Proc::start(cmd, "listening on https://");
        let addr = p
            .first_line
            .trim_start_matches("listening on https://")
            .to_owned();
        self.addr = addr.parse().unwrap();
        self.url = format!("https://{addr}");
        self.proc = Some(p);
    }

    /// Stops it (SIGTERM); [`TestServer::restart`] starts it again.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            let log = p.log.clone();
            p.stop();
            self.keep(&log);
        }
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            let log = p.log.clone();
            p.kill9();
            self.keep(&log);
        }
    }

    /// Keeps what an ended process wrote (its reader may still be at the
    /// last lines: give it a moment).
    fn keep(&mut self, log: &std::sync::Arc<std::sync::Mutex<String>>) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        self.history
            .push_str(&log.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Stops it if it runs, and runs it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Its process id (it must run).
    pub fn pid(&self) -> u32 {
        self.proc
            .as_ref()
            .map(Proc::pid)
            .unwrap_or_else(|| panic!("the server does not run"))
    }

    /// Everything it wrote on stderr, over all its starts.
    pub fn log(&self) -> String {
        self.history.clone() + &self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// The admin credential.
    pub fn admin_dir(&self) -> PathBuf {
        self.dir.join("admin")
    }

    /// A guestkeyctl command against this server, to run.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bins.ctl);
        c.args(args)
            .env("GUESTKEY_SERVER", &self.url)
            .env("GUESTKEY_ADMIN_DIR", self.admin_dir());
        c
    }

    /// guestkeyctl against this server.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).output().unwrap()
    }

    /// guestkeyctl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "guestkeyctl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// guestkeyctl that must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            !o.status.success(),
            "guestkeyctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8(o.stderr).unwrap()
    }

    /// `guestkeyctl --json ARGS` that must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Polls `f` until it holds, at most `secs` seconds; the panic shows
    /// the server's log.
    pub fn wait_for(&self, secs: u64, what: &str, f: impl FnMut() -> bool) {
        crate::wait_for(secs, what, f, || format!("server:\n{}", self.log()));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        self.scratch.take();
    }
}

/// Registers host `name` at `addr` with `server`, and enrolls the guestkeyd
/// state directory `state` with its token (on standard input: never in
/// argv) and the CA file `ca_file`.
pub fn enroll_guestkeyd(server: &TestServer, name: &str, addr: &str, state: &Path, ca_file: &Path) {
    enroll_guestkeyd_with(server, name, addr, state, ca_file, &[]);
}

/// As [`enroll_guestkeyd`], with `extra` arguments to `guestkeyd enroll`
/// (e.g. `--tpm ...`).
pub fn enroll_guestkeyd_with(
    server: &TestServer,
    name: &str,
    addr: &str,
    state: &Path,
    ca_file: &Path,
    extra: &[String],
) {
    let v = server.json(&["host", "add", name, "--address", addr]);
    let token = v["enrollment_token"].as_str().unwrap().to_owned();
    let daemon = server
        .bins
        .daemon
        .as_ref()
        .expect("guestkeyd's path in Bins");
    let mut child = Command::new(daemon)
        .args([
            "enroll",
            "--server",
            &server.url,
            "--token-file",
            "-",
            "--ca-file",
        ])
        .arg(ca_file)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env("TSS2_LOG", "all+none")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), token.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
