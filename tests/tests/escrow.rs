//! Escrow packets end to end, on the real server, guestkeyd, hook and
//! libvirtd/KVM guest, with real qemu-img/qemu-io and cryptsetup: a packet
//! needs a request by one admin and an approval by another; the host seals
//! it only to the custodians of its own --escrow-recipients file; then,
//! with the packet and a custodian's identity alone (no server, no
//! guestkeyd), a destroyed LUKS header is rebuilt and the guest starts on
//! its disk again with its data, the data is copied out read-only, and a
//! passphrase of the custodian's is added. A wrong identity, a tampered
//! packet and another volume's packet are refused with nothing changed;
//! a rekey makes the packet obsolete.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use age::secrecy::ExposeSecret;
use guestkey_tests::image::{pattern_intact, pattern_intact_fmt, qemu_io, qemu_io_fmt};
use guestkey_tests::stack::{Stack, bin};
use guestkey_tests::{Cleanup, virsh, volume_domain_xml};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn d(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn recover(args: &[&str]) -> Output {
    Command::new(bin("guestkey-recover"))
        .args(args)
        .output()
        .unwrap()
}

/// A custodian's age identity file (as `age-keygen` writes it) and its
/// recipient.
fn custodian(dir: &Path, name: &str) -> (PathBuf, String) {
    let id = age::x25519::Identity::generate();
    let path = dir.join(format!("{name}.key"));
    std::fs::write(
        &path,
        format!("# custodian {name}\n{}\n", id.to_string().expose_secret()),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, id.to_public().to_string())
}

/// Where the LUKS header of the image is (its magic).
fn luks_at(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    b.windows(6).position(|w| w == b"LUKS\xba\xbe").unwrap() as u64
}

#[test]
fn a_packet_made_by_two_admins_restores_a_destroyed_header_and_the_guest_starts_with_its_data() {
    let mut s = Stack::start();
    let mut cleanup = Cleanup::default();
    let custody = s.dir.join("custody");
    std::fs::create_dir_all(&custody).unwrap();
    std::fs::set_permissions(&custody, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (alice_id, alice) = custodian(&custody, "alice");
    let (carol_id, carol) = custodian(&custody, "carol");
    let (mallory_id, mallory) = custodian(&custody, "mallory");
    let recipients = custody.join("recipients");
    std::fs::write(&recipients, format!("# custodians\n{alice}\n{carol}\n")).unwrap();
    std::fs::set_permissions(&recipients, std::fs::Permissions::from_mode(0o644)).unwrap();
    s.run_daemon_with(&["--escrow-recipients", d(&recipients)]);

    // Two volumes with data.
    let mut ids = vec![];
    for (name, format) in [("esc-q", "qcow2"), ("esc-r", "raw")] {
        let v = s.json(&[
            "volume", "create", "--host", &s.host, "--pool", &s.pool, "--name", name, "--size",
            "16M", "--format", format,
        ]);
        assert_eq!(v["state"], "ready", "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let path = s.dir.join("pool").join(name);
        let key = s.server_key(&id);
        qemu_io_fmt(
            &s.dir,
            &path,
            format,
            key.expose_secret(),
            "write -P 0x5e 0 1M",
        )
        .unwrap();
        ids.push((id, path));
    }
    let (q_id, q_path) = ids[0].clone();
    let r_path = ids[1].1.clone();

    // A second admin, bob.
    let bob = s.dir.join("bob-credential");
    let o = Command::new(bin("guestkey-server"))
        .args(["admin", "add", "bob", "--data-dir"])
        .arg(s.dir.join("server"))
        .arg("--out")
        .arg(&bob)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let as_bob = |args: &[&str]| {
        let mut c = s.ctl_command(args);
        c.env("GUESTKEY_ADMIN_DIR", &bob);
        c.output().unwrap()
    };

    // The request, by admin; admin may not approve it; bob does.
    let req = s.json(&[
        "volume",
        "escrow",
        "esc-q",
        "--to",
        &alice,
        "--to",
        &carol,
        "--reason",
        "offsite copy",
    ]);
    assert_eq!(req["state"], "pending", "{req}");
    let id = req["id"].as_str().unwrap().to_owned();
    let own = s.ctl(&["escrow", "approve", &id]);
    assert!(!own.status.success());
    assert!(stderr(&own).contains("another admin"), "{}", stderr(&own));
    let made = as_bob(&["--json", "escrow", "approve", &id]);
    assert!(made.status.success(), "{}", stderr(&made));
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    assert_eq!(made["state"], "made", "{made}");
    assert_eq!(made["obsolete"], false, "{made}");
    let packet = s.dir.join("esc-q.packet");
    let o = s.ctl(&["escrow", "fetch", &id, "--out", d(&packet)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&packet).unwrap().permissions().mode() & 0o077,
        0
    );
    // Fetching again never overwrites.
    assert!(
        !s.ctl(&["escrow", "fetch", &id, "--out", d(&packet)])
            .status
            .success()
    );

    // A recipient the host does not name: the approval fails with the
    // host's reason, the request stays pending; then denied.
    let req2 = s.json(&["volume", "escrow", "esc-r", "--to", &mallory]);
    let id2 = req2["id"].as_str().unwrap().to_owned();
    let o = as_bob(&["escrow", "approve", &id2]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--escrow-recipients"), "{}", stderr(&o));
    let o = as_bob(&["escrow", "deny", &id2, "--note", "not a custodian"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One for esc-r that will do, to try it on the wrong image below.
    let req3 = s.json(&["volume", "escrow", "esc-r", "--to", &carol]);
    let id3 = req3["id"].as_str().unwrap().to_owned();
    assert!(as_bob(&["escrow", "approve", &id3]).status.success());
    let r_packet = s.dir.join("esc-r.packet");
    assert!(
        s.ctl(&["escrow", "fetch", &id3, "--out", d(&r_packet)])
            .status
            .success()
    );
    let text = std::fs::read(&packet).unwrap();
    let key = s.server_key(&q_id);
    assert!(
        !text
            .windows(key.expose_secret().len())
            .any(|w| w == key.expose_secret()),
        "the packet is ciphertext"
    );

    // show: the metadata, nothing secret.
    let o = recover(&["show", d(&packet), "--identity", d(&alice_id)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = stdout(&o);
    for want in ["esc-q", &q_id, &s.host, "qcow2", "admin", "bob"] {
        assert!(shown.contains(want), "{want}: {shown}");
    }
    let secret = String::from_utf8_lossy(key.expose_secret()).into_owned();
    assert!(!shown.contains(&secret), "{shown}");
    let o = recover(&[
        "show",
        d(&packet),
        "--identity",
        d(&carol_id),
        "--reveal",
        "passphrase",
    ]);
    assert!(stdout(&o).contains(&secret));

    // guestkeyd kept neither secret of the packets it made, nor the text
    // they were sealed from (the scanner's control is in host.rs).
    let o = recover(&[
        "show",
        d(&packet),
        "--identity",
        d(&carol_id),
        "--reveal",
        "data-key",
    ]);
    let data_key_hex = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("data key"))
        .unwrap()
        .trim()
        .to_owned();
    let data_key = hex::decode(&data_key_hex).unwrap();
    let pid = s.daemon.as_ref().unwrap().pid();
    for (what, needle) in [
        ("passphrase", key.expose_secret().to_vec()),
        ("data key", data_key),
        ("data key in hex", data_key_hex.into_bytes()),
    ] {
        let hits = guestkey_tests::memscan::Needles::of(&needle).find_in(pid);
        assert!(hits.is_empty(), "guestkeyd kept the {what}: {hits:?}");
    }

    // The guest starts on its disk.
    let guest = format!("gk-test-{}-escrow", std::process::id());
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "esc-q", "qcow2"),
    );
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    // Not while it runs: QEMU holds the image.
    let o = recover(&[
        "restore-header",
        d(&packet),
        "--identity",
        d(&alice_id),
        "--image",
        d(&q_path),
    ]);
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    virsh(&["destroy", &guest]).unwrap();

    // The header destroyed: the guest no longer starts.
    let at = luks_at(&q_path);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&q_path)
        .unwrap();
    f.write_all_at(&[0u8; 8192], at).unwrap();
    drop(f);
    assert!(virsh(&["start", &guest]).is_err());
    let damaged = std::fs::read(&q_path).unwrap();

    // Refused, nothing changed: a wrong identity, a tampered packet,
    // another volume's packet.
    let o = recover(&[
        "restore-header",
        d(&packet),
        "--identity",
        d(&mallory_id),
        "--image",
        d(&q_path),
    ]);
    assert!(
        stderr(&o).contains("none of the identities opens this packet"),
        "{}",
        stderr(&o)
    );
    let tampered = s.dir.join("tampered.packet");
    let mut t = std::fs::read(&packet).unwrap();
    let n = t.len();
    t[n - 20] ^= 0x40;
    std::fs::write(&tampered, &t).unwrap();
    let o = recover(&[
        "restore-header",
        d(&tampered),
        "--identity",
        d(&alice_id),
        "--image",
        d(&q_path),
    ]);
    assert!(stderr(&o).contains("altered or damaged"), "{}", stderr(&o));
    // Another volume's packet: refused by the image's name, and with
    // --renamed by what is left of the image (a qcow2 file, a raw packet).
    let other = |extra: &[&str]| {
        let mut a = vec![
            "restore-header",
            d(&r_packet),
            "--identity",
            d(&carol_id),
            "--image",
            d(&q_path),
        ];
        a.extend_from_slice(extra);
        recover(&a)
    };
    let o = other(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("add --renamed"), "{}", stderr(&o));
    let o = other(&["--renamed"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("another volume"), "{}", stderr(&o));
    assert!(
        std::fs::read(&q_path).unwrap() == damaged,
        "nothing written"
    );

    // Restored from the packet alone: the guest starts, with its data.
    let saved = s.dir.join("esc-q.damaged");
    let o = recover(&[
        "restore-header",
        d(&packet),
        "--identity",
        d(&alice_id),
        "--image",
        d(&q_path),
        "--save-old",
        d(&saved),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read(&saved).unwrap()[..8192]
            .iter()
            .all(|&b| b == 0)
    );
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    virsh(&["destroy", &guest]).unwrap();
    pattern_intact(&s.dir, &q_path, key.expose_secret(), 0x5e, "1M").unwrap();

    // A read-only copy, in cleartext.
    let copy = s.dir.join("esc-q.copy");
    let o = recover(&[
        "copy",
        d(&packet),
        "--identity",
        d(&carol_id),
        "--image",
        d(&q_path),
        "--out",
        d(&copy),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x5e 0 1M"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        stdout(&o).contains("read 1048576/1048576"),
        "{}",
        stdout(&o)
    );

    // A custodian's own passphrase: cryptsetup opens the raw volume with it.
    let r_key = s.server_key(&ids[1].0);
    let pass = s.dir.join("custodian.pass");
    std::fs::write(&pass, "a passphrase of carol's\n").unwrap();
    let o = recover(&[
        "add-passphrase",
        d(&r_packet),
        "--identity",
        d(&carol_id),
        "--image",
        d(&r_path),
        "--new-passphrase-file",
        d(&pass),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&pass)
        .args(["--keyfile-size", "23"])
        .arg(&r_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    pattern_intact_fmt(&s.dir, &r_path, "raw", r_key.expose_secret(), 0x5e, "1M").unwrap();
    assert!(qemu_io(&s.dir, &r_path, b"not the key", "read 0 512").is_err());

    // A rekey makes the packet obsolete.
    let v = s.json(&["volume", "rekey", "esc-q", "--shallow"]);
    s.wait_for(120, "rekeyed", || {
        s.json(&["volume", "show", "esc-q"])["state"] == "ready"
    });
    let _ = v;
    let list = s.json(&["escrow", "list", "--all"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["obsolete"], true, "{list}");

    // Audited: asked, refused, made, fetched, denied.
    let audit = s.json(&["audit", "--limit", "10000"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    for want in [
        "escrow.requested",
        "escrow.made",
        "escrow.fetched",
        "escrow.denied",
    ] {
        assert!(actions.contains(&want), "{want}: {actions:?}");
    }
    assert!(!audit.to_string().contains(&secret));
    virsh(&["undefine", &guest]).ok();
}
