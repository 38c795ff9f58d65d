//! The management server end to end: the real `guestkey-server` and
//! `guestkeyctl` binaries on 127.0.0.1 with real mutual TLS. The host side
//! is `common::TestAgent`, an instrumented test implementation of the
//! host-agent API (see its header) that records every packet it receives.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn init_makes_a_private_data_directory_and_never_touches_an_existing_one() {
    let s = start_sqlite_server(None);
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "master.key",
        "ca/ca.key",
        "ca/server-ca.key",
        "ca/admin-ca.key",
        "tls/server.key",
        "admin/admin.key",
        "guestkey.db",
    ] {
        let mode = std::fs::metadata(s.dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let before = std::fs::read(s.dir.join("master.key")).unwrap();
    let out = Command::new(SERVER)
        .args(["init", "--data-dir"])
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists and is not empty"));
    assert_eq!(std::fs::read(s.dir.join("master.key")).unwrap(), before);
}

#[test]
fn the_admin_api_refuses_missing_foreign_and_expired_certificates_clearly() {
    let s = start_server(None);
    // Another server's admin credential: another CA.
    let other = start_server(None);
    let out = Command::new(CTL)
        .args(["host", "list"])
        .env("GUESTKEY_SERVER", &s.url)
        .env("GUESTKEY_ADMIN_DIR", other.admin_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach guestkey-server")
            && err.contains("did not sign: is this the server of this admin credential?"),
        "{err}"
    );
    assert!(!err.contains("connection closed\n"), "{err}");

    // No client certificate at all: the admin API says what to pass.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let ch = common::channel(s.url.clone(), &s.ca_pem(), "localhost", None)
            .await
            .unwrap();
        guestkey_proto::admin::admin_client::AdminClient::new(ch)
            .list_hosts(guestkey_proto::admin::ListHostsRequest {})
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("--admin-dir"), "{status:?}");

    // An expired certificate signed by the right CA (the admin CA): refused
    // in the handshake.
    let dir = temp_dir("expired");
    let ca = std::fs::read_to_string(s.dir.join("ca/admin-ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(s.dir.join("ca/admin-ca.key")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), s.ca_pem()).unwrap();
    std::fs::write(dir.join("server.sha256"), s.server_sha256()).unwrap();
    std::fs::write(dir.join("admin.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("admin.key"), key.serialize_pem()).unwrap();
    let out = Command::new(CTL)
        .args(["host", "list"])
        .env("GUESTKEY_SERVER", &s.url)
        .env("GUESTKEY_ADMIN_DIR", &dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("expired on") && err.contains("refuses it"),
        "{err}"
    );

    // The server itself refuses the expired certificate and a certificate of
    // another CA (bypassing guestkeyctl's own checks).
    let other_cert = std::fs::read_to_string(other.admin_dir().join("admin.pem")).unwrap();
    let other_key = std::fs::read_to_string(other.admin_dir().join("admin.key")).unwrap();
    for (cert_pem, key_pem) in [(cert.pem(), key.serialize_pem()), (other_cert, other_key)] {
        let result = rt.block_on(async {
            let ch = common::channel(
                s.url.clone(),
                &s.ca_pem(),
                "localhost",
                Some((&cert_pem, &key_pem)),
            )
            .await?;
            guestkey_proto::admin::admin_client::AdminClient::new(ch)
                .list_hosts(guestkey_proto::admin::ListHostsRequest {})
                .await
                .map_err(|s| Box::new(s) as Box<dyn std::error::Error>)?;
            Ok::<_, Box<dyn std::error::Error>>(())
        });
        assert!(
            result.is_err(),
            "the server accepted a bad client certificate"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn enrollment_tokens_work_once_and_bad_tokens_change_nothing() {
    let s = start_server(None);
    let token = add_host(&s, "kvm-01", 7444);
    let sealing = xdr_wipe::seal::HostSealingKey::generate();
    let pk = sealing.public_key().as_bytes().to_vec();

    // Wrong token, bad CSR, bad sealing key: refused, nothing changes.
    let before = s.state_snapshot();
    let e = enroll(&s, "gkt_wrong", csr().0, pk.clone()).unwrap_err();
    assert!(e.message().contains("token is not valid"), "{e:?}");
    let e = enroll(&s, &token, b"junk".to_vec(), pk.clone()).unwrap_err();
    assert!(e.message().contains("signing request"), "{e:?}");
    let e = enroll(&s, &token, csr().0, vec![1, 2, 3]).unwrap_err();
    assert!(e.message().contains("sealing"), "{e:?}");
    assert_eq!(s.state_snapshot(), before);

    // The right token works once.
    let (name, cert) = enroll(&s, &token, csr().0, pk.clone()).unwrap();
    assert_eq!(name, "kvm-01");
    assert!(cert.contains("BEGIN CERTIFICATE"));
    let after = s.state_snapshot();
    let e = enroll(&s, &token, csr().0, pk.clone()).unwrap_err();
    assert!(e.message().contains("token is not valid"), "{e:?}");
    assert_eq!(s.state_snapshot(), after);
    assert_eq!(s.json(&["host", "show", "kvm-01"])["state"], "enrolled");

    // An expired token is refused by name (expiry moved into the past).
    let token2 = add_host(&s, "kvm-02", 7445);
    s.alter("UPDATE hosts SET token_expires = 1 WHERE name = 'kvm-02'");
    let before = s.state_snapshot();
    let e = enroll(&s, &token2, csr().0, pk).unwrap_err();
    assert!(e.message().contains("expired"), "{e:?}");
    assert_eq!(s.state_snapshot(), before);

    // Each refusal is in the audit log, and the chain verifies.
    let audit = s.json(&["audit"]);
    let refusals = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "refused")
        .count();
    assert!(refusals >= 5, "{audit}");
    assert!(s.ok(&["audit", "--verify"]).contains("hash chain verified"));
}

#[test]
fn a_volume_key_goes_sealed_to_its_host_only_and_never_into_logs() {
    let s = start_sqlite_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-a");
    let mut b = TestAgent::enroll(&s, "kvm-b");
    a.serve();
    b.serve();
    // --no-wait: the request as the server queued it.
    let v = s.json(&[
        "volume",
        "create",
        "--host",
        "kvm-a",
        "--pool",
        "default",
        "--name",
        "vm1-disk",
        "--size",
        "1G",
        "--no-wait",
    ]);
    assert_eq!(v["state"], "pending-create");
    assert_eq!(v["capacity_bytes"], 1u64 << 30);
    s.wait_for(20, "volume ready", || {
        s.json(&["volume", "show", "vm1-disk"])["state"] == "ready"
    });

    let creates = a.creates();
    assert_eq!(creates.len(), 1);
    let common::Received::Create {
        volume_id,
        name,
        pool,
        generation,
        passphrase,
    } = &creates[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (name.as_str(), pool.as_str(), *generation),
        ("vm1-disk", "default", 1)
    );
    assert_eq!(volume_id, v["id"].as_str().unwrap());
    assert_eq!(passphrase.len(), 43, "256-bit base64url passphrase");
    assert!(
        b.received.lock().unwrap().is_empty(),
        "host B received a key of host A"
    );

    // The key is in no log, no CLI output, and not in clear in the database.
    let log = s.log();
    assert!(!log.contains(passphrase.as_str()));
    let all_output = s.ok(&["volume", "list"])
        + &s.ok(&["audit"])
        + &s.ok(&["--json", "volume", "show", "vm1-disk"]);
    assert!(!all_output.contains(passphrase.as_str()));
    let db = std::fs::read(s.dir.join("guestkey.db")).unwrap();
    assert!(!db.windows(43).any(|w| w == passphrase.as_bytes()));

    let actions: Vec<String> = s
        .json(&["audit"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    for a in ["key.created", "key.released", "key.pushed"] {
        assert!(actions.iter().any(|x| x == a), "{a} missing in {actions:?}");
    }

    // Crypto-shredding: the host is told to delete, and the server's key rows go.
    s.ok(&["volume", "delete", "vm1-disk"]);
    s.wait_for(20, "volume deleted", || {
        s.json(&["volume", "show", volume_id])["state"] == "deleted"
    });
    assert!(
        a.received
            .lock()
            .unwrap()
            .iter()
            .any(|r| matches!(r, common::Received::Delete { volume_id: id } if id == volume_id))
    );
    let keys = s.scalar(&format!(
        "SELECT COUNT(*) FROM volume_keys WHERE volume_id = '{volume_id}'"
    ));
    assert_eq!(keys, "0");
    // The name is free again.
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "vm1-disk", "--size",
        "1G",
    ]);
}

#[test]
fn an_unreachable_host_leaves_the_operation_pending_and_it_is_retried() {
    let s = start_server(Some(
        "[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 400\n",
    ));
    let mut a = TestAgent::enroll(&s, "kvm-late");
    // The host does not serve yet: --no-wait returns with the request queued.
    s.ok(&[
        "volume",
        "create",
        "--host",
        "kvm-late",
        "--pool",
        "p",
        "--name",
        "late",
        "--size",
        "64M",
        "--no-wait",
    ]);
    s.wait_for(20, "failed attempts", || {
        s.json(&["volume", "show", "late"])["attempts"]
            .as_u64()
            .unwrap()
            >= 2
    });
    let v = s.json(&["volume", "show", "late"]);
    assert_eq!(v["state"], "pending-create");
    assert!(
        v["last_error"].as_str().unwrap().contains("unreachable"),
        "{v}"
    );
    a.serve();
    s.wait_for(20, "volume ready after the host came up", || {
        s.json(&["volume", "show", "late"])["state"] == "ready"
    });
    assert_eq!(a.creates().len(), 1);
}

#[test]
fn the_key_release_rate_limit_holds_back_packets() {
    let s = start_server(Some(
        "[limits]\nkey_releases_per_minute = 2\n[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 200\n",
    ));
    let mut a = TestAgent::enroll(&s, "kvm-rate");
    a.serve();
    for n in ["r1", "r2", "r3"] {
        // The third waits for the next minute's release slot: --no-wait.
        s.ok(&[
            "volume",
            "create",
            "--host",
            "kvm-rate",
            "--pool",
            "p",
            "--name",
            n,
            "--size",
            "1M",
            "--no-wait",
        ]);
    }
    s.wait_for(20, "two volumes ready", || {
        s.json(&["volume", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "ready")
            .count()
            == 2
    });
    let held = s
        .json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] != "ready")
        .cloned()
        .unwrap();
    s.wait_for(10, "rate-limit error", || {
        s.json(&["volume", "show", held["name"].as_str().unwrap()])["last_error"]
            .as_str()
            .unwrap()
            .contains("rate limit")
    });
    assert_eq!(a.creates().len(), 2);
}

#[test]
fn bad_admin_input_is_refused_clearly_and_changes_nothing() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-01");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-01", "--pool", "default", "--name", "taken", "--size",
        "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "taken"])["state"] == "ready"
    });
    let before = s.state_snapshot();
    let vol = |name: &str, size: &str, host: &str, pool: &str| -> String {
        s.fails(&[
            "volume", "create", "--host", host, "--pool", pool, "--name", name, "--size", size,
        ])
    };
    let cases: Vec<(String, &str)> = vec![
        (
            vol("a/b", "1M", "kvm-01", "default"),
            "invalid volume name \"a/b\"",
        ),
        (
            vol("..", "1M", "kvm-01", "default"),
            "invalid volume name \"..\"",
        ),
        (
            vol("", "1M", "kvm-01", "default"),
            "invalid volume name \"\": it is empty",
        ),
        (vol("x", "-1", "kvm-01", "default"), "invalid size \"-1\""),
        (vol("x", "1Z", "kvm-01", "default"), "invalid size \"1Z\""),
        (
            vol("x", "99999999999T", "kvm-01", "default"),
            "larger than the 1P maximum",
        ),
        (
            vol("taken", "1M", "kvm-01", "default"),
            "a volume named taken already exists",
        ),
        (
            vol("x", "1M", "kvm-99", "default"),
            "no host named \"kvm-99\"",
        ),
        (vol("x", "1M", "kvm-01", "../etc"), "invalid pool name"),
        (
            s.fails(&[
                "volume", "create", "--host", "kvm-01", "--pool", "p", "--name", "x", "--size",
                "1M", "--format", "vmdk",
            ]),
            "invalid format \"vmdk\": use qcow2 or raw",
        ),
        (
            s.fails(&["host", "add", "kvm-01", "--address", "127.0.0.1:1"]),
            "host kvm-01 already exists",
        ),
        (
            s.fails(&["host", "add", "bad/name", "--address", "127.0.0.1:1"]),
            "invalid host name",
        ),
        (
            s.fails(&["host", "add", "h", "--address", "nowhere"]),
            "invalid address \"nowhere\": use HOST:PORT",
        ),
        (s.fails(&["host", "show", "nope"]), "no host named \"nope\""),
        (
            s.fails(&["volume", "show", "nope"]),
            "no volume named or with id \"nope\"",
        ),
        (
            s.fails(&["volume", "delete", "nope"]),
            "no volume named or with id \"nope\"",
        ),
    ];
    for (stderr, expected) in cases {
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr:?}"
        );
        assert!(stderr.starts_with("guestkeyctl: "), "{stderr}");
    }
    assert_eq!(s.state_snapshot(), before);
}

