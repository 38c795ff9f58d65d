//! Certificates have roles (issue 15, item 2): each role has its own CA,
//! every client trusts one role's CA and pins the certificate it expects,
//! a host cannot take the server's names, revocation holds wherever a
//! certificate is accepted; one server per data directory (item 7); and a
//! data directory made before roles keeps its keys through
//! `guestkey-server migrate-roles`. Real binaries, real mutual TLS on
//! 127.0.0.1; hosts are `common::TestAgent`s, and impostors are TestAgents
//! serving a key pair that is not theirs.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;

use common::*;
use guestkey_protect::ProtectorSpec;
use mgmt_server::ca::{Ca, Role};
use xdr_wipe::seal::HostSealingKey;

/// A process on 127.0.0.1 serving TLS with `cert` and `key` (someone
/// else's key pair), answering any client.
fn impostor(cert: &str, key: &str) -> TestAgent {
    let mut i = TestAgent::from_parts(
        "impostor",
        cert.to_owned(),
        key.to_owned(),
        String::new(),
        HostSealingKey::generate(),
        free_port(),
    );
    i.client_auth = false;
    i.serve();
    i
}

/// guestkeyctl with this server's admin credential, told the server is at
/// `url`.
fn ctl_at(s: &TestServer, url: &str, args: &[&str]) -> Output {
    Command::new(CTL)
        .args(args)
        .env("GUESTKEY_SERVER", url)
        .env("GUESTKEY_ADMIN_DIR", s.admin_dir())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_host_or_admin_key_pair_cannot_pass_as_the_server_to_guestkeyctl_even_once_revoked() {
    let s = start_server(None);
    let a = TestAgent::enroll(&s, "kvm-i");
    let admin = s.admin_dir();
    let admin_cert = std::fs::read_to_string(admin.join("admin.pem")).unwrap();
    let admin_key = std::fs::read_to_string(admin.join("admin.key")).unwrap();
    let ca = format!("the server CA in {}/ca.pem", admin.display());
    // The host's certificate carries 127.0.0.1, the name guestkeyctl checks
    // here: only its CA tells it from the server's. The admin certificate
    // is for client authentication only.
    let not_signed = format!(
        "the server presented a certificate that {ca} did not sign: is this the server of this admin credential?"
    );
    let client_only = format!(
        "the server presented a certificate that {ca} does not accept (certificate does not allow extended key usage for server authentication, allows client authentication): is this the server of this admin credential?"
    );
    let check = |when: &str| {
        for (whose, cert, key, refused) in [
            ("host", &a.cert_pem, &a.key_pem, &not_signed),
            ("admin", &admin_cert, &admin_key, &client_only),
        ] {
            let imp = impostor(cert, key);
            let url = format!("https://127.0.0.1:{}", imp.port);
            let o = ctl_at(&s, &url, &["host", "list"]);
            assert!(
                !o.status.success(),
                "{whose} {when}: guestkeyctl trusted it"
            );
            assert!(
                stderr(&o).starts_with(&format!(
                    "guestkeyctl: cannot reach guestkey-server at {url}: {refused}"
                )),
                "{whose} {when}: {}",
                stderr(&o)
            );
            assert_eq!(imp.calls.load(Ordering::SeqCst), 0);
        }
    };
    check("while enrolled");
    s.ok(&["host", "revoke", "kvm-i"]);
    check("once revoked");
    // The real server is still the one the credential reaches.
    assert!(s.ok(&["host", "list"]).contains("kvm-i"));
}

#[test]
fn another_certificate_of_the_server_ca_is_refused_by_the_pin() {
    let s = start_server(None);
    // What a copy of an older server certificate, or the server CA's key
    // in other hands, would give: signed by the right CA, for the right
    // names, but not the certificate of this credential.
    let ca = Ca::load(
        Role::Server,
        &s.ca_pem(),
        &ProtectorSpec::File(s.dir.join("ca/server-ca.key")),
    )
    .unwrap();
    let other = ca
        .issue(
            "guestkey-server",
            vec!["localhost".into(), "127.0.0.1".into()],
            1,
        )
        .unwrap();
    let imp = impostor(&other.cert, other.key.as_ref().unwrap());
    let url = format!("https://127.0.0.1:{}", imp.port);
    let o = ctl_at(&s, &url, &["ca-cert"]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "guestkeyctl: cannot reach guestkey-server at {url}: the server presented a certificate that is not the pinned one (sha256 {}, expected {}): is this the server of this admin credential? (--server or GUESTKEY_SERVER must name the server whose DATA_DIR/admin this is)",
            other.sha256,
            s.server_sha256()
        )
    );
    assert_eq!(imp.calls.load(Ordering::SeqCst), 0);
    // `ca-cert` prints what guestkeyd's --ca-file needs: the server CA.
    assert_eq!(s.ok(&["ca-cert"]).trim(), s.ca_pem().trim());
}

