//! The host daemon and the libvirt hook end to end, against the real
//! libvirtd + KVM, with the real server, daemon and hook binaries.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use guestkey_tests::image::{opens_with, pattern_intact, pattern_intact_fmt, qemu_io, qemu_io_fmt};
use guestkey_tests::stack::Stack;
use guestkey_tests::{run, virsh, volume_domain_xml};

fn domain_xml(name: &str, pool: &str, volume: &str) -> String {
    volume_domain_xml(name, pool, volume, "qcow2")
}

/// No libvirt secret is left for a volume under `dir` (this test's pool;
/// other tests' guests may hold theirs while they start, meanwhile).
fn no_secret_of(dir: &std::path::Path) -> bool {
    let dir = dir.to_str().unwrap();
    !virsh(&["secret-list"])
        .unwrap()
        .lines()
        .any(|l| l.contains(dir))
}

#[test]
fn virsh_start_of_a_managed_guest_needs_no_secret_step_and_refuses_without_a_key() {
    let mut s = Stack::start();
    s.volume("e2e-disk", "64M");
    let vol_path = s.dir.join("pool/e2e-disk");
    let info = run("qemu-img", &["info", vol_path.to_str().unwrap()]).unwrap();
    assert!(
        info.contains("encrypted: yes") && info.contains("format: luks"),
        "{info}"
    );

    // Define through guestkey; start with plain virsh.
    let guest = format!("gk-test-{}-guest", std::process::id());
    let uuid = s.define_guest_on(&s.host, &guest, &domain_xml(&guest, &s.pool, "e2e-disk"));
    s.cleanup.virsh(&["undefine", &guest]);
    s.cleanup.virsh(&["destroy", &guest]);
    let sealed = s.state_dir().join(format!("guests/{uuid}.sealed"));
    assert!(sealed.exists(), "the guest's keys are in the sealed store");

    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert!(
        no_secret_of(&s.dir),
        "a libvirt secret stayed defined: {}",
        virsh(&["secret-list"]).unwrap()
    );
    virsh(&["destroy", &guest]).unwrap();

    // `virsh save` + `virsh restore`: restore runs the hook too.
    virsh(&["start", &guest]).unwrap();
    let saved = s.dir.join("guest.save");
    virsh(&["save", &guest, saved.to_str().unwrap()]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "shut off");
    virsh(&["restore", saved.to_str().unwrap()]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert!(no_secret_of(&s.dir));
    virsh(&["destroy", &guest]).unwrap();

    // The management server is not needed to start it again, also after a
    // restart of guestkeyd.
    s.server.stop();
    s.run_daemon();
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert!(no_secret_of(&s.dir));
    virsh(&["destroy", &guest]).unwrap();

    // A guest that guestkey did not define, using the same volume: refused,
    // and the message names the volume.
    let rogue = format!("gk-test-{}-rogue", std::process::id());
    let rogue_xml = s.dir.join("rogue.xml");
    let dumped = virsh(&["dumpxml", &guest]).unwrap();
    let without_uuid: String = dumped
        .lines()
        .filter(|l| !l.trim_start().starts_with("<uuid>"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        &rogue_xml,
        without_uuid.replace(
            &format!("<name>{guest}</name>"),
            &format!("<name>{rogue}</name>"),
        ),
    )
    .unwrap();
    virsh(&["define", rogue_xml.to_str().unwrap()]).unwrap();
    s.cleanup.virsh(&["undefine", &rogue]);
    let err = virsh(&["start", &rogue]).unwrap_err().0;
    assert!(err.contains("holds no key of volume e2e-disk"), "{err}");
    assert_eq!(virsh(&["domstate", &rogue]).unwrap().trim(), "shut off");

    // Without guestkeyd, an encrypted guest is refused with a clear reason.
    s.daemon.take().unwrap().stop();
    let err = virsh(&["start", &guest]).unwrap_err().0;
    assert!(
        err.contains("guestkeyd does not answer") && err.contains("start guestkeyd"),
        "{err}"
    );
    assert!(Path::new(&sealed).exists());
}

/// GET `/metrics` of `addr`: the body of a 200 answer.
fn scrape(addr: &str) -> String {
    let (status, body) = guestkey_testkit::http_get(addr, "/metrics");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
    body
}

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn guestkeyd_metrics_count_calls_volumes_and_secrets_and_name_nothing() {
    let mut s = Stack::start();
    let addr = format!("127.0.0.1:{}", guestkey_testkit::free_port());
    s.run_daemon_with(&["--metrics-listen", &addr]);
    let v = s.volume("metered-disk", "16M");
    let guest = format!("gk-test-{}-metered", std::process::id());
    let uuid = s.define_guest_on(
        &s.host,
        &guest,
        &domain_xml(&guest, &s.pool, "metered-disk"),
    );
    s.cleanup.virsh(&["undefine", &guest]);
    s.cleanup.virsh(&["destroy", &guest]);
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();

    let body = scrape(&addr);
    let is = |name: &str, want: f64| {
        assert_eq!(sample(&body, name), Some(want), "{name}\n{body}");
    };
    is(
        r#"guestkeyd_rpc_requests_total{method="CreateVolume",code="OK"}"#,
        1.0,
    );
    is(
        r#"guestkeyd_rpc_requests_total{method="DefineGuest",code="OK"}"#,
        1.0,
    );
    assert!(
        sample(
            &body,
            r#"guestkeyd_rpc_duration_seconds_count{method="CreateVolume"}"#
        ) == Some(1.0),
        "{body}"
    );
    is("guestkeyd_volumes", 1.0);
    is("guestkeyd_guests", 1.0);
    is("guestkeyd_libvirt_secrets", 0.0);
    is("guestkeyd_stale_secrets", 0.0);
    is("guestkeyd_secrets_prepared_total", 1.0);
    is("guestkeyd_keys_sealed_to_tpm", 0.0);
    assert!(
        sample(&body, "guestkeyd_certificate_expiry_timestamp_seconds").is_some_and(|t| t > 1.7e9),
        "{body}"
    );
    // Counts only: no volume, guest, secret, path or host name.
    let id = v["id"].as_str().unwrap();
    let secret = v["secret_uuid"].as_str().unwrap();
    for word in [
        id,
        secret,
        uuid.as_str(),
        "metered",
        s.host.as_str(),
        s.pool.as_str(),
    ] {
        assert!(
            !body.contains(word),
            "{word} in guestkeyd's metrics:\n{body}"
        );
    }
    // Without the flag, nothing listens.
    s.run_daemon();
    assert!(std::net::TcpStream::connect(&addr).is_err());
}

#[test]
fn several_guests_start_at_once_and_undefine_erases_their_keys() {
    let s = Stack::start();
    let pid = std::process::id();
    let mut guests = vec![];
    for i in 0..3 {
        let vol = format!("multi-{i}");
        s.volume(&vol, "16M");
        let guest = format!("gk-test-{pid}-multi-{i}");
        let xml = s.dir.join(format!("{guest}.xml"));
        std::fs::write(&xml, domain_xml(&guest, &s.pool, &vol)).unwrap();
        s.json(&[
            "guest",
            "define",
            "--host",
            &s.host,
            "--xml",
            xml.to_str().unwrap(),
        ]);
        guests.push(guest);
    }
    for g in &guests {
        s.wait_for(60, "guest defined", || {
            s.json(&["guest", "show", g])["pending"] == ""
        });
    }
    let mut cleanup = guestkey_tests::Cleanup::default();
    for g in &guests {
        cleanup.virsh(&["undefine", g]);
        cleanup.virsh(&["destroy", g]);
    }
    // guestkeyd reports what it holds: ids, never keys.
    s.wait_for(30, "inventory report of 3 held keys", || {
        s.json(&["host", "show", &s.host])["held_keys"] == 3
    });
    // Start all three at once: every hook call gets its answer (bounded
    // waits on both sides), none blocks another.
    let started: Vec<_> = guests
        .iter()
        .map(|g| {
            let g = g.clone();
            std::thread::spawn(move || virsh(&["start", &g]).map_err(|e| e.0))
        })
        .collect();
    for t in started {
        t.join().unwrap().unwrap();
    }
    for g in &guests {
        assert_eq!(virsh(&["domstate", g]).unwrap().trim(), "running");
    }
    assert!(no_secret_of(&s.dir), "{}", virsh(&["secret-list"]).unwrap());

    // Undefine through guestkey: the domain goes, and so does its sealed record.
    let g = &guests[0];
    let uuid = s.json(&["guest", "show", g])["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let sealed = s.state_dir().join(format!("guests/{uuid}.sealed"));
    assert!(sealed.exists());
    s.json(&["guest", "undefine", g]);
    s.wait_for(60, "guest undefined", || {
        s.json(&["guest", "show", &uuid])["state"] == "undefined"
    });
    assert!(!sealed.exists(), "the sealed record is erased");
    assert!(virsh(&["domstate", g]).is_err(), "the domain is gone");
}

#[test]
fn guestkeyd_keeps_no_copy_of_a_key_after_use_and_undefine() {
    let s = Stack::start();
    let v = s.volume("mem-disk", "16M");
    let volume_id = v["id"].as_str().unwrap().to_owned();
    let guest = format!("gk-test-{}-mem", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &domain_xml(&guest, &s.pool, "mem-disk"),
    );
    // Use the key a few times: each start opens it in guestkeyd.
    for _ in 0..2 {
        virsh(&["start", &guest]).unwrap();
        virsh(&["destroy", &guest]).unwrap();
    }
    let key = s.server_key(&volume_id);
    let needles = guestkey_tests::memscan::Needles::of(key.expose_secret());

    // Control: the scanner finds the key in a process that holds it.
    let mut holder = std::process::Command::new("python3")
        .args(["-c", "import sys,time; k=sys.stdin.buffer.read(); print('ready', flush=True); time.sleep(60)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, Write};
        let mut stdin = holder.stdin.take().unwrap();
        stdin.write_all(key.expose_secret()).unwrap();
        drop(stdin);
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
    }
    drop(key);
    let control = needles.find_in(holder.id());
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        control.iter().any(|h| h.starts_with("whole key")),
        "control scan found nothing: the scanner is broken"
    );

    let pid = s.daemon.as_ref().unwrap().pid();
    let after_use = needles.find_in(pid);
    assert!(
        after_use.is_empty(),
        "guestkeyd kept the key after the starts: {after_use:?}"
    );

    let uuid = s.json(&["guest", "show", &guest])["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    s.json(&["guest", "undefine", &guest]);
    s.wait_for(60, "guest undefined", || {
        s.json(&["guest", "show", &uuid])["state"] == "undefined"
    });
    let after_undefine = needles.find_in(pid);
    assert!(
        after_undefine.is_empty(),
        "guestkeyd kept the key after undefine: {after_undefine:?}"
    );
}

#[test]
fn autostart_guests_start_when_guestkeyd_starts_with_the_server_down() {
    let mut s = Stack::start();
    s.volume("boot-disk", "16M");
    let guest = format!("gk-test-{}-boot", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &domain_xml(&guest, &s.pool, "boot-disk"),
    );
    virsh(&["autostart", &guest]).unwrap();

    // "Boot": the server is unreachable, guestkeyd starts after libvirtd
    // (whose own autostart of this guest failed in the hook, as guestkeyd
    // was not there yet), and the guest is not running.
    s.server.stop();
    s.daemon.take().unwrap().stop();
    let err = virsh(&["start", &guest]).unwrap_err().0;
    assert!(err.contains("start guestkeyd"), "{err}");
    s.run_daemon();
    s.wait_for(60, "guest autostarted by guestkeyd", || {
        virsh(&["domstate", &guest]).unwrap().trim() == "running"
    });
    assert!(no_secret_of(&s.dir));
}

#[test]
fn keys_go_when_libvirt_undefines_a_guest_even_while_guestkeyd_is_down() {
    let mut s = Stack::start();
    s.volume("ev-disk", "16M");
    let pid = std::process::id();
    let mut sealed = vec![];
    let mut names = vec![];
    for n in ["ev1", "ev2"] {
        let guest = format!("gk-test-{pid}-{n}");
        let uuid = s.define_guest_on(&s.host, &guest, &domain_xml(&guest, &s.pool, "ev-disk"));
        sealed.push(s.state_dir().join(format!("guests/{uuid}.sealed")));
        names.push(guest);
    }
    let mut cleanup = guestkey_tests::Cleanup::default();
    for n in &names {
        cleanup.virsh(&["undefine", n]);
    }
    assert!(sealed.iter().all(|p| p.exists()));

    // `virsh undefine` behind guestkey's back: the event erases the keys.
    virsh(&["undefine", &names[0]]).unwrap();
    s.wait_for(20, "keys erased after the undefine event", || {
        !sealed[0].exists()
    });

    // Undefined while guestkeyd is down: erased when it starts again.
    s.daemon.take().unwrap().stop();
    virsh(&["undefine", &names[1]]).unwrap();
    assert!(sealed[1].exists());
    s.run_daemon();
    s.wait_for(60, "keys erased by the start-up reconciliation", || {
        !sealed[1].exists()
    });
}

#[test]
fn a_volume_that_the_delivered_key_does_not_open_fails_with_qemus_words() {
    let s = Stack::start();
    s.volume("wrong-disk", "16M");
    let guest = format!("gk-test-{}-wrong", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &domain_xml(&guest, &s.pool, "wrong-disk"),
    );

    // Replace the image by one encrypted with another passphrase.
    let path = s.dir.join("pool/wrong-disk");
    std::fs::remove_file(&path).unwrap();
    let other = s.dir.join("other-pass");
    std::fs::write(&other, "not-the-key-guestkey-delivers-0123456789").unwrap();
    let secret = format!("secret,id=s0,file={}", other.display());
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1",
        path.to_str().unwrap(),
        "16M",
    ];
    guestkey_tests::retry_calibration(|| run("qemu-img", &args)).unwrap();
    let err = virsh(&["start", &guest]).unwrap_err().0;
    assert!(err.contains("Invalid password"), "{err}");
    assert!(
        no_secret_of(&s.dir),
        "the failed start left a secret: {}",
        virsh(&["secret-list"]).unwrap()
    );
}

#[test]
fn guestkeyd_runs_locked_and_without_core_dumps() {
    let s = Stack::start();
    let pid = s.daemon.as_ref().unwrap().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(locked_kb > 0, "no locked memory: {status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    let filter = std::fs::read_to_string(format!("/proc/{pid}/coredump_filter")).unwrap();
    assert_eq!(
        u32::from_str_radix(filter.trim(), 16).unwrap(),
        0,
        "coredump_filter {filter}"
    );
}

#[test]
fn a_second_host_never_receives_the_first_hosts_keys() {
    let s = Stack::start();
    let (host2, state2, _daemon2) = s.second_host();
    // Each host gets a volume; a guest on host 1 uses host 1's.
    s.volume("first-disk", "16M");
    s.json(&[
        "volume",
        "create",
        "--host",
        &host2,
        "--pool",
        &s.pool,
        "--name",
        "second-disk",
        "--size",
        "16M",
    ]);
    s.wait_for(60, "second volume ready", || {
        s.json(&["volume", "show", "second-disk"])["state"] == "ready"
    });
    let guest = format!("gk-test-{}-first", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &domain_xml(&guest, &s.pool, "first-disk"),
    );

    // The same guest on host 2 is refused by the server: the volume is host 1's.
    let xml2 = s.dir.join("first-on-2.xml");
    std::fs::write(
        &xml2,
        domain_xml("gk-test-elsewhere", &s.pool, "first-disk"),
    )
    .unwrap();
    let out = s.ctl(&[
        "guest",
        "define",
        "--host",
        &host2,
        "--xml",
        xml2.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("its volume is on host {}", s.host))
    );

    // Host 2 holds nothing of host 1: no guest record, only its own volume.
    let first_id = s.json(&["volume", "show", "first-disk"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(std::fs::read_dir(state2.join("guests")).unwrap().count(), 0);
    let vols = std::fs::read_to_string(state2.join("volumes.json")).unwrap();
    assert!(
        !vols.contains(&first_id) && vols.contains("second-disk"),
        "{vols}"
    );
    s.wait_for(30, "host 2 reported", || {
        s.json(&["host", "show", &host2])["inventory_reported_unix"] != 0
    });
    assert_eq!(s.json(&["host", "show", &host2])["held_keys"], 0);
}

#[test]
fn a_raw_luks_volume_works_like_a_qcow2_one() {
    let s = Stack::start();
    let (_, guest, path, _cleanup) = guest_on_volume_fmt(&s, "raw-disk", "raw", "raw");
    let info = run("qemu-img", &["info", path.to_str().unwrap()]).unwrap();
    assert!(info.contains("file format: luks"), "{info}");
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert!(no_secret_of(&s.dir));
}

#[test]
fn a_shallow_rekey_replaces_the_passphrase_and_the_guest_still_starts() {
    let s = Stack::start();
    let (id, guest, path, _cleanup) = guest_on_volume(&s, "rk-disk", "rekey");
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();
    let old = s.server_key(&id);
    assert!(opens_with(&s.dir, &path, "qcow2", old.expose_secret()));

    let r = s.json(&["volume", "rekey", "rk-disk", "--shallow"]);
    assert_eq!(r["state"], "rekeying");
    s.wait_for(60, "rekey done", || {
        let v = s.json(&["volume", "show", "rk-disk"]);
        v["state"] == "ready" && v["key_generation"] == 2
    });
    // The server holds only the new generation now; the image opens with
    // it and no longer with the old one.
    let db = rusqlite::Connection::open(s.dir.join("server/guestkey.db")).unwrap();
    let gens: Vec<i64> = db
        .prepare("SELECT generation FROM volume_keys WHERE volume_id = ?1")
        .unwrap()
        .query_map([&id], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(gens, vec![2]);
    let new = s.server_key(&id);
    assert!(opens_with(&s.dir, &path, "qcow2", new.expose_secret()));
    assert!(!opens_with(&s.dir, &path, "qcow2", old.expose_secret()));
    let actions: Vec<String> = s
        .json(&["audit"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        actions.iter().any(|a| a == "key.rotated") && actions.iter().any(|a| a == "key.destroyed")
    );

    // The guest starts with the new key from the updated sealed record.
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert!(no_secret_of(&s.dir));
}

fn luks_uuid(path: &Path) -> String {
    let info = run("qemu-img", &["info", path.to_str().unwrap()]).unwrap();
    info.lines()
        .find(|l| l.trim_start().starts_with("uuid:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn a_deep_rekey_rewrites_the_data_under_a_new_key_and_keeps_it() {
    let s = Stack::start();
    let (id, guest, path, _cleanup) = guest_on_volume(&s, "deep-disk", "deep");
    let old = s.server_key(&id);
    qemu_io(&s.dir, &path, old.expose_secret(), "write -P 0xab 0 1M").unwrap();
    let uuid_before = luks_uuid(&path);

    s.json(&["volume", "rekey", "deep-disk", "--deep"]);
    s.wait_for(120, "deep rekey done", || {
        let v = s.json(&["volume", "show", "deep-disk"]);
        v["state"] == "ready" && v["key_generation"] == 2
    });
    let new = s.server_key(&id);
    // Same data, read with the new key; a new LUKS header (new data key);
    // the old key opens nothing; no leftover copy.
    let out = qemu_io(&s.dir, &path, new.expose_secret(), "read -P 0xab 0 1M").unwrap();
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_ne!(
        luks_uuid(&path),
        uuid_before,
        "the LUKS header (data key) is new"
    );
    assert!(
        qemu_io(&s.dir, &path, old.expose_secret(), "read 0 512")
            .unwrap_err()
            .contains("Invalid password")
    );
    assert!(!s.dir.join("pool/deep-disk.gk-rekey").exists());
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert!(no_secret_of(&s.dir));
}

#[test]
fn a_rotation_policy_rekeys_old_keys_by_itself() {
    let s = Stack::start();
    s.volume("pol-disk", "16M");
    let bad = s.ctl(&[
        "policy",
        "set",
        "--volume",
        "pol-disk",
        "--max-key-age",
        "5y",
        "--mode",
        "shallow",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid duration \"5y\""));
    let bad = s.ctl(&[
        "policy",
        "set",
        "--volume",
        "pol-disk",
        "--max-key-age",
        "3s",
        "--mode",
        "medium",
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("invalid mode \"medium\": use shallow or deep")
    );
    assert!(s.json(&["policy", "list"]).as_array().unwrap().is_empty());

    s.json(&[
        "policy",
        "set",
        "--volume",
        "pol-disk",
        "--max-key-age",
        "3s",
        "--mode",
        "shallow",
    ]);
    assert_eq!(s.json(&["policy", "list"]).as_array().unwrap().len(), 1);
    s.wait_for(90, "the scheduler rotated the key", || {
        let v = s.json(&["volume", "show", "pol-disk"]);
        v["key_generation"].as_u64().unwrap() >= 2 && v["state"] == "ready"
    });
    let audit = s.json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["actor"] == "server:scheduler" && r["action"] == "volume.rekey-requested"),
        "{audit}"
    );
    s.json(&["policy", "remove", "--volume", "pol-disk"]);
}

fn qemu_pid(guest: &str) -> String {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{guest}.pid"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn a_running_guest_is_rekeyed_online_and_keeps_running() {
    let s = Stack::start();
    let (id, guest, path, _cleanup) = guest_on_volume(&s, "online-disk", "online");
    let old = s.server_key(&id);
    qemu_io(&s.dir, &path, old.expose_secret(), "write -P 0xcd 0 8M").unwrap();
    // --online for a guest that does not run: refused, nothing changes.
    s.json(&["volume", "rekey", "online-disk", "--deep", "--online"]);
    s.wait_for(60, "refused rekey", || {
        let v = s.json(&["volume", "show", "online-disk"]);
        v["state"] == "ready"
            && v["last_error"]
                .as_str()
                .unwrap()
                .contains("leave out --online")
    });
    assert_eq!(
        s.json(&["volume", "show", "online-disk"])["key_generation"],
        1
    );
    pattern_intact(&s.dir, &path, old.expose_secret(), 0xcd, "2M").unwrap();
    virsh(&["start", &guest]).unwrap();
    let pid = qemu_pid(&guest);
    // --offline while it runs: refused too.
    s.json(&["volume", "rekey", "online-disk", "--deep", "--offline"]);
    s.wait_for(60, "refused rekey", || {
        let v = s.json(&["volume", "show", "online-disk"]);
        v["state"] == "ready" && v["last_error"].as_str().unwrap().contains("stop it")
    });
    assert_eq!(
        s.json(&["volume", "show", "online-disk"])["key_generation"],
        1
    );

    // Asked for shallow: a running guest gets an online deep rekey.
    // With a bandwidth limit, which libvirt's block job shows.
    s.json(&[
        "volume",
        "rekey",
        "online-disk",
        "--shallow",
        "--bandwidth",
        "4M",
    ]);
    let mut limited = false;
    s.wait_for(120, "online rekey done", || {
        if let Ok(info) = virsh(&["blockjob", &guest, "vda", "--info"]) {
            limited |= info.contains("4194304") || info.contains("4.000 MiB/s");
        }
        let v = s.json(&["volume", "show", "online-disk"]);
        v["state"] == "ready" && v["key_generation"] == 2
    });
    assert!(limited, "the block copy ran at most 4 MiB/s");
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert_eq!(
        qemu_pid(&guest),
        pid,
        "the same QEMU process runs the guest"
    );
    assert!(no_secret_of(&s.dir), "{}", virsh(&["secret-list"]).unwrap());
    virsh(&["destroy", &guest]).unwrap();

    let new = s.server_key(&id);
    let out = qemu_io(&s.dir, &path, new.expose_secret(), "read -P 0xcd 0 2M").unwrap();
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(
        qemu_io(&s.dir, &path, old.expose_secret(), "read 0 512")
            .unwrap_err()
            .contains("Invalid password")
    );
    assert!(!s.dir.join("pool/online-disk.gk-rekey").exists());
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
}

/// Kill -9 of guestkeyd, of the server or of QEMU at a random instant of a
/// rekey (shallow or deep, offline or online): afterwards the rekey
/// completes, the server holds a key that opens the volume, and the data is
/// intact. `GUESTKEY_FAULT_TRIALS` sets the number of trials (default 6 in
/// the test command; the full variant is 50, see docs/benchmarks.md).
#[test]
fn a_crash_at_any_instant_of_a_rekey_loses_no_volume() {
    let trials: u32 = std::env::var("GUESTKEY_FAULT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut s = Stack::start();
    let (id, guest, path, _cleanup) = guest_on_volume(&s, "fault-disk", "fault");
    qemu_io(
        &s.dir,
        &path,
        s.server_key(&id).expose_secret(),
        "write -P 0xef 0 1M",
    )
    .unwrap();

    let mut x: u64 = u64::from(std::process::id()) * 0x9e37_79b9 + 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    // How many kills landed while the rotation was still under way, and
    // how many QEMU kills hit a QEMU that existed: a trial that killed
    // nothing, or killed after the rotation, tests nothing.
    let (mut mid_rotation, mut qemu_kills) = (0u32, 0u32);
    for t in 0..trials {
        let running = virsh(&["domstate", &guest]).unwrap().trim() == "running";
        if t % 2 == 1 && !running {
            virsh(&["start", &guest]).unwrap();
        } else if t % 2 == 0 && running {
            virsh(&["destroy", &guest]).unwrap();
        }
        let running = t % 2 == 1;
        // The first two trials rekey deep (the longer rotation) and kill
        // early, so that a kill surely lands mid-rotation; the others pick.
        let mode = if t < 2 || rand(2) == 1 {
            "--deep"
        } else {
            "--shallow"
        };
        let gen_before = s.json(&["volume", "show", "fault-disk"])["key_generation"]
            .as_u64()
            .unwrap();
        s.json(&["volume", "rekey", "fault-disk", mode]);
        // The first two trials kill early (the rotation surely runs), the
        // others at any instant of the first 2.5 s.
        let delay = if t < 2 { rand(100) } else { rand(2500) };
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let victim = rand(if running { 3 } else { 2 });
        let under_way =
            |s: &Stack| s.json(&["volume", "show", "fault-disk"])["state"] == "rekeying";
        match victim {
            0 => {
                let was = under_way(&s);
                s.daemon.take().unwrap().kill9();
                mid_rotation += u32::from(was);
                s.run_daemon();
            }
            1 => {
                let was = under_way(&s);
                s.server.kill9();
                mid_rotation += u32::from(was);
                s.run_server();
            }
            _ => {
                let was = under_way(&s);
                let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{guest}.pid"))
                    .unwrap_or_default();
                let killed = !pid.trim().is_empty()
                    && std::process::Command::new("kill")
                        .args(["-9", pid.trim()])
                        .status()
                        .is_ok_and(|st| st.success());
                qemu_kills += u32::from(killed);
                mid_rotation += u32::from(was && killed);
            }
        }
        println!("trial {t}: {mode}, running {running}, victim {victim} after {delay} ms");
        // The two-key window: mid-rotation the server holds the old and the
        // new generation, never more; once it is done, only the new one.
        let generations = || -> Vec<i64> {
            let db = rusqlite::Connection::open(s.dir.join("server/guestkey.db")).unwrap();
            db.prepare(
                "SELECT generation FROM volume_keys WHERE volume_id = ?1 ORDER BY generation",
            )
            .unwrap()
            .query_map([&id], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
        };
        let mid = generations();
        assert!(
            !mid.is_empty() && mid.len() <= 2 && mid.iter().all(|g| *g as u64 >= gen_before),
            "trial {t}: generations held mid-rotation: {mid:?}"
        );
        s.wait_for(240, "the rekey completes after the crash", || {
            let v = s.json(&["volume", "show", "fault-disk"]);
            v["state"] == "ready" && v["key_generation"].as_u64().unwrap() == gen_before + 1
        });
        assert_eq!(generations(), vec![(gen_before + 1) as i64], "trial {t}");
        let key = s.server_key(&id);
        if let Err(e) = pattern_intact(&s.dir, &path, key.expose_secret(), 0xef, "1M") {
            panic!(
                "trial {t} ({mode}, running {running}, victim {victim}): the server's key does not read the data: {e}"
            );
        }
        // And the guest still starts from its definition (whatever crashed).
        if virsh(&["domstate", &guest]).unwrap().trim() != "running" {
            if let Err(e) = virsh(&["start", &guest]) {
                panic!(
                    "trial {t} ({mode}, running {running}, victim {victim}): the guest does not start: {e}"
                );
            }
            virsh(&["destroy", &guest]).unwrap();
        }
    }
    println!(
        "{mid_rotation} of {trials} kills landed mid-rotation; {qemu_kills} QEMU processes killed"
    );
    assert!(
        mid_rotation >= 1,
        "no kill landed while the rotation was under way: the trials tested nothing"
    );
    let _ = virsh(&["destroy", &guest]);
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
}

/// A 16 MiB volume and a guest on it, defined through guestkey. Returns the
/// volume id, the guest's name, the image's path, and the guest's cleanup.
fn guest_on_volume(
    s: &Stack,
    volume: &str,
    tag: &str,
) -> (String, String, std::path::PathBuf, guestkey_tests::Cleanup) {
    guest_on_volume_fmt(s, volume, tag, "qcow2")
}

/// [`guest_on_volume`] with a volume of `format` (qcow2 or raw).
fn guest_on_volume_fmt(
    s: &Stack,
    volume: &str,
    tag: &str,
    format: &str,
) -> (String, String, std::path::PathBuf, guestkey_tests::Cleanup) {
    let v = s.volume_fmt(volume, "16M", format);
    let id = v["id"].as_str().unwrap().to_owned();
    let guest = format!("gk-test-{}-{tag}", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, volume, format),
    );
    (id, guest, s.dir.join("pool").join(volume), cleanup)
}

/// A deep rekey of a volume full of data shows the host's progress in
/// `volume show`, and `volume rekey --wait` follows it to the end.
#[test]
fn a_long_rekey_shows_its_progress_and_wait_follows_it() {
    let s = Stack::start();
    let v = s.volume("big-disk", "96M");
    let id = v["id"].as_str().unwrap().to_owned();
    let path = s.dir.join("pool/big-disk");
    let old = s.server_key(&id);
    qemu_io(&s.dir, &path, old.expose_secret(), "write -P 0x6b 0 96M").unwrap();
    let waiter = s
        .ctl_command(&["--json", "volume", "rekey", "big-disk", "--deep", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = vec![];
    s.wait_for(120, "the rekey to end", || {
        let v = s.json(&["volume", "show", "big-disk"]);
        if let Some(p) = v["progress"].as_object() {
            seen.push((
                p["phase"].as_str().unwrap_or_default().to_owned(),
                p["done_bytes"].as_u64().unwrap_or(0),
                p["total_bytes"].as_u64().unwrap_or(0),
            ));
        }
        v["key_generation"] == 2 && v["state"] == "ready"
    });
    assert!(
        seen.iter()
            .any(|(phase, _, total)| phase == "re-encrypting" && *total > 96 << 20),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(_, done, total)| *total == 0 || done <= total),
        "{seen:?}"
    );
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["key_generation"], 2);
    assert!(done["progress"].is_null());
    let new = s.server_key(&id);
    pattern_intact(&s.dir, &path, new.expose_secret(), 0x6b, "96M").unwrap();
}

/// Waits until `volume` is ready at key generation `generation`.
fn wait_generation(s: &Stack, volume: &str, generation: u64) {
    s.wait_for(
        120,
        &format!("{volume} ready at generation {generation}"),
        || {
            let v = s.json(&["volume", "show", volume]);
            v["state"] == "ready" && v["key_generation"] == generation
        },
    );
}

/// A raw LUKS volume (QEMU's LUKS1, no qcow2 around it) goes through every
/// rekey a qcow2 one does: shallow and deep offline, then deep online while
/// its guest runs; the data survives each, and only the newest key opens it.
#[test]
fn a_raw_luks_volume_is_rekeyed_shallow_deep_and_online() {
    let s = Stack::start();
    let (id, guest, path, _cleanup) = guest_on_volume_fmt(&s, "raw-rk", "rawrk", "raw");
    let k1 = s.server_key(&id);
    qemu_io_fmt(
        &s.dir,
        &path,
        "raw",
        k1.expose_secret(),
        "write -P 0x5a 0 2M",
    )
    .unwrap();

    // Shallow, offline: new keyslot, same data key (same LUKS UUID).
    let uuid1 = luks_uuid(&path);
    s.json(&["volume", "rekey", "raw-rk", "--shallow"]);
    wait_generation(&s, "raw-rk", 2);
    let k2 = s.server_key(&id);
    assert!(opens_with(&s.dir, &path, "raw", k2.expose_secret()));
    assert!(!opens_with(&s.dir, &path, "raw", k1.expose_secret()));
    assert_eq!(luks_uuid(&path), uuid1, "a shallow rekey keeps the header");
    pattern_intact_fmt(&s.dir, &path, "raw", k2.expose_secret(), 0x5a, "2M").unwrap();

    // Deep, offline: a new header (new data key), the data rewritten.
    s.json(&["volume", "rekey", "raw-rk", "--deep"]);
    wait_generation(&s, "raw-rk", 3);
    let k3 = s.server_key(&id);
    assert_ne!(luks_uuid(&path), uuid1, "a deep rekey makes a new header");
    assert!(!opens_with(&s.dir, &path, "raw", k2.expose_secret()));
    pattern_intact_fmt(&s.dir, &path, "raw", k3.expose_secret(), 0x5a, "2M").unwrap();

    // Deep, online: the guest keeps running in the same QEMU process.
    virsh(&["start", &guest]).unwrap();
    let pid = qemu_pid(&guest);
    let uuid3 = luks_uuid(&path);
    s.json(&["volume", "rekey", "raw-rk", "--deep"]);
    wait_generation(&s, "raw-rk", 4);
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert_eq!(
        qemu_pid(&guest),
        pid,
        "the same QEMU process runs the guest"
    );
    assert!(no_secret_of(&s.dir));
    virsh(&["destroy", &guest]).unwrap();
    let k4 = s.server_key(&id);
    assert_ne!(luks_uuid(&path), uuid3);
    assert!(!opens_with(&s.dir, &path, "raw", k3.expose_secret()));
    pattern_intact_fmt(&s.dir, &path, "raw", k4.expose_secret(), 0x5a, "2M").unwrap();
    assert!(!s.dir.join("pool/raw-rk.gk-rekey").exists());
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
}

/// A volume asked for while the host's guestkeyd is down waits, with the
/// reason shown, and is made once guestkeyd is back: nothing is lost.
#[test]
fn a_volume_asked_for_while_guestkeyd_is_down_is_made_when_it_is_back() {
    let mut s = Stack::start();
    s.daemon.take().unwrap().stop();
    // --no-wait: `volume create` would otherwise wait for guestkeyd.
    s.json(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "late-disk",
        "--size",
        "16M",
        "--no-wait",
    ]);
    s.wait_for(30, "a failed attempt", || {
        s.json(&["volume", "show", "late-disk"])["attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let v = s.json(&["volume", "show", "late-disk"]);
    assert_eq!(v["state"], "pending-create", "{v}");
    let why = v["last_error"].as_str().unwrap();
    assert!(why.contains(&s.host) && why.contains("unreachable"), "{v}");
    let path = s.dir.join("pool/late-disk");
    assert!(!path.exists());

    s.run_daemon();
    wait_generation(&s, "late-disk", 1);
    let key = s.server_key(v["id"].as_str().unwrap());
    assert!(opens_with(&s.dir, &path, "qcow2", key.expose_secret()));
}

/// A revoked host gets no more keys: creating, rekeying or decrypting its
/// volumes is refused with the reason, its rotation policy waits, and
/// nothing changes on the server or the host. Deleting one of its volumes
/// destroys the keys at once (crypto-shredding): the image stays on the
/// host, which nothing reaches any more.
#[test]
fn a_revoked_host_gets_no_more_keys_and_its_volumes_can_be_shredded() {
    let s = Stack::start();
    let v = s.volume("kept-disk", "16M");
    let id = v["id"].as_str().unwrap().to_owned();
    let path = s.dir.join("pool/kept-disk");
    let image_before = std::fs::read(&path).unwrap();
    s.json(&["host", "revoke", &s.host]);
    assert_eq!(s.json(&["host", "show", &s.host])["state"], "revoked");
    // A policy that would rotate the key every second.
    s.json(&[
        "policy",
        "set",
        "--volume",
        "kept-disk",
        "--max-key-age",
        "1s",
        "--mode",
        "shallow",
    ]);
    let volumes_before = s.json(&["volume", "list"]);

    let refused = [
        vec![
            "volume", "create", "--host", &s.host, "--pool", &s.pool, "--name", "new-disk",
            "--size", "16M",
        ],
        vec!["volume", "rekey", "kept-disk", "--deep"],
        vec!["volume", "rekey", "kept-disk", "--shallow"],
        vec!["volume", "decrypt", "kept-disk", "--yes-i-know"],
    ];
    for args in refused {
        let o = s.ctl(&args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(
            e.contains(&format!("host {} is revoked: no keys go to it", s.host)),
            "{args:?}: {e}"
        );
    }
    // Three scheduler rounds later, still nothing changed.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(s.json(&["volume", "list"]), volumes_before);
    assert!(!s.dir.join("pool/new-disk").exists());
    assert!(
        std::fs::read(&path).unwrap() == image_before,
        "the image changed"
    );

    let d = s.json(&["volume", "delete", "kept-disk"]);
    assert_eq!(d["state"], "deleted", "{d}");
    assert!(d["last_error"].as_str().unwrap().contains("revoked"), "{d}");
    let db = rusqlite::Connection::open(s.dir.join("server/guestkey.db")).unwrap();
    let keys: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM volume_keys WHERE volume_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(keys, 0, "every key generation is destroyed");
    let audit = s.json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "key.destroyed"
                && r["subject"] == id.as_str()
                && r["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("crypto-shredded")),
        "{audit}"
    );
}
