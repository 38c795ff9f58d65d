//! Split keys end to end: two real guestkey servers (the management server
//! and a verifier, each with its own data directory, master key and CAs),
//! the real guestkeyd and hook, a real libvirtd/KVM guest, and a TPM
//! simulator (`swtpm`, the only stand-in). Each server attests the host on
//! its own before it releases its half; guestkeyd combines them. Neither
//! database alone holds the passphrase: the management server's half does
//! not open the volume. With the verifier down the guest does not start,
//! and `virsh start` names the missing half and where it is.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};

use guestkey_testkit::cleanup::Made;
use guestkey_testkit::{Bins, Swtpm, TestServer};
use guestkey_tests::stack::{Stack, bin};
use guestkey_tests::{virsh, volume_domain_xml};

/// Short retries, and no giving up while the test sets the verifier up.
const CONFIG: &str = "[retry]\ninitial_delay_ms = 200\nmax_delay_ms = 1000\nmax_attempts = 1000\n";

fn d(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Audit records of `action` about `subject` at `server`.
fn audited(server: &TestServer, action: &str, subject: &str) -> usize {
    server
        .json(&["audit", "--limit", "10000"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == action && r["subject"] == subject)
        .count()
}

/// The verifier's halves, unwrapped with its master key: (volume,
/// generation, half).
fn verifier_halves(verifier: &TestServer) -> Vec<(String, u64, xdr_wipe::packet::PacketSecret)> {
    let db = rusqlite::Connection::open(verifier.dir.join("guestkey.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT volume_id, generation, master_key_id, wrapped FROM key_halves")
        .unwrap();
    let rows: Vec<(String, i64, String, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let source = mgmt_server::masterkey::MasterKeySource::File(verifier.dir.join("master.key"));
    let mk = mgmt_server::masterkey::MasterKey::load(&source).unwrap();
    rows.into_iter()
        .map(|(v, g, mk_id, wrapped)| {
            let half = mk
                .unwrap_key(&format!("half:{v}"), g as u64, &mk_id, &wrapped)
                .unwrap();
            (v, g as u64, half)
        })
        .collect()
}

/// `guestkeyd enroll-verifier` with `token` on stdin.
fn enroll_verifier(s: &Stack, verifier: &TestServer, token: &str) -> std::process::Output {
    let mut child = Command::new(bin("guestkeyd"))
        .args([
            "enroll-verifier",
            "--server",
            &verifier.url,
            "--token-file",
            "-",
        ])
        .arg("--ca-file")
        .arg(verifier.admin_dir().join("ca.pem"))
        .arg("--state-dir")
        .arg(s.state_dir())
        .env("TSS2_LOG", "all+none")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), token.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_split_key_needs_both_servers_and_neither_holds_the_passphrase() {
    let tpm = Swtpm::start();
    let dir = guestkey_testkit::temp_dir("tpm-authority");
    let _gone = Made::dir(&dir);
    let mut s = Stack::start_configured(
        &[
            "--tpm".into(),
            "--tpm-tcti".into(),
            tpm.tcti(),
            "--tpm-authority-key".into(),
            d(&dir.join("authority.pk8")).into(),
        ],
        Some(CONFIG),
    );
    // The verifier: a second server of its own.
    let mut verifier = TestServer::start_in(
        s.dir.join("verifier"),
        Bins::from_target_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..")),
        Some(&format!("role = \"verifier\"\n{CONFIG}")),
    );
    // It serves no volumes, and says where to go.
    let o = verifier.ctl(&["volume", "list"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("runs as a verifier"), "{}", stderr(&o));

    // Both allowlists: the management server learns from a verified quote;
    // the verifier's admin states the same values on its own.
    let learnt = s.json(&[
        "attestation",
        "allow",
        "--host",
        &s.host,
        "--learn",
        "--learn-pcrs",
        "0,7,10",
    ]);
    let host = s.host.clone();
    let mut allow = vec!["attestation", "allow", "--host", &host];
    let pcrs: Vec<String> = learnt["pcrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}={}", p["pcr"], p["sha256"].as_str().unwrap()))
        .collect();
    for p in &pcrs {
        allow.extend(["--pcr", p]);
    }

    // A split volume needs an attesting policy, and a host enrolled with
    // the verifier: until then its creation waits, naming what to run.
    let o = s.ctl(&[
        "volume", "create", "--host", &s.host, "--pool", &s.pool, "--name", "sp", "--size", "16M",
        "--split",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("use --release attested or attested+approved with --split"));
    let v = s.json(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "sp",
        "--size",
        "16M",
        "--split",
        "--release",
        "attested",
        "--no-wait",
    ]);
    assert_eq!(v["split"], true, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    s.wait_for(60, "the creation waiting for a verifier", || {
        s.json(&["volume", "show", "sp"])["last_error"]
            .as_str()
            .unwrap()
            .contains("not enrolled with a verifier")
    });

    // The host enrolls with the verifier under its own name, with its TPM:
    // the verifier pins the AK by its own credential.
    let token =
        verifier.json(&["host", "add", &s.host, "--address", "127.0.0.1:9"])["enrollment_token"]
            .as_str()
            .unwrap()
            .to_owned();
    s.daemon.take().unwrap().stop();
    let o = enroll_verifier(&s, &verifier, &token);
    assert!(o.status.success(), "{}", stderr(&o));
    let h = verifier.json(&["host", "show", &s.host]);
    assert_eq!(h["attestation"]["pinned"], true, "{h}");
    // A second enrollment is refused, and the spent token changes nothing.
    let o = enroll_verifier(&s, &verifier, &token);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already enrolled with a verifier"),
        "{}",
        stderr(&o)
    );
    s.run_daemon();

    // Without the verifier's allowlist it releases no half.
    s.wait_for(60, "the verifier refusing an unlisted host", || {
        s.json(&["volume", "show", "sp"])["last_error"]
            .as_str()
            .unwrap()
            .contains("has no attestation allowlist")
    });
    assert_eq!(audited(&verifier, "half.released", &id), 0);
    // A verifier never calls hosts: it cannot learn, and says how to allow.
    let o = verifier.ctl(&["attestation", "allow", "--host", &host, "--learn"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("give them with --pcr N=HEX"),
        "{}",
        stderr(&o)
    );
    verifier.json(&allow);
    s.wait_for(90, "the split volume made", || {
        s.json(&["volume", "show", "sp"])["state"] == "ready"
    });
    assert_eq!(audited(&verifier, "half.created", &id), 1);
    assert_eq!(audited(&verifier, "half.released", &id), 1);
    assert_eq!(audited(&verifier, "host.attested", &s.host), 1);

    // The management server's half alone opens nothing.
    let path = s.dir.join("pool").join("sp");
    let u = s.server_key(&id);
    assert_eq!(u.len(), 32);
    let halves = verifier_halves(&verifier);
    assert_eq!(halves.len(), 1);
    let (vid, generation, v) = &halves[0];
    assert_eq!((vid.as_str(), *generation), (id.as_str(), 1));
    let text = |b: &[u8]| xdr_wipe::packet::passphrase_from_random(b.try_into().unwrap());
    let opens = |key: &[u8]| guestkey_tests::image::opens_with(&s.dir, &path, "qcow2", key);
    for half in [u.expose_secret(), v.expose_secret()] {
        assert!(!opens(half), "a half opens the volume");
        assert!(
            !opens(text(half).expose_secret()),
            "a half's text opens the volume"
        );
    }
    let xor: Vec<u8> = u
        .expose_secret()
        .iter()
        .zip(v.expose_secret())
        .map(|(a, b)| a ^ b)
        .collect();
    assert!(
        opens(text(&xor).expose_secret()),
        "base64url(U xor V) does not open it"
    );

    // A guest on it starts: both halves released, each after its own
    // attestation with its own nonce.
    let guest = format!("gk-test-{}-split", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "sp", "qcow2"),
    );
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();
    assert_eq!(audited(&verifier, "half.released", &id), 2);

    // The verifier down: the guest does not start, and the virsh user
    // reads which half is missing and where it is.
    verifier.stop();
    let e = virsh(&["start", &guest]).unwrap_err().0;
    assert!(
        e.contains("has a split key") && e.contains(&format!("the verifier at {}", verifier.url)),
        "{e}"
    );
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "shut off");
    verifier.restart();
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();

    // A rekey makes a new half; the old one is destroyed once the host
    // moved to the new generation.
    let o = s.ctl(&["volume", "rekey", "sp", "--shallow", "--wait"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(audited(&verifier, "half.created", &id), 2);
    s.wait_for(30, "the old half destroyed", || {
        audited(&verifier, "half.destroyed", &id) == 1
    });
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();

    // Neither half nor the passphrase stays in guestkeyd's memory once
    // the start is done (the scanner's own control: tests/tests/host.rs).
    let u = s.server_key(&id);
    let halves = verifier_halves(&verifier);
    assert_eq!(halves.len(), 1, "only the new generation's half is left");
    let v = &halves[0].2;
    let xor: Vec<u8> = u
        .expose_secret()
        .iter()
        .zip(v.expose_secret())
        .map(|(a, b)| a ^ b)
        .collect();
    let k = text(&xor);
    let pid = s.daemon.as_ref().unwrap().pid();
    for (what, secret) in [
        ("U", u.expose_secret()),
        ("V", v.expose_secret()),
        ("the passphrase", k.expose_secret()),
    ] {
        let hits = guestkey_tests::memscan::Needles::of(secret).find_in(pid);
        assert!(hits.is_empty(), "{what} in guestkeyd's memory: {hits:?}");
    }
    drop((u, halves, k, xor));

    // Removing the volume destroys the verifier's halves too.
    s.json(&["guest", "undefine", &guest]);
    s.json(&["volume", "delete", "sp"]);
    s.wait_for(60, "the volume deleted", || {
        s.json(&["volume", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "sp")
    });
    s.wait_for(30, "every half destroyed", || {
        audited(&verifier, "half.destroyed", &id) == 2
    });
    assert_eq!(verifier_halves(&verifier).len(), 0);
    drop(cleanup);
}