/// All hosts of these tests share 127.0.0.1, so the name the server checks
/// cannot tell them apart: the pin of each host's enrolled certificate
/// does. Nothing reaches an impostor, and no key is released for it.
#[test]
fn the_server_pushes_only_to_the_certificate_a_host_enrolled_with() {
    let s = start_server(None);
    let a = TestAgent::enroll(&s, "kvm-a");
    let d = TestAgent::enroll(&s, "kvm-d");
    let b = TestAgent::enroll(&s, "kvm-b");
    let mut c = TestAgent::enroll(&s, "kvm-c");
    c.serve();
    s.ok(&["host", "revoke", "kvm-b"]);
    // At kvm-a's address, kvm-c's key pair (an enrolled host); at kvm-d's,
    // kvm-b's (a revoked host).
    let mut impostors = vec![];
    for (target, key_pair) in [(&a, &c), (&d, &b)] {
        let mut i = TestAgent::from_parts(
            &key_pair.name,
            key_pair.cert_pem.clone(),
            key_pair.key_pem.clone(),
            key_pair.ca_pem.clone(),
            HostSealingKey::generate(),
            target.port,
        );
        i.server_sha256 = key_pair.server_sha256.clone();
        i.serve();
        impostors.push(i);
    }
    for (host, vol) in [("kvm-a", "va"), ("kvm-d", "vd"), ("kvm-c", "vc")] {
        s.ok(&[
            "volume",
            "create",
            "--host",
            host,
            "--pool",
            "p",
            "--name",
            vol,
            "--size",
            "1M",
            "--no-wait",
        ]);
    }
    s.wait_for(30, "vc ready", || {
        s.json(&["volume", "show", "vc"])["state"] == "ready"
    });
    for (host, vol, port) in [("kvm-a", "va", a.port), ("kvm-d", "vd", d.port)] {
        s.wait_for(30, "a refused attempt", || {
            s.json(&["volume", "show", vol])["attempts"].as_u64() >= Some(2)
        });
        let v = s.json(&["volume", "show", vol]);
        assert_eq!(v["state"], "pending-create");
        let e = v["last_error"].as_str().unwrap();
        assert!(
            e.starts_with(&format!(
                "host {host} refused: the process at 127.0.0.1:{port} (host {host}) presented a certificate that is not the pinned one"
            )) && e.contains(&format!("not the guestkeyd that enrolled as host {host}")),
            "{e}"
        );
    }
    for i in &impostors {
        assert_eq!(i.calls.load(Ordering::SeqCst), 0, "{} was called", i.name);
    }
    // One key went out: kvm-c's own.
    assert_eq!(s.audit_count("key.released"), 1);
    assert_eq!(c.creates().len(), 1);
}