#[test]
fn a_revoked_host_loses_the_host_api_and_gets_no_keys() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-r");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-r", "--pool", "p", "--name", "rv", "--size", "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "rv"])["state"] == "ready"
    });
    let xml = s.dir.join("../revoked-guest.xml");
    std::fs::write(
        &xml,
        "<domain type='kvm'><name>rg</name><memory unit='MiB'>64</memory><devices>\
         <disk type='volume' device='disk'><source pool='p' volume='rv'/><target dev='vda'/></disk>\
         </devices></domain>",
    )
    .unwrap();
    s.ok(&[
        "guest",
        "define",
        "--host",
        "kvm-r",
        "--xml",
        xml.to_str().unwrap(),
    ]);
    s.wait_for(20, "defined", || {
        s.json(&["guest", "show", "rg"])["pending"] == ""
    });
    s.ok(&["host", "revoke", "kvm-r"]);
    assert_eq!(s.json(&["host", "show", "kvm-r"])["state"], "revoked");
    let before = s.state_snapshot();
    let e = s.fails(&[
        "volume", "create", "--host", "kvm-r", "--pool", "p", "--name", "v", "--size", "1M",
    ]);
    assert!(e.contains("host kvm-r is revoked: no keys go to it"), "{e}");
    // Nothing is queued for it either (it would wait for good).
    for action in ["start", "stop", "undefine"] {
        let e = s.fails(&["guest", action, "rg"]);
        assert!(e.contains("host kvm-r is revoked"), "{action}: {e}");
    }
    for args in [
        &["volume", "rekey", "rv", "--deep"][..],
        &["volume", "decrypt", "rv", "--yes-i-know"],
    ] {
        let e = s.fails(args);
        assert!(e.contains("host kvm-r is revoked"), "{args:?}: {e}");
    }
    assert_eq!(s.state_snapshot(), before);

    // Its certificate no longer works on the host API.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let ch = common::channel(
            s.url.clone(),
            &s.ca_pem(),
            "localhost",
            Some((&a.cert_pem, &a.key_pem)),
        )
        .await
        .unwrap();
        guestkey_proto::host::host_api_client::HostApiClient::new(ch)
            .report_inventory(guestkey_proto::host::Inventory { held: vec![] })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("revoked"), "{status:?}");
}

