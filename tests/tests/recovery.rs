//! Recovery of the server itself, end to end, on the real server,
//! guestkeyd, hook and libvirtd/KVM guest: `recovery split` makes 2-of-3
//! shares of a recovery key for custodians while the server runs; the
//! master key is rotated (the shares keep working); the database is backed
//! up online (`guestkey-server backup`); the data directory is wiped. Then
//! one share recovers nothing, shares of an older split, a forged share and
//! a wrong identity are refused, each with nothing made; two shares rebuild
//! the data directory, the server runs on it at its address, the host's
//! daemon trusts it as before, a rekey goes through it to the host, and the
//! guest starts on its disk and reads its data.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use guestkey_tests::image::{pattern_intact, qemu_io};
use guestkey_tests::stack::{Stack, bin};
use guestkey_tests::{Cleanup, virsh, volume_domain_xml};

fn server(args: &[&str]) -> Output {
    Command::new(bin("guestkey-server"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: &Output, want: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "not refused: {want}");
    assert!(e.contains(want), "wanted {want:?}: {e}");
}

fn d(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A custodian's identity file, made by `age-keygen` (Debian's `age`), and
/// its recipient as `age-keygen -y` prints it.
fn custodian(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.key"));
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("age-keygen")
        .arg("-y")
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recipient = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    (path, recipient)
}

/// What a custodian gets from `age -d -i KEY FILE`, byte for byte (the
/// zeros the share is padded with included).
fn decrypt(file: &Path, key: &Path) -> String {
    let o = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(key)
        .arg(file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.ends_with(&[0]), "age -d prints the padding");
    String::from_utf8(o.stdout).unwrap()
}

fn share_files(out: &Path) -> Vec<PathBuf> {
    (1..=3)
        .map(|i| out.join(format!("share-{i}-of-3.age")))
        .collect()
}

#[test]
fn two_of_three_shares_and_a_backup_rebuild_a_wiped_server_and_the_guest_starts() {
    let mut s = Stack::start();
    let mut cleanup = Cleanup::default();
    let data = s.dir.join("server");
    let custody = s.dir.join("custody");
    std::fs::create_dir_all(&custody).unwrap();
    let (alice_id, alice) = custodian(&custody, "alice");
    let (bob_id, bob) = custodian(&custody, "bob");
    let (carol_id, carol) = custodian(&custody, "carol");
    let (mallory_id, _) = custodian(&custody, "mallory");

    // A guest with data on an encrypted disk.
    let v = s.volume("rec-disk", "16M");
    let id = v["id"].as_str().unwrap().to_owned();
    let path = s.dir.join("pool").join("rec-disk");
    qemu_io(
        &s.dir,
        &path,
        s.server_key(&id).expose_secret(),
        "write -P 0x6b 0 1M",
    )
    .unwrap();
    let guest = format!("gk-test-{}-recovery", std::process::id());
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "rec-disk", "qcow2"),
    );
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    virsh(&["destroy", &guest]).unwrap();

    // A first split, then the one in force (while the server runs).
    let first = s.dir.join("first-shares");
    let split = |out: &Path| {
        server(&[
            "recovery",
            "split",
            "--data-dir",
            d(&data),
            "--shares",
            "2-of-3",
            "--to",
            &alice,
            "--to",
            &bob,
            "--to",
            &carol,
            "--out",
            d(out),
        ])
    };
    ok(&split(&first));
    let shares_dir = s.dir.join("shares");
    let text = ok(&split(&shares_dir));
    assert!(text.contains("is replaced"), "{text}");
    // Bad input: refused, nothing made.
    let o = server(&[
        "recovery",
        "split",
        "--data-dir",
        d(&data),
        "--shares",
        "2-of-3",
        "--to",
        &alice,
        "--to",
        &bob,
        "--out",
        d(&s.dir.join("x")),
    ]);
    refused(&o, "needs 3 custodians");
    let o = server(&[
        "recovery",
        "split",
        "--data-dir",
        d(&data),
        "--shares",
        "1-of-1",
        "--to",
        &alice,
        "--out",
        d(&s.dir.join("x")),
    ]);
    refused(&o, "M-of-N");
    assert!(!s.dir.join("x").exists());
    let status = ok(&server(&["recovery", "status", "--data-dir", d(&data)]));
    assert!(
        status.contains("2-of-3") && status.contains("the one in use"),
        "{status}"
    );
    assert!(status.contains("as in the data directory"), "{status}");
    assert!(!s.audit("recovery.split").is_empty());

    // The master key is rotated after the split: the shares follow it.
    ok(&server(&["rotate-master-key", "--data-dir", d(&data)]));
    let mk_after = std::fs::read_to_string(data.join("master.key")).unwrap();
    let status = ok(&server(&["recovery", "status", "--data-dir", d(&data)]));
    assert!(status.contains("the one in use"), "{status}");

    // An online backup, as an operator takes one, while the server runs.
    let backup = s.dir.join("backup.db");
    let text = ok(&server(&[
        "backup",
        "--data-dir",
        d(&data),
        "--out",
        d(&backup),
    ]));
    assert!(
        text.contains("checked") && text.contains("2-of-3") && text.contains("1 volume keys"),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = std::fs::read(&backup).unwrap();
    refused(
        &server(&["backup", "--data-dir", d(&data), "--out", d(&backup)]),
        "exists",
    );
    assert_eq!(std::fs::read(&backup).unwrap(), before);

    // The machine is lost: the server stops and its directory is gone.
    s.server.stop();
    std::fs::remove_dir_all(&data).unwrap();

    let shares = share_files(&shares_dir);
    let old = share_files(&first);
    let recover = |shares: &[&Path], ids: &[&Path]| {
        let mut args = vec![
            "recover".to_owned(),
            "--data-dir".into(),
            d(&data).into(),
            "--from-sqlite".into(),
            d(&backup).into(),
        ];
        for f in shares {
            args.extend(["--share".into(), d(f).into()]);
        }
        for f in ids {
            args.extend(["--identity".into(), d(f).into()]);
        }
        Command::new(bin("guestkey-server"))
            .args(&args)
            .output()
            .unwrap()
    };
    // One share: nothing recovered.
    refused(&recover(&[&shares[0]], &[&alice_id]), "2 needed");
    // The same share twice.
    refused(
        &recover(&[&shares[0], &shares[0]], &[&alice_id]),
        "given twice",
    );
    // Shares of the replaced split, and a mix of both.
    refused(
        &recover(&[&old[0], &old[1]], &[&alice_id, &bob_id]),
        "records split",
    );
    refused(
        &recover(&[&old[0], &shares[1]], &[&alice_id, &bob_id]),
        "different splits",
    );
    // A wrong identity.
    refused(
        &recover(&[&shares[0], &shares[1]], &[&mallory_id]),
        "none of the identities",
    );
    // A forged share: carol's text with another point.
    let carol_text = decrypt(&shares[2], &carol_id);
    let forged_text = carol_text
        .lines()
        .map(|l| match l.strip_prefix("share: ") {
            Some(b64) => {
                use base64::Engine;
                let e = base64::engine::general_purpose::STANDARD;
                let mut b = e.decode(b64).unwrap();
                b[10] ^= 0x21;
                format!("share: {}", e.encode(&b))
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let forged = custody.join("forged-share.txt");
    std::fs::write(&forged, forged_text).unwrap();
    refused(
        &recover(&[&shares[0], &forged], &[&alice_id]),
        "altered or forged",
    );
    assert!(!data.exists(), "a refused recovery made {}", data.display());
    assert_eq!(std::fs::read(&backup).unwrap(), before);

    // Alice's share file with her identity, and the text carol decrypted
    // herself: the directory is back.
    let carol_plain = custody.join("carol-share.txt");
    std::fs::write(&carol_plain, &carol_text).unwrap();
    let text = ok(&recover(&[&shares[0], &carol_plain], &[&alice_id]));
    assert!(text.contains("shares 1, 3"), "{text}");
    assert_eq!(
        std::fs::read_to_string(data.join("master.key"))
            .unwrap()
            .trim(),
        mk_after.trim()
    );

    // The server runs on it, at the same address; the host trusts it as
    // before: a rekey goes through, and the guest starts on its disk.
    s.run_server();
    s.json(&["volume", "rekey", "rec-disk", "--shallow"]);
    s.wait_for(120, "rekeyed", || {
        let v = s.json(&["volume", "show", "rec-disk"]);
        v["state"] == "ready" && v["key_generation"] != 1
    });
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    virsh(&["destroy", &guest]).unwrap();
    pattern_intact(&s.dir, &path, s.server_key(&id).expose_secret(), 0x6b, "1M").unwrap();
    assert!(!s.audit("server.recovered").is_empty());
    // The recovered record still opens with the shares (not consumed).
    let status = ok(&server(&["recovery", "status", "--data-dir", d(&data)]));
    assert!(status.contains("as in the data directory"), "{status}");
    virsh(&["undefine", &guest]).ok();
}
