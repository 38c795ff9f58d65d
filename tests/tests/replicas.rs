//! Two `guestkey-server` replicas on one PostgreSQL database (Debian's
//! PostgreSQL 15, a throw-away cluster of this test process) with a real
//! guestkeyd, libvirt pool and qcow2+LUKS volume: the leader is killed with
//! -9 at random instants of scheduled key rotations, the other replica
//! takes over, and every rotation finishes exactly once: the volume always
//! opens with the key the server holds, and the audit chain verifies.
//!
//! And the replica that drives a live migration killed in the middle: the
//! other one resumes it from the journal once the first stopped renewing,
//! and the guest runs on exactly the host the server records.
//!
//! `GUESTKEY_FAILOVER_TRIALS=N` for more kills than the test command's 3.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::{Duration, Instant};

use guestkey_testkit::{Postgres, TestServer};
use guestkey_tests::image::{opens_with, pattern_intact, qemu_io};
use guestkey_tests::stack::{Stack, bin};
use guestkey_tests::volume_domain_xml;

/// A short lease, so that take-overs are quick; fast retries.
const CONFIG: &str = "[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 500\nmax_attempts = 100\n\
                      [leader]\nlease_ms = 1500\nrenew_ms = 300\n";

fn status(dir: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(bin("guestkey-server"))
        .args(["status", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The pid of the replica that leads now, if one does.
fn leader_pid(dir: &std::path::Path) -> Option<u64> {
    let st = status(dir);
    let id = st["leader"]["replica"].as_str()?.to_owned();
    st["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id.as_str())?["pid"]
        .as_u64()
}

/// The key of `volume` at `generation` as the server holds it (unwrapped
/// here with the master key file: the test owns the data directory).
fn server_key(
    pg: &Postgres,
    db: &str,
    data: &std::path::Path,
    volume: &str,
    generation: u64,
) -> Option<xdr_wipe::packet::PacketSecret> {
    let row = pg
        .psql(
            db,
            &format!(
                "SELECT master_key_id || ' ' || encode(wrapped, 'hex') FROM volume_keys
                 WHERE volume_id = '{volume}' AND generation = {generation}"
            ),
        )
        .unwrap();
    let (mk_id, hex_wrapped) = row.split_once(' ')?;
    let wrapped = hex::decode(hex_wrapped).unwrap();
    let source = mgmt_server::masterkey::MasterKeySource::File(data.join("master.key"));
    let mk = mgmt_server::masterkey::MasterKey::load(&source).unwrap();
    Some(mk.unwrap_key(volume, generation, mk_id, &wrapped).unwrap())
}

/// A small random number from the clock (no RNG crate needed for this).
fn jitter_ms(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (n ^ (n >> 7)) % max.max(1)
}

#[test]
fn the_leader_killed_during_scheduled_rotations_loses_no_volume_and_each_rotation_finishes_once() {
    let trials: usize = std::env::var("GUESTKEY_FAILOVER_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(3);
    let pg = Postgres::shared();
    let db = pg.database();
    let mut s = Stack::start_on_database(&db.url, Some(CONFIG));
    // Replica b: a copy of a's data directory, on the same database.
    let mut b = second_replica(&s);

    let v = s.volume("failover-disk", "16M");
    let id = v["id"].as_str().unwrap().to_owned();
    let path = s.dir.join("pool/failover-disk");
    let data = s.server.dir.clone();
    let k1 = server_key(pg, &db.name, &data, &id, 1).unwrap();
    qemu_io(&s.dir, &path, k1.expose_secret(), "write -P 0x5a 0 2M").unwrap();
    drop(k1);

    // Rotations every 2 s, by whichever replica leads.
    s.json(&[
        "policy",
        "set",
        "--volume",
        "failover-disk",
        "--max-key-age",
        "2s",
        "--mode",
        "shallow",
    ]);
    let mut kills = Vec::new();
    for trial in 0..trials {
        std::thread::sleep(Duration::from_millis(500 + jitter_ms(2500)));
        let Some(pid) = leader_pid(&data) else {
            continue;
        };
        let killed = Instant::now();
        let victim = if pid == u64::from(s.server.pid()) {
            &mut s.server
        } else {
            assert_eq!(pid, u64::from(b.pid()), "the leader is one of the two");
            &mut b
        };
        let was = victim.json(&["volume", "show", "failover-disk"]);
        victim.kill9();
        // The other replica leads within the lease (1.5 s) and a renewal.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = leader_pid(&data) {
                if p != pid {
                    break;
                }
            }
            assert!(Instant::now() < end, "trial {trial}: no new leader");
            std::thread::sleep(Duration::from_millis(100));
        }
        kills.push((was["state"].as_str().unwrap().to_owned(), killed.elapsed()));
        victim.restart();
    }

    // Rotations stop; whatever was under way finishes.
    s.json(&["policy", "remove", "--volume", "failover-disk"]);
    s.wait_for(90, "the volume settles", || {
        let v = s.json(&["volume", "show", "failover-disk"]);
        v["state"] == "ready"
    });
    std::thread::sleep(Duration::from_secs(1));
    let v = s.json(&["volume", "show", "failover-disk"]);
    assert_eq!(v["state"], "ready", "{v}");
    let generation = v["key_generation"].as_u64().unwrap();
    assert!(generation >= 2, "rotations ran: {v}");
    // The server holds the current generation only, and it opens the
    // volume with the data intact.
    let key = server_key(pg, &db.name, &data, &id, generation).unwrap();
    assert!(opens_with(&s.dir, &path, "qcow2", key.expose_secret()));
    pattern_intact(&s.dir, &path, key.expose_secret(), 0x5a, "2M").unwrap();
    assert!(server_key(pg, &db.name, &data, &id, generation - 1).is_none());
    // Each rotation recorded exactly once, in order.
    let rotated: Vec<String> = s
        .audit("key.rotated")
        .iter()
        .filter(|r| r["subject"] == id.as_str())
        .map(|r| r["detail"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (1..generation)
        .map(|g| format!("volume failover-disk generation {g} -> {}", g + 1))
        .collect();
    assert_eq!(rotated, want, "kills: {kills:?}");
    assert!(s.ctl(&["audit", "--verify"]).status.success());
    assert!(
        s.audit("replica.leads").len() > kills.len(),
        "each take-over audited: {kills:?}"
    );
    eprintln!("kills (state when killed, time to a new leader): {kills:?}");
}

/// Replica b of `s`'s server (its data directory copied by `add-replica`).
fn second_replica(s: &Stack) -> TestServer {
    let b_dir = s.dir.join("server-b");
    let out = std::process::Command::new(bin("guestkey-server"))
        .args(["add-replica", "--data-dir"])
        .arg(&s.server.dir)
        .arg("--to")
        .arg(&b_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    TestServer::run_in(
        b_dir,
        guestkey_testkit::Bins::from_target_dir(&guestkey_tests::stack::workspace()),
        Some(CONFIG),
    )
}

#[test]
fn a_replica_killed_while_it_drives_a_migration_is_relieved_by_the_other_which_finishes_it() {
    use guestkey_tests::migration::{assert_settled, create_pool, shared_guest, two_hosts_on};
    let pg = Postgres::shared();
    let db = pg.database();
    let mut bed = two_hosts_on(Stack::start_on_database(&db.url, Some(CONFIG)));
    let (id, guest, uuid) = shared_guest(&mut bed, "replica-mig-disk");
    let guestkey_tests::migration::Bed {
        mut s,
        h1,
        h2,
        pool,
        dir,
        mut cleanup,
    } = bed;
    create_pool(&mut cleanup, &h2, &pool, &dir);
    // No re-encryption after the moves: tested elsewhere.
    s.json(&[
        "policy",
        "set",
        "--volume",
        "replica-mig-disk",
        "--max-key-age",
        "3650d",
        "--mode",
        "deep",
        "--after-migration",
        "365d",
    ]);
    let data = s.server.dir.clone();
    let path = dir.join("replica-mig-disk");
    let key = server_key(pg, &db.name, &data, &id, 1).unwrap();
    qemu_io(&s.dir, &path, key.expose_secret(), "write -P 0x6b 0 1M").unwrap();
    h1.virsh(&["start", &guest]).unwrap();
    let b = second_replica(&s);

    let mut left_pending = 0;
    for trial in 0..2u64 {
        let to = if trial % 2 == 0 { &h2 } else { &h1 };
        // Replica a drives the migration (the admin asked it).
        let child = s
            .ctl_command(&[
                "guest", "migrate", &guest, "--to", &to.name, "--live", "--unsafe",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = 150 + jitter_ms(300);
        std::thread::sleep(Duration::from_millis(delay));
        s.server.kill9();
        let _ = child.wait_with_output();
        let pending = b.json(&["guest", "show", &guest])["migrating_to"] != "";
        left_pending += u32::from(pending);
        eprintln!("trial {trial}: a killed after {delay} ms, migration left pending: {pending}");
        // b (leading once a's lease lapsed) resumes it: a stays down.
        b.wait_for(120, "the migration settled", || {
            b.json(&["guest", "show", &guest])["migrating_to"] == ""
        });
        let g = b.json(&["guest", "show", &guest]);
        let v = b.json(&["volume", "show", "replica-mig-disk"]);
        assert_settled(&h1, &h2, &guest, &uuid, &g, &v, &format!("trial {trial}"));
        let generation = v["key_generation"].as_u64().unwrap();
        let key = server_key(pg, &db.name, &data, &id, generation).unwrap();
        pattern_intact(&s.dir, &path, key.expose_secret(), 0x6b, "1M").unwrap();
        s.run_server();
    }
    assert!(
        left_pending >= 1,
        "no kill landed while a migration was under way: the trials tested nothing"
    );
    assert!(b.ok(&["audit", "--verify"]).contains("verified"));
    drop(cleanup);
}

#[test]
fn a_host_learns_the_replicas_from_the_server_and_reports_to_another_when_one_is_down() {
    let pg = Postgres::shared();
    let db = pg.database();
    let mut s = Stack::start_on_database(&db.url, Some(CONFIG));
    let b = second_replica(&s);
    let host = s.host.clone();
    let reported = |srv: &TestServer| {
        srv.json(&["host", "show", &host])["inventory_reported_unix"]
            .as_u64()
            .unwrap()
    };
    // Each replica names the URL hosts reach it at (here its listen
    // address, which the server certificate names).
    let st = status(&s.server.dir);
    let mut urls: Vec<&str> = st["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["url"].as_str().unwrap())
        .collect();
    urls.sort();
    let mut want = vec![s.server.url.as_str(), b.url.as_str()];
    want.sort();
    assert_eq!(urls, want, "{st}");

    // Enrollment wrote one URL, a's. The host's next inventory (a new
    // guest: its keys are what an inventory lists) is answered with both
    // replicas, which it keeps.
    let server_url = s.state_dir().join("server.url");
    let enrolled = std::fs::read_to_string(&server_url).unwrap();
    let learned = s.state_dir().join("replicas.url");
    let mut cleanup = guestkey_tests::Cleanup::default();
    let pid = std::process::id();
    s.volume("first", "16M");
    let g1 = format!("gk-test-{pid}-learn1");
    s.define_guest(
        &mut cleanup,
        &g1,
        &volume_domain_xml(&g1, &s.pool, "first", "qcow2"),
    );
    s.wait_for(60, "the host keeps both replicas", || {
        let text = std::fs::read_to_string(&learned).unwrap_or_default();
        text.lines().any(|l| l == b.url) && text.lines().any(|l| l == s.server.url)
    });
    assert_eq!(
        std::fs::read_to_string(&server_url).unwrap(),
        enrolled,
        "server.url is the operator's: left as it was"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&learned).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A guest defined through b (leading once a's lease lapsed) on the
    // host, whose new inventory must reach b.
    let define_on_b = |cleanup: &mut guestkey_tests::Cleanup, volume: &str, guest: &str| {
        b.ok(&[
            "volume", "create", "--host", &host, "--pool", &s.pool, "--name", volume, "--size",
            "16M",
        ]);
        b.wait_for(60, "ready", || {
            b.json(&["volume", "show", volume])["state"] == "ready"
        });
        let file = s.dir.join(format!("{guest}.xml"));
        std::fs::write(&file, volume_domain_xml(guest, &s.pool, volume, "qcow2")).unwrap();
        cleanup.virsh(&["undefine", guest]);
        b.json(&[
            "guest",
            "define",
            "--host",
            &host,
            "--xml",
            file.to_str().unwrap(),
        ]);
    };
    // a is killed: the running guestkeyd switches to the replica it learned
    // of, with no restart and no file edited.
    let before = reported(&b);
    std::thread::sleep(Duration::from_millis(1100));
    s.server.kill9();
    define_on_b(&mut cleanup, "listed", &format!("gk-test-{pid}-learn2"));
    let end = Instant::now() + Duration::from_secs(60);
    while reported(&b) <= before {
        assert!(
            Instant::now() < end,
            "no report through b\nguestkeyd: {}",
            s.daemon.as_ref().map(|d| d.log_text()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And the list shrinks with the replicas: a, gone, is forgotten once
    // silent for six leases, and b's answers name b alone.
    s.wait_for(60, "a forgotten", || {
        status(&b.dir)["replicas"].as_array().unwrap().len() == 1
    });
    define_on_b(&mut cleanup, "third", &format!("gk-test-{pid}-learn3"));
    s.wait_for(60, "the host keeps b alone", || {
        let text = std::fs::read_to_string(&learned).unwrap_or_default();
        text.lines().any(|l| l == b.url) && !text.lines().any(|l| l == s.server.url)
    });
    s.server.restart();
    drop(cleanup);
}