#[test]
fn a_tampered_audit_log_is_detected() {
    let mut s = start_sqlite_server(None);
    s.ok(&["host", "add", "h1", "--address", "127.0.0.1:1"]);
    s.ok(&["host", "add", "h2", "--address", "127.0.0.1:2"]);
    assert!(s.ok(&["audit", "--verify"]).contains("3 records"));
    s.stop();
    {
        let db = rusqlite::Connection::open(s.dir.join("guestkey.db")).unwrap();
        db.execute_batch("DROP TRIGGER audit_no_update; UPDATE audit SET detail = 'address 10.0.0.1:1' WHERE seq = 2;").unwrap();
    }
    s.restart();
    let e = s.fails(&["audit", "--verify"]);
    assert!(e.contains("does not verify"), "{e}");
    let out = s.ctl(&["audit", "--verify"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("AUDIT LOG DAMAGED at record 2"),
        "{out:?}"
    );
}

#[test]
fn the_server_refuses_a_wrong_master_key() {
    let mut s = start_server(None);
    s.stop();
    let out = Command::new(SERVER)
        .args(["run", "--data-dir"])
        .arg(&s.dir)
        .args(["--master-key-source", "env:GK_TEST_MK"])
        .env("GK_TEST_MK", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not this data directory's master key"),
        "{err}"
    );
    s.restart();
}

#[test]
fn the_master_key_rotates_while_the_server_runs() {
    let mut s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-rot");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-rot", "--pool", "p", "--name", "before", "--size", "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "before"])["state"] == "ready"
    });
    let old_file = std::fs::read_to_string(s.dir.join("master.key")).unwrap();
    let wrapped_before = s.scalar("SELECT wrapped FROM volume_keys");

    let out = Command::new(SERVER)
        .args(["rotate-master-key", "--data-dir"])
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 volume keys re-wrapped"));
    assert_ne!(
        std::fs::read_to_string(s.dir.join("master.key")).unwrap(),
        old_file
    );
    assert!(!s.dir.join("master.key.next").exists());
    let wrapped_after = s.scalar("SELECT wrapped FROM volume_keys");
    assert_ne!(wrapped_before, wrapped_after);

    // The running server picks the new key up by itself.
    s.ok(&[
        "volume", "create", "--host", "kvm-rot", "--pool", "p", "--name", "after", "--size", "1M",
    ]);
    s.wait_for(20, "ready after rotation", || {
        s.json(&["volume", "show", "after"])["state"] == "ready"
    });
    s.wait_for(10, "the reload log line", || {
        s.log().contains("master key reloaded")
    });

    // A restart works with the rotated key, and the old key no longer opens
    // this data directory.
    s.restart();
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
    s.stop();
    let out = Command::new(SERVER)
        .args(["run", "--data-dir"])
        .arg(&s.dir)
        .args(["--master-key-source", "env:GK_OLD"])
        .env("GK_OLD", old_file.trim())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not this data directory's master key")
    );
    s.restart();
}

#[test]
fn an_interrupted_rotation_is_finished_at_start() {
    let mut s = start_server(None);
    s.stop();
    // Simulate a crash after the database committed, before the rename:
    // rotate to a new file, then put the old key back as master.key and the
    // new one as master.key.next.
    let old = std::fs::read_to_string(s.dir.join("master.key")).unwrap();
    let new_file = s.dir.join("new.key");
    let out = Command::new(SERVER)
        .args(["rotate-master-key", "--data-dir"])
        .arg(&s.dir)
        .arg("--new-master-key-source")
        .arg(format!("file:{}", new_file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(s.dir.join("master.key")).unwrap(),
        old
    );
    std::fs::rename(&new_file, s.dir.join("master.key.next")).unwrap();
    s.restart();
    s.wait_for(10, "the log line of the finished rotation", || {
        s.log()
            .contains("finished an interrupted master key rotation")
    });
    assert!(!s.dir.join("master.key.next").exists());
    assert_ne!(
        std::fs::read_to_string(s.dir.join("master.key")).unwrap(),
        old
    );
}
