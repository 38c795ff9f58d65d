//! Two `guestkey-server` replicas on one PostgreSQL database (Debian's
//! PostgreSQL 15, a throw-away cluster per test process), through the real
//! binaries: both serve the admin API, one leads the scheduler; killed
//! with -9 or stopped (SIGSTOP) past its lease, the other takes over and
//! the stalled one writes nothing after. The host is the protocol-level
//! test agent of these API tests (real guestkeyd hosts are in `tests/`).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{TestAgent, TestServer, bins, temp_dir};
use guestkey_testkit::Postgres;
use guestkey_testkit::cleanup::Made;

/// A short lease, so that take-overs are quick to see.
const CONFIG: &str = "[retry]\ninitial_delay_ms = 50\nmax_delay_ms = 200\nmax_attempts = 50\n\
                      [leader]\nlease_ms = 1500\nrenew_ms = 300\n";

struct Pair {
    a: TestServer,
    b: TestServer,
    _gone: Made,
}

/// Replica a made by `init --database`, replica b by `add-replica`.
fn pair(url: &str) -> Pair {
    let scratch = temp_dir("replicas");
    let gone = Made::dir(&scratch);
    let a = TestServer::start_in_with(
        scratch.join("a"),
        bins(),
        Some(CONFIG),
        &["--database", url],
    );
    // a leads before b starts (on a loaded machine a's first lease can come
    // after b's start, and then b would lead).
    a.wait_for(30, "a leading", || {
        let st = status(&a);
        st["replicas"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["pid"] == a.pid() && r["leads"] == true))
    });
    let out = std::process::Command::new(&bins().server)
        .args(["add-replica", "--data-dir"])
        .arg(scratch.join("a"))
        .arg("--to")
        .arg(scratch.join("b"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "add-replica: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = TestServer::run_in(scratch.join("b"), bins(), Some(CONFIG));
    Pair { a, b, _gone: gone }
}

fn status(s: &TestServer) -> serde_json::Value {
    let out = std::process::Command::new(&bins().server)
        .args(["status", "--json", "--data-dir"])
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The replica id of the server with this pid, as `status` shows it.
fn replica_of(st: &serde_json::Value, pid: u32) -> String {
    st["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == pid)
        .unwrap_or_else(|| panic!("no replica with pid {pid}: {st}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn leader(st: &serde_json::Value) -> Option<(String, u64)> {
    let l = &st["leader"];
    Some((l["replica"].as_str()?.to_owned(), l["fence"].as_u64()?))
}

fn create(s: &TestServer, name: &str) {
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", name, "--size", "1M",
    ]);
    s.wait_for(30, "ready", || {
        s.json(&["volume", "show", name])["state"] == "ready"
    });
}

#[test]
fn two_replicas_serve_one_database_and_the_second_leads_within_the_lease_when_the_first_is_killed()
{
    let pg = Postgres::shared();
    let db = pg.database();
    let mut p = pair(&db.url);
    // a leads (it ran first); both are seen.
    let st = status(&p.b);
    assert_eq!(st["replicas"].as_array().unwrap().len(), 2, "{st}");
    let (ida, idb) = (replica_of(&st, p.a.pid()), replica_of(&st, p.b.pid()));
    assert_eq!(leader(&st), Some((ida.clone(), 1)), "{st}");
    let text = String::from_utf8_lossy(
        &std::process::Command::new(&bins().server)
            .args(["status", "--data-dir"])
            .arg(&p.a.dir)
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        text.contains("database: postgresql postgres://")
            && text.contains(&format!("leader:   {ida}")),
        "{text}"
    );
    // The same through the admin API, from either replica, on any admin's
    // machine (`guestkeyctl server status`).
    for s in [&p.a, &p.b] {
        let api = s.json(&["server", "status"]);
        assert_eq!(api["database"], st["database"], "{api}");
        assert_eq!(api["leader"]["replica"], ida.as_str(), "{api}");
        assert_eq!(api["leader"]["fence"], 1, "{api}");
        let mut ids: Vec<String> = api["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        let mut want = vec![ida.clone(), idb.clone()];
        want.sort();
        assert_eq!(ids, want, "{api}");
        let text = s.ok(&["server", "status"]);
        assert!(
            text.contains(&format!("leader:   {ida}")) && text.contains(&idb),
            "{text}"
        );
    }

    let mut agent = TestAgent::enroll(&p.a, "kvm-a");
    agent.serve();
    // A request to the follower: the leader's scheduler delivers it.
    create(&p.b, "v1");

    p.a.kill9();
    let killed = Instant::now();
    p.b.wait_for(20, "b leads", || {
        leader(&status(&p.b)) == Some((idb.clone(), 2))
    });
    let took = killed.elapsed();
    // The lease (1.5 s) lapses, then b's next renewal (every 0.3 s) takes it.
    assert!(took < Duration::from_secs(10), "b took over after {took:?}");
    create(&p.b, "v2");
    assert_eq!(agent.creates().len(), 2, "each volume made once");
    assert!(p.b.ok(&["audit", "--verify"]).contains("verified"));
    let audit = p.b.json(&["audit"]).to_string();
    assert!(audit.contains("replica.leads"), "the take-over is audited");

    // a comes back: it follows.
    p.a.restart();
    let pid = p.a.pid();
    p.a.wait_for(10, "a is seen again", || {
        status(&p.a)["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["pid"] == pid)
    });
    // The killed one is forgotten after six lease lifetimes (9 s).
    p.a.wait_for(20, "the killed replica is forgotten", || {
        !status(&p.a)["replicas"].to_string().contains(&ida)
    });
    assert_eq!(leader(&status(&p.a)).map(|l| l.0), Some(idb.clone()));
    create(&p.a, "v3");
}

#[test]
fn a_leader_stopped_past_its_lease_steps_down_and_writes_nothing_after_the_take_over() {
    let pg = Postgres::shared();
    let db = pg.database();
    let p = pair(&db.url);
    let st = status(&p.b);
    let (ida, idb) = (replica_of(&st, p.a.pid()), replica_of(&st, p.b.pid()));
    assert_eq!(leader(&st).map(|l| l.0), Some(ida.clone()));
    let mut agent = TestAgent::enroll(&p.a, "kvm-a");
    agent.serve();
    create(&p.b, "v1");

    let pid = p.a.pid().to_string();
    let signal = |sig: &str| {
        let out = std::process::Command::new("kill")
            .args([sig, &pid])
            .output()
            .unwrap();
        assert!(out.status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    p.b.wait_for(20, "b leads", || {
        leader(&status(&p.b)) == Some((idb.clone(), 2))
    });
    // Work queued while a is stopped is done by b.
    create(&p.b, "v2");
    signal("-CONT");
    // a notices it no longer leads (its own deadline passed while stopped,
    // or its renewal finds b's lease), and b still leads.
    p.a.wait_for(10, "a steps down", || {
        let log = p.a.log();
        log.contains("stops leading") || log.contains("another replica leads now")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(leader(&status(&p.a)), Some((idb.clone(), 2)));
    // Nothing ran twice, and the one chain verifies.
    assert_eq!(agent.creates().len(), 2, "each volume made once");
    create(&p.a, "v3");
    assert_eq!(agent.creates().len(), 3);
    assert!(p.a.ok(&["audit", "--verify"]).contains("verified"));
}

#[test]
fn add_replica_refuses_a_sqlite_data_directory_and_a_used_target() {
    let s = common::start_sqlite_server(None);
    let scratch = temp_dir("add-replica");
    let _gone = Made::dir(&scratch);
    let run = |to: &std::path::Path| {
        std::process::Command::new(&bins().server)
            .args(["add-replica", "--data-dir"])
            .arg(&s.dir)
            .arg("--to")
            .arg(to)
            .output()
            .unwrap()
    };
    let out = run(&scratch.join("b"));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("replicas share a PostgreSQL database"), "{e}");
    assert!(!scratch.join("b").exists());

    let pg = Postgres::shared();
    let db = pg.database();
    let p = pair(&db.url);
    std::fs::create_dir_all(scratch.join("used")).unwrap();
    std::fs::write(scratch.join("used/x"), "x").unwrap();
    let out = std::process::Command::new(&bins().server)
        .args(["add-replica", "--data-dir"])
        .arg(&p.a.dir)
        .arg("--to")
        .arg(scratch.join("used"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("exists and is not empty"), "{e}");
    assert_eq!(std::fs::read_dir(scratch.join("used")).unwrap().count(), 1);
}
