//! The one test harness of guestkey, for every test that starts the real
//! programs: the server's integration tests (`mgmt-server/tests`) and the
//! end-to-end tests (`tests/`, which add guestkeyd, libvirt and the hook
//! on top in `guestkey_tests::stack`).
//!
//! - [`Proc`]: a started program, its first line awaited, its stderr kept,
//!   stopped (or killed) when dropped;
//! - [`TestServer`]: `guestkey-server init` and `run` on 127.0.0.1, restart
//!   on the same port, `guestkeyctl` against it ([`TestServer::ctl`],
//!   [`TestServer::json`] ...);
//! - [`enroll_guestkeyd`]: a guestkeyd state directory enrolled with a
//!   token from `host add`, the token on standard input;
//! - [`cleanup::Made`]: what a test or benchmark made (directories,
//!   processes, libvirt domains, pools, secrets), removed when its guard
//!   drops and on SIGINT/SIGTERM/SIGHUP;
//! - small helpers: [`temp_dir`], [`free_port`], [`run`], [`wait_for`].
//!
//! It knows the programs only by their paths ([`Bins`]): the server's tests
//! pass Cargo's `CARGO_BIN_EXE_*`, the end-to-end tests the workspace's
//! target directory ([`Bins::from_target_dir`]). It imports no guestkey
//! crate.

// One `unsafe` block: `atexit`, which stops the shared PostgreSQL cluster.
#![deny(unsafe_code)]
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a failed unwrap is a failed test

pub mod cleanup;
mod postgres;
mod proc;
mod server;
mod swtpm;

pub use postgres::{Postgres, TestDatabase};
pub use proc::Proc;
pub use server::{Bins, TestServer, enroll_guestkeyd, enroll_guestkeyd_with, target_bin};
pub use swtpm::Swtpm;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A new directory under the system's temporary directory, unique to this
/// process and call: `gk-TAG-PID-RANDOM`.
pub fn temp_dir(tag: &str) -> PathBuf {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    let d = std::env::temp_dir().join(format!(
        "gk-{tag}-{}-{}",
        std::process::id(),
        hex::encode(b)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `GET path` of the plain-HTTP server at `addr` (a `/metrics`), one
/// request on its own connection: (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("nothing answers at {addr}: {e}"));
    c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("read timeout");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request written");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("answer read");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// A TCP port on 127.0.0.1 free right now, and never handed out twice by
/// one test process: tests of one binary run in parallel, and a port the
/// kernel gives for `bind(0)` may be given again (or taken by an outgoing
/// connection) before the test binds it. The ports come from below the
/// kernel's ephemeral range (32768 and up here), from a start that differs
/// by process so that two test processes rarely meet either.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `count` consecutive TCP ports on 127.0.0.1, all free right now (the
/// swtpm TCTI, for one, uses PORT and PORT+1); never handed out twice by
/// one test process, like [`free_port`].
pub fn free_ports(count: u16) -> u16 {
    use std::sync::Mutex;
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
    let n = next.get_or_insert_with(|| (std::process::id() % 240) * 50);
    for _ in 0..SPAN {
        let base = FIRST + *n % (SPAN - u32::from(count));
        *n += u32::from(count);
        let all_free = (0..count)
            .all(|i| std::net::TcpListener::bind(("127.0.0.1", (base as u16) + i)).is_ok());
        if all_free {
            return base as u16;
        }
    }
    panic!(
        "no {count} free TCP ports on 127.0.0.1 between {FIRST} and {}",
        FIRST + SPAN
    )
}

/// Output of a command that failed: what ran and what it said.
#[derive(Debug)]
pub struct CommandFailed(pub String);

impl std::fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs a program; returns its stdout, or what it printed on failure.
pub fn run(program: &str, args: &[&str]) -> Result<String, CommandFailed> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| CommandFailed(format!("cannot run {program}: {e} (run scripts/setup)")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CommandFailed(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

/// Polls `f` every 100 ms until it holds, at most `secs` seconds; panics
/// with `what` and `context()` (e.g. the logs) when it does not.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool, context: impl Fn() -> String) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}\n{}", context());
}