#[test]
fn admin_and_host_certificates_only_open_their_own_api() {
    let s = start_server(None);
    let a = TestAgent::enroll(&s, "kvm-h");
    let admin = s.admin_dir();
    let admin_cert = std::fs::read_to_string(admin.join("admin.pem")).unwrap();
    let admin_key = std::fs::read_to_string(admin.join("admin.key")).unwrap();
    block_on(async {
        let host = channel(
            s.url.clone(),
            &s.ca_pem(),
            "localhost",
            Some((&a.cert_pem, &a.key_pem)),
        )
        .await
        .unwrap();
        let st = guestkey_proto::admin::admin_client::AdminClient::new(host.clone())
            .list_hosts(guestkey_proto::admin::ListHostsRequest {})
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
        assert!(
            st.message()
                .contains("(host:kvm-h) may not call the admin API"),
            "{st:?}"
        );
        // The host may ask for the server's trust; the answer is the server
        // CA and the server certificate's hash.
        let t = guestkey_proto::host::host_api_client::HostApiClient::new(host)
            .get_server_trust(guestkey_proto::host::ServerTrustRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.ca_certificate_pem, s.ca_pem());
        assert_eq!(t.server_certificate_sha256, s.server_sha256());

        let adm = channel(
            s.url.clone(),
            &s.ca_pem(),
            "localhost",
            Some((&admin_cert, &admin_key)),
        )
        .await
        .unwrap();
        let mut h = guestkey_proto::host::host_api_client::HostApiClient::new(adm);
        let st = h
            .report_inventory(guestkey_proto::host::Inventory { held: vec![] })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
        assert!(st.message().contains("may not call the host API"), "{st:?}");
        let st = h
            .get_server_trust(guestkey_proto::host::ServerTrustRequest {})
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
    });
    // Revoked: not even the server's trust.
    s.ok(&["host", "revoke", "kvm-h"]);
    let st = block_on(async {
        let ch = channel(
            s.url.clone(),
            &s.ca_pem(),
            "localhost",
            Some((&a.cert_pem, &a.key_pem)),
        )
        .await
        .unwrap();
        guestkey_proto::host::host_api_client::HostApiClient::new(ch)
            .get_server_trust(guestkey_proto::host::ServerTrustRequest {})
            .await
            .unwrap_err()
    });
    assert_eq!(st.code(), tonic::Code::PermissionDenied);
    assert!(st.message().contains("revoked"), "{st:?}");
}

#[test]
fn host_add_refuses_the_servers_names_and_changes_nothing() {
    let s = start_server(None);
    let before = s.state_snapshot();
    let records = s.audit_count("host.added");
    for (args, want) in [
        (
            &["host", "add", "localhost", "--address", "127.0.0.1:7444"][..],
            "guestkeyctl: invalid host name \"localhost\": it is one of the management server's names (localhost): a host's certificate carries its name, and must not name the server; pick another name",
        ),
        (
            &["host", "add", "127.0.0.1", "--address", "127.0.0.1:7444"],
            "guestkeyctl: invalid host name \"127.0.0.1\": it is one of the management server's names (127.0.0.1)",
        ),
        (
            &[
                "host",
                "add",
                "Guestkey-Server",
                "--address",
                "127.0.0.1:7444",
            ],
            "(guestkey-server)",
        ),
        (
            &[
                "host",
                "add",
                "guestkey-admin",
                "--address",
                "127.0.0.1:7444",
            ],
            "(guestkey-admin)",
        ),
        (
            &["host", "add", "kvm-01", "--address", "LOCALHOST:7444"],
            "guestkeyctl: invalid address \"LOCALHOST:7444\": its host part LOCALHOST is one of the management server's names (localhost)",
        ),
    ] {
        let e = s.fails(args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert_eq!(s.state_snapshot(), before);
    assert_eq!(s.audit_count("host.added"), records);
    // Hosts on the server's IP address, as in every test here, are fine.
    s.ok(&["host", "add", "kvm-01", "--address", "127.0.0.1:7444"]);
}

#[test]
fn a_second_server_on_one_data_directory_is_refused_naming_the_first() {
    let s = start_server(None);
    let mut second = Command::new(SERVER)
        .args(["run", "--data-dir"])
        .arg(&s.dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A server that starts says so on its first line; a refused one
    // closes stdout without a word.
    let mut line = String::new();
    BufReader::new(second.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if !line.is_empty() {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second server started on the same data directory: {line}");
    }
    let out = second.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "guestkey-server: another guestkey-server (pid {}) already runs on data directory {} (lock {}/guestkey-server.lock): stop it first, or give this one another --data-dir",
            s.pid(),
            s.dir.display(),
            s.dir.display()
        )
    );
    // migrate-roles does not run beside it either.
    let o = Command::new(SERVER)
        .args(["migrate-roles", "--data-dir"])
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "another guestkey-server (pid {}) already runs",
            s.pid()
        )),
        "{}",
        stderr(&o)
    );
    // The first one serves on.
    s.ok(&["host", "list"]);
}

/// Every file of the certificates and the credential, as bytes.
fn cert_files(data: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    for sub in ["ca", "tls", "admin"] {
        let mut names: Vec<_> = std::fs::read_dir(data.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let p = data.join(sub).join(&n);
            out.push((format!("{sub}/{n}"), std::fs::read(p).unwrap()));
        }
    }
    out
}

