//! Roles of certificates with the real guestkeyd (issue 15, item 2): a
//! real host's key pair, serving as the server with the server's names, is
//! refused by an enrolling guestkeyd and by guestkeyctl, also after the
//! host was revoked, and an enrolling guestkeyd pins only the certificate
//! it verified; a host enrolled before roles keeps its volumes through
//! `guestkey-server migrate-roles` and `guestkeyd trust-server`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use guestkey_tests::impostor::Impostor;
use guestkey_tests::stack::{Stack, bin};

fn sha256_of_pem(pem: &str) -> String {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    mgmt_server::ca::cert_sha256(&der.contents)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `guestkeyd enroll` against `url` with `token` on standard input.
fn enroll(url: &str, token: &str, ca_file: &Path, state: &Path) -> Output {
    let mut child = Command::new(bin("guestkeyd"))
        .args(["enroll", "--server", url, "--token-file", "-", "--ca-file"])
        .arg(ca_file)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), token.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_real_hosts_key_pair_cannot_pass_as_the_server_even_once_revoked() {
    let s = Stack::start();
    let server_ca = s.dir.join("ca.pem"); // what the stack's guestkeyd enrolled with
    assert_eq!(
        std::fs::read_to_string(&server_ca).unwrap(),
        std::fs::read_to_string(s.dir.join("server/ca/server-ca.pem")).unwrap()
    );
    let host_cert = std::fs::read_to_string(s.state_dir().join("tls.pem")).unwrap();
    let host_key = std::fs::read_to_string(s.state_dir().join("tls.key")).unwrap();
    let real_sha =
        sha256_of_pem(&std::fs::read_to_string(s.dir.join("server/tls/server.pem")).unwrap());
    let token =
        s.json(&["host", "add", "roles-new", "--address", "127.0.0.1:1"])["enrollment_token"]
            .as_str()
            .unwrap()
            .to_owned();
    // The impostor answers as an attacker would like: its own certificate
    // to pin, and its CA.
    let answer = |cert: &str| guestkey_proto::host::EnrollResponse {
        host_name: "roles-new".into(),
        certificate_pem: host_cert.clone(),
        ca_certificate_pem: host_cert.clone(),
        server_certificate_sha256: sha256_of_pem(cert),
        ..Default::default()
    };
    let state = s.dir.join("roles-new");
    let check = |when: &str| {
        // The host's certificate carries 127.0.0.1, the name checked here.
        let imp = Impostor::start(&host_cert, &host_key, answer(&host_cert));
        let o = enroll(&imp.url(), &token, &server_ca, &state);
        assert!(
            !o.status.success(),
            "{when}: guestkeyd enrolled with an impostor"
        );
        assert!(
            stderr(&o).contains(&format!(
                "guestkeyd: the server at {} presented a certificate that the CA in --ca-file {} did not sign: --ca-file must be the server CA",
                imp.url(),
                server_ca.display()
            )),
            "{when}: {}",
            stderr(&o)
        );
        assert!(!state.join("tls.pem").exists() && !state.join("server.sha256").exists());
        let o = s
            .ctl_command(&["host", "list"])
            .env("GUESTKEY_SERVER", imp.url())
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "{when}: guestkeyctl trusted an impostor"
        );
        assert!(
            stderr(&o).contains("did not sign: is this the server of this admin credential?"),
            "{when}: {}",
            stderr(&o)
        );
        assert_eq!(imp.calls(), 0, "{when}: a call reached the impostor");
    };
    check("while the host is enrolled");
    s.json(&["host", "revoke", &s.host]);
    check("once the host is revoked");

    // A certificate the server CA did sign (what its key in other hands
    // would give) is accepted at enrollment, where nothing is pinned yet;
    // but its answer must name the certificate it presented, or nothing is
    // pinned or written.
    let ca = mgmt_server::ca::Ca::load(
        mgmt_server::ca::Role::Server,
        &std::fs::read_to_string(s.dir.join("server/ca/server-ca.pem")).unwrap(),
        &guestkey_protect::ProtectorSpec::File(s.dir.join("server/ca/server-ca.key")),
    )
    .unwrap();
    let forged = ca
        .issue("guestkey-server", vec!["127.0.0.1".into()], 1)
        .unwrap();
    let mut lying = answer(&forged.cert);
    lying.server_certificate_sha256 = real_sha.clone();
    let imp = Impostor::start(&forged.cert, forged.key.as_ref().unwrap(), lying);
    let o = enroll(&imp.url(), &token, &server_ca, &state);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "the server's answer names certificate sha256 {real_sha}, but it presented {}: nothing was pinned or written",
            forged.sha256
        )),
        "{}",
        stderr(&o)
    );
    assert!(!state.join("tls.pem").exists());
    drop(imp);

    // The real server, same token (the impostors never saw a valid one
    // used): enrolled, pinning the real certificate.
    let o = enroll(s.server_url(), &token, &server_ca, &state);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(state.join("server.sha256"))
            .unwrap()
            .trim(),
        real_sha
    );
}

