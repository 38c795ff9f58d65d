//! `volume encrypt` (cleartext to LUKS, offline and online) and
//! `volume decrypt --yes-i-know`, end to end against the real libvirtd/KVM,
//! server, guestkeyd and hook.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use guestkey_tests::image::{opens_with, pattern_intact};
use guestkey_tests::stack::Stack;
use guestkey_tests::{Cleanup, minimal_domain_xml, run, virsh};

fn domain_xml(name: &str, disk: &Path) -> String {
    minimal_domain_xml(name, disk, "qcow2", "")
}

/// A cleartext qcow2 volume made by libvirt, with a pattern written in it.
fn plain_volume(s: &Stack, name: &str, byte: u8) -> std::path::PathBuf {
    virsh(&["vol-create-as", &s.pool, name, "16M", "--format", "qcow2"]).unwrap();
    let path = s.dir.join("pool").join(name);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {byte:#x} 0 1M"),
            path.to_str().unwrap(),
        ],
    )
    .unwrap();
    path
}

/// Reads the pattern back from a cleartext image (read-only, shared).
fn plain_pattern_intact(path: &Path, byte: u8) -> bool {
    run(
        "qemu-io",
        &[
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {byte:#x} 0 1M"),
            path.to_str().unwrap(),
        ],
    )
    .is_ok_and(|out| !out.contains("Pattern verification failed"))
}

fn encrypted(path: &Path) -> bool {
    run("qemu-img", &["info", "-U", path.to_str().unwrap()])
        .unwrap()
        .contains("encrypted: yes")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_cleartext_volume_is_encrypted_its_guest_gets_the_key_and_decrypt_undoes_it() {
    let s = Stack::start();
    let path = plain_volume(&s, "plain-a", 0x3c);
    let guest = format!("gk-test-{}-conv", std::process::id());
    let mut cleanup = Cleanup::default();
    // Defined through guestkey while its disk is cleartext: not managed.
    let uuid = s.define_guest(&mut cleanup, &guest, &domain_xml(&guest, &path));
    assert!(
        s.json(&["guest", "show", &guest])["volumes"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Bad requests change nothing: an error naming what to fix, no record.
    let host = s.host.clone();
    let pool = s.pool.clone();
    let encrypt = |name: &str, format: &str| {
        s.ctl(&[
            "volume", "encrypt", "--host", &host, "--pool", &pool, "--name", name, "--format",
            format,
        ])
    };
    let wrong = encrypt("plain-a", "raw");
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("use --format qcow2"),
        "{}",
        stderr(&wrong)
    );
    let missing = encrypt("no-such-volume", "qcow2");
    assert!(
        stderr(&missing).contains("there is no volume no-such-volume"),
        "{}",
        stderr(&missing)
    );
    assert!(!s.ctl(&["volume", "show", "plain-a"]).status.success());
    assert!(!encrypted(&path) && plain_pattern_intact(&path, 0x3c));

    // Encrypted offline (the guest does not run): same data, under the key.
    let v = s.json(&[
        "volume", "encrypt", "--host", &host, "--pool", &pool, "--name", "plain-a",
    ]);
    assert_eq!(v["state"], "ready", "{v}");
    assert_eq!(v["capacity_bytes"], 16 << 20);
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(encrypted(&path));
    assert!(!s.dir.join("pool/plain-a.gk-rekey").exists());
    let key = s.server_key(&id);
    pattern_intact(&s.dir, &path, key.expose_secret(), 0x3c, "1M").unwrap();
    // A second encrypt of the same volume is refused.
    assert!(stderr(&encrypt("plain-a", "qcow2")).contains("already"));

    // The guest defined through guestkey gets the key and starts with virsh.
    s.wait_for(60, "guest redefined with the key", || {
        let g = s.json(&["guest", "show", &guest]);
        g["pending"] == "" && g["volumes"][0] == "plain-a"
    });
    let secret = v["secret_uuid"].as_str().unwrap();
    assert!(
        virsh(&["dumpxml", "--inactive", &guest])
            .unwrap()
            .contains(secret)
    );
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    virsh(&["destroy", &guest]).unwrap();

    // Decrypt: needs the confirmation, and no guest on the volume.
    let unconfirmed = s.ctl(&["volume", "decrypt", "plain-a"]);
    assert!(
        stderr(&unconfirmed).contains("--yes-i-know"),
        "{}",
        stderr(&unconfirmed)
    );
    let in_use = s.ctl(&["volume", "decrypt", "plain-a", "--yes-i-know"]);
    assert!(stderr(&in_use).contains(&guest), "{}", stderr(&in_use));
    assert_eq!(s.json(&["volume", "show", "plain-a"])["state"], "ready");
    s.json(&["guest", "undefine", &guest]);
    s.wait_for(60, "guest undefined", || {
        s.json(&["guest", "show", &uuid])["state"] == "undefined"
    });
    s.json(&["volume", "decrypt", "plain-a", "--yes-i-know"]);
    s.wait_for(60, "volume decrypted", || {
        s.json(&["volume", "show", &id])["state"] == "decrypted"
    });
    assert!(!encrypted(&path));
    assert!(plain_pattern_intact(&path, 0x3c));
    let audit = String::from_utf8_lossy(&s.ctl(&["--json", "audit"]).stdout).into_owned();
    for action in [
        "volume.encrypt-failed",
        "volume.encrypted",
        "volume.decrypt-requested",
        "volume.decrypted",
        "key.destroyed",
    ] {
        assert!(audit.contains(action), "{action} in the audit log");
    }
    drop(cleanup);
}

#[test]
fn a_running_guests_cleartext_disk_is_encrypted_online() {
    let s = Stack::start();
    let path = plain_volume(&s, "plain-b", 0x7e);
    // A guest of the operator's own, defined with plain virsh.
    let guest = format!("gk-test-{}-online-conv", std::process::id());
    let file = s.dir.join("online-conv.xml");
    std::fs::write(&file, domain_xml(&guest, &path)).unwrap();
    let mut cleanup = Cleanup::default();
    virsh(&["define", file.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["undefine", &guest]);
    cleanup.virsh(&["destroy", &guest]);
    virsh(&["start", &guest]).unwrap();
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{guest}.pid")).unwrap();

    let v = s.json(&[
        "volume", "encrypt", "--host", &s.host, "--pool", &s.pool, "--name", "plain-b",
    ]);
    assert_eq!(v["state"], "ready", "{v}");
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    assert_eq!(
        std::fs::read_to_string(format!("/run/libvirt/qemu/{guest}.pid")).unwrap(),
        pid,
        "the same QEMU process runs the guest"
    );
    let secret = v["secret_uuid"].as_str().unwrap();
    let inactive = virsh(&["dumpxml", "--inactive", &guest]).unwrap();
    assert!(inactive.contains(secret), "{inactive}");
    assert!(inactive.contains(path.to_str().unwrap()), "{inactive}");
    virsh(&["destroy", &guest]).unwrap();
    assert!(encrypted(&path));
    let key = s.server_key(v["id"].as_str().unwrap());
    pattern_intact(&s.dir, &path, key.expose_secret(), 0x7e, "1M").unwrap();
    assert!(!plain_pattern_intact(&path, 0x7e), "no cleartext left");
    assert!(opens_with(&s.dir, &path, "qcow2", key.expose_secret()));

    // Not defined through guestkey, so its host holds no key for it: a
    // start fails with a message that says what to do.
    let err = virsh(&["start", &guest]).unwrap_err().0;
    assert!(err.contains("guestkeyctl guest define"), "{err}");
    drop(cleanup);
}