fn server(args: &[&str], data: &Path) -> Output {
    Command::new(SERVER)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

/// A data directory made before roles (see `common::legacy`), with an
/// enrolled host and a volume whose key was made but not yet delivered:
/// `run` refuses it naming the command; `migrate-roles` (interrupted once,
/// then run again) keeps the key, the host and the audit log; the old
/// admin credential stops working, the new one works; the host, once it
/// trusts the new server CA and pins the new certificate (as `guestkeyd
/// trust-server` does), gets the very key made before the migration.
#[test]
fn a_data_directory_made_before_roles_keeps_its_keys_through_migrate_roles() {
    // Retries stay short: the waits below outlast the pushes the server
    // tried while the host did not answer (with the default backoff, the
    // next try could come after the wait ends). SQLite: the legacy layout
    // is made by rewriting its file.
    let mut s = start_sqlite_server(Some(
        "[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 500\n",
    ));
    let mut a = TestAgent::enroll(&s, "kvm-l");
    s.ok(&[
        "volume",
        "create",
        "--host",
        "kvm-l",
        "--pool",
        "p",
        "--name",
        "lv",
        "--size",
        "1M",
        "--no-wait",
    ]);
    let vid = s.json(&["volume", "show", "lv"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.stop();
    let legacy_server_sha = legacy::make_legacy(&s.dir);
    // The host as the old enrollment left it: the one CA, the old pin.
    a.ca_pem = s.hosts_ca_pem();
    a.server_sha256 = Some(legacy_server_sha.clone());
    let old_admin = temp_dir("old-admin");
    for f in ["ca.pem", "admin.pem", "admin.key", "server"] {
        std::fs::copy(s.admin_dir().join(f), old_admin.join(f)).unwrap();
    }
    let keys_before = s.state_snapshot();
    let files_before = cert_files(&s.dir);
    let audit_before = s.scalar("SELECT COUNT(*) FROM audit");

    // `run` refuses, naming the command, and changes nothing.
    let o = server(&["run", "--listen", "127.0.0.1:0"], &s.dir);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "run `guestkey-server migrate-roles --data-dir {}` once (it keeps every key)",
            s.dir.display()
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(cert_files(&s.dir), files_before);
    assert_eq!(s.state_snapshot(), keys_before);

    // A migration that stops after the database step (a directory where a
    // file goes makes the last renames fail) is finished by running it
    // again.
    std::fs::create_dir(s.dir.join("admin/server.sha256")).unwrap();
    let o = server(&["migrate-roles"], &s.dir);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(stderr(&o).contains("admin/server.sha256"), "{}", stderr(&o));
    let o = server(&["run", "--listen", "127.0.0.1:0"], &s.dir);
    assert!(
        stderr(&o).contains("migrate-roles"),
        "still refused: {}",
        stderr(&o)
    );
    std::fs::remove_dir(s.dir.join("admin/server.sha256")).unwrap();
    let o = server(&["migrate-roles"], &s.dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("every key is kept"), "{said}");
    assert!(said.contains("guestkeyd trust-server --ca-file"), "{said}");
    assert!(!s.dir.join(".roles-migration").exists());
    // Once is enough.
    let o = server(&["migrate-roles"], &s.dir);
    assert!(stderr(&o).contains("nothing to migrate"), "{}", stderr(&o));

    // Keys, hosts, volumes untouched; the hosts CA kept; one audit record
    // more (and no second one for the resumed run).
    let keys_after = s.state_snapshot();
    let strip_admins = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("admins:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip_admins(&keys_after), strip_admins(&keys_before));
    let files_after = cert_files(&s.dir);
    let file = |files: &[(String, Vec<u8>)], n: &str| {
        files.iter().find(|(f, _)| f == n).map(|(_, b)| b.clone())
    };
    assert_eq!(
        file(&files_after, "ca/ca.pem"),
        file(&files_before, "ca/ca.pem")
    );
    assert_eq!(
        file(&files_after, "ca/ca.key"),
        file(&files_before, "ca/ca.key")
    );
    assert_ne!(
        file(&files_after, "tls/server.pem"),
        file(&files_before, "tls/server.pem")
    );
    s.restart();
    let audit = s.json(&["audit", "--limit", "10000"]);
    let records = audit.as_array().unwrap();
    assert_eq!(
        records.len() as i64,
        audit_before.parse::<i64>().unwrap() + 1
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r["action"] == "server.roles-migrated")
            .count(),
        1
    );
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));

    // The old admin credential is refused (no pin); with the new pin it
    // still trusts the wrong CA; its certificate no longer authenticates.
    let o = Command::new(CTL)
        .args(["host", "list"])
        .env("GUESTKEY_SERVER", &s.url)
        .env("GUESTKEY_ADMIN_DIR", &old_admin)
        .output()
        .unwrap();
    assert!(stderr(&o).contains("server.sha256"), "{}", stderr(&o));
    assert!(stderr(&o).contains("migrate-roles"), "{}", stderr(&o));
    std::fs::copy(
        s.admin_dir().join("server.sha256"),
        old_admin.join("server.sha256"),
    )
    .unwrap();
    let o = Command::new(CTL)
        .args(["host", "list"])
        .env("GUESTKEY_SERVER", &s.url)
        .env("GUESTKEY_ADMIN_DIR", &old_admin)
        .output()
        .unwrap();
    assert!(stderr(&o).contains("did not sign"), "{}", stderr(&o));
    let old_cert = std::fs::read_to_string(old_admin.join("admin.pem")).unwrap();
    let old_key = std::fs::read_to_string(old_admin.join("admin.key")).unwrap();
    let st = block_on(async {
        let ch = channel(
            s.url.clone(),
            &s.ca_pem(),
            "localhost",
            Some((&old_cert, &old_key)),
        )
        .await
        .unwrap();
        guestkey_proto::admin::admin_client::AdminClient::new(ch)
            .list_hosts(guestkey_proto::admin::ListHostsRequest {})
            .await
            .unwrap_err()
    });
    assert_eq!(st.code(), tonic::Code::PermissionDenied);
    // The new one works and prints the server CA for the hosts.
    assert!(s.ok(&["host", "list"]).contains("kvm-l"));
    assert_eq!(s.ok(&["ca-cert"]).trim(), s.ca_pem().trim());

    // The host, still trusting the old CA and pin, refuses the server: the
    // key waits (no key released for it).
    a.serve();
    s.wait_for(30, "a push the host refuses", || {
        s.json(&["volume", "show", "lv"])["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not accept this server"))
    });
    let v = s.json(&["volume", "show", "lv"]);
    assert_eq!(v["state"], "pending-create");
    let e = v["last_error"].as_str().unwrap();
    assert!(
        e.starts_with("host kvm-l at 127.0.0.1:")
            && e.contains("does not accept this server (it refused this server's certificate")
            && e.contains("run `guestkeyd trust-server --ca-file SERVER-CA.pem` on it"),
        "{e}"
    );
    assert!(a.creates().is_empty());
    assert_eq!(s.audit_count("key.released"), 0);

    // It learns the new trust over a channel it checks with the server CA
    // (what `guestkeyd trust-server` does), and then gets the key made
    // before the migration.
    let t = block_on(async {
        let ch = channel(
            s.url.clone(),
            &s.ca_pem(),
            "localhost",
            Some((&a.cert_pem, &a.key_pem)),
        )
        .await
        .unwrap();
        guestkey_proto::host::host_api_client::HostApiClient::new(ch)
            .get_server_trust(guestkey_proto::host::ServerTrustRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(t.server_certificate_sha256, s.server_sha256());
    assert_ne!(t.server_certificate_sha256, legacy_server_sha);
    a.stop_serving();
    a.ca_pem = t.ca_certificate_pem;
    a.server_sha256 = Some(t.server_certificate_sha256);
    a.serve();
    s.wait_for(30, "lv ready", || {
        s.json(&["volume", "show", "lv"])["state"] == "ready"
    });
    let Received::Create { passphrase, .. } = a.creates().remove(0) else {
        unreachable!()
    };
    assert_eq!(passphrase, server_key(&s, &vid));
    let _ = std::fs::remove_dir_all(old_admin);
}

/// The volume key as the server keeps it, unwrapped with its master key.
fn server_key(s: &TestServer, volume_id: &str) -> String {
    let (generation, mk_id, wrapped): (i64, String, Vec<u8>) = s
        .db()
        .query_row(
            "SELECT generation, master_key_id, wrapped FROM volume_keys WHERE volume_id = ?1",
            [volume_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let source = mgmt_server::masterkey::MasterKeySource::File(s.dir.join("master.key"));
    let mk = mgmt_server::masterkey::MasterKey::load(&source).unwrap();
    let k = mk
        .unwrap_key(volume_id, generation as u64, &mk_id, &wrapped)
        .unwrap();
    String::from_utf8(k.expose_secret().to_vec()).unwrap()
}