#[test]
fn a_host_enrolled_before_roles_keeps_its_volumes_through_migrate_roles_and_trust_server() {
    let mut s = Stack::start();
    let v1 = s.volume("rl-v1", "16M");
    let v1_id = v1["id"].as_str().unwrap().to_owned();
    let key_before = s.server_key(&v1_id);
    s.daemon.take().unwrap().stop();
    s.server.stop();

    // Both ends as the code before roles left them (see guestkey_tests::legacy).
    let data = s.dir.join("server");
    let legacy_sha = guestkey_tests::legacy::make_legacy(&data);
    std::fs::copy(data.join("ca/ca.pem"), s.state_dir().join("ca.pem")).unwrap();
    std::fs::write(s.state_dir().join("server.sha256"), &legacy_sha).unwrap();

    let o = Command::new(bin("guestkey-server"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("guestkey-server migrate-roles --data-dir"),
        "{}",
        stderr(&o)
    );
    let o = Command::new(bin("guestkey-server"))
        .args(["migrate-roles", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    s.run_server();
    s.run_daemon();
    // The host still trusts the old CA and pin: the server's pushes wait,
    // and say what to run.
    s.json(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "rl-v2",
        "--size",
        "16M",
        "--no-wait",
    ]);
    s.wait_for(60, "the host refusing the migrated server", || {
        s.json(&["volume", "show", "rl-v2"])["last_error"]
            .as_str()
            .is_some_and(|e| {
                e.contains("does not accept this server") && e.contains("guestkeyd trust-server")
            })
    });
    assert_eq!(
        s.json(&["volume", "show", "rl-v2"])["state"],
        "pending-create"
    );
    // guestkeyd's log says whom it turned away, and what to run.
    let log = s.daemon.as_ref().unwrap().log_text();
    assert!(
        log.contains("refused a TLS client")
            && log.contains("run `guestkeyd trust-server --ca-file SERVER-CA.pem` here"),
        "{log}"
    );

    // trust-server: not beside the running guestkeyd; then with the server
    // CA from `guestkeyctl ca-cert`.
    let ca_file = s.dir.join("server-ca-for-hosts.pem");
    let o = s.ctl(&["ca-cert"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(&ca_file, &o.stdout).unwrap();
    let state_dir = s.state_dir();
    let trust = || {
        Command::new(bin("guestkeyd"))
            .args(["trust-server", "--ca-file"])
            .arg(&ca_file)
            .arg("--state-dir")
            .arg(&state_dir)
            .output()
            .unwrap()
    };
    let pid = s.daemon.as_ref().unwrap().pid();
    let o = trust();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "another guestkeyd (pid {pid}) already serves state directory"
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(s.state_dir().join("server.sha256")).unwrap(),
        legacy_sha
    );
    s.daemon.take().unwrap().stop();
    let o = trust();
    assert!(o.status.success(), "{}", stderr(&o));
    let new_sha = sha256_of_pem(&std::fs::read_to_string(data.join("tls/server.pem")).unwrap());
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains(&format!("certificate sha256 {new_sha} (was {legacy_sha})")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(s.state_dir().join("server.sha256")).unwrap(),
        new_sha
    );
    assert_eq!(
        std::fs::read(s.state_dir().join("ca.pem")).unwrap(),
        std::fs::read(data.join("ca/server-ca.pem")).unwrap()
    );

    // Now the waiting push goes through, and the volume made before the
    // migration still opens with the key the server kept: a shallow rekey
    // needs the old key on the host.
    s.run_daemon();
    s.wait_for(120, "rl-v2 ready", || {
        s.json(&["volume", "show", "rl-v2"])["state"] == "ready"
    });
    assert_eq!(
        s.server_key(&v1_id).expose_secret(),
        key_before.expose_secret()
    );
    let o = s.ctl(&["volume", "rekey", "rl-v1", "--shallow", "--wait"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(s.json(&["volume", "show", "rl-v1"])["state"], "ready");
}
