//! The server on PostgreSQL (Debian's PostgreSQL 15, a throw-away cluster
//! on 127.0.0.1 per test process: `guestkey_testkit::Postgres`), through
//! the real `guestkey-server` and `guestkeyctl` binaries. The host is the
//! protocol-level test agent of these API tests (real guestkeyd hosts are
//! in `tests/`).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{TestAgent, TestServer, bins, temp_dir};
use guestkey_testkit::Postgres;
use guestkey_testkit::cleanup::Made;

const FAST: &str = "[retry]\ninitial_delay_ms = 50\nmax_delay_ms = 200\nmax_attempts = 50\n\
                    [leader]\nlease_ms = 1500\nrenew_ms = 300\n";

fn server_on(url: &str) -> (TestServer, Made) {
    let scratch = temp_dir("pg-server");
    let gone = Made::dir(&scratch);
    let s = TestServer::start_in_with(
        scratch.join("data"),
        bins(),
        Some(FAST),
        &["--database", url],
    );
    (s, gone)
}

/// `guestkey-server init --database URL`, which must fail and leave no
/// data directory; what it said.
fn refused_init(url: &str) -> String {
    let scratch = temp_dir("pg-init");
    let _made = Made::dir(&scratch);
    let out = std::process::Command::new(&bins().server)
        .args(["init", "--data-dir"])
        .arg(scratch.join("data"))
        .args(["--database", url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{url}");
    assert!(!scratch.join("data").exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_server_on_postgres_keeps_its_state_there_across_restarts_and_its_audit_verifies() {
    let pg = Postgres::shared();
    let db = pg.database();
    let (mut s, _gone) = server_on(&db.url);
    // The data directory records the database (0600) and has no SQLite file.
    let file = s.dir.join("database");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), db.url);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!s.dir.join("guestkey.db").exists());

    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "root", "--size",
        "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "root"])["state"] == "ready"
    });
    // The rows are in PostgreSQL; the key only as ciphertext.
    assert_eq!(
        pg.psql(&db.name, "SELECT count(*) FROM volumes WHERE name = 'root'"),
        Ok("1".into())
    );
    assert_eq!(
        pg.psql(&db.name, "SELECT count(*) FROM volume_keys"),
        Ok("1".into())
    );
    // The audit log refuses changes on this engine too.
    let e = pg
        .psql(&db.name, "DELETE FROM audit WHERE seq = 1")
        .unwrap_err();
    assert!(e.contains("append-only"), "{e}");

    s.restart();
    assert_eq!(s.json(&["volume", "show", "root"])["state"], "ready");
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "data", "--size",
        "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "data"])["state"] == "ready"
    });
    let id = s.json(&["volume", "show", "root"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.ok(&["volume", "delete", "root"]);
    s.wait_for(20, "deleted", || {
        s.json(&["volume", "show", &id])["state"] == "deleted"
    });
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
}

#[test]
fn init_refuses_a_database_that_holds_an_installation_and_a_url_that_is_not_one() {
    let pg = Postgres::shared();
    let db = pg.database();
    let (_s, _gone) = server_on(&db.url);
    let before = pg
        .psql(
            &db.name,
            "SELECT count(*) FROM audit WHERE action <> 'replica.leads'",
        )
        .unwrap();

    let scratch = temp_dir("pg-init");
    let _made = Made::dir(&scratch);
    let init = |dir: &std::path::Path, url: &str| {
        std::process::Command::new(&bins().server)
            .args(["init", "--data-dir"])
            .arg(dir)
            .args(["--database", url])
            .output()
            .unwrap()
    };
    let second = scratch.join("second");
    let out = init(&second, &db.url);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("already holds a guestkey installation")
            && e.contains("init needs an empty database"),
        "{e}"
    );
    assert!(!second.exists(), "no data directory is left");
    assert_eq!(
        pg.psql(
            &db.name,
            "SELECT count(*) FROM audit WHERE action <> 'replica.leads'"
        )
        .unwrap(),
        before
    );

    for (url, says) in [
        (
            "mysql://gk@127.0.0.1/gk",
            "give postgres://USER@HOST:PORT/DATABASE",
        ),
        (
            "postgres://gk:s3cret@127.0.0.1:notaport/gk",
            "postgres://USER@HOST:PORT/DATABASE",
        ),
        (
            "postgres://gk:s3cret@127.0.0.1:1/gk",
            "cannot reach the database at postgres://gk:***@127.0.0.1:1/gk",
        ),
    ] {
        let out = init(&second, url);
        assert!(!out.status.success(), "{url}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(says) && !e.contains("s3cret"), "{url}: {e}");
        assert!(!second.exists(), "{url}: no data directory is left");
    }
}

#[test]
fn while_the_database_is_down_requests_fail_by_name_and_service_resumes_when_it_is_back() {
    // A cluster of this test's own: it is stopped and started again.
    let pg = Postgres::start();
    let db = pg.database();
    let (mut s, _gone) = server_on(&db.url);
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "root", "--size",
        "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "root"])["state"] == "ready"
    });

    pg.stop();
    // The leader cannot renew its lease: it stops leading before the lease
    // (1.5 s) could lapse, by its own clock.
    s.wait_for(10, "the leader steps down", || {
        s.log().contains("this replica stops leading")
    });
    let e = s.fails(&["volume", "show", "root"]);
    assert!(
        e.contains("cannot reach the database at postgres://") && e.contains("refused"),
        "{e}"
    );
    assert!(s.is_running(), "the server keeps running: {}", s.log());
    // A server that starts meanwhile says what it cannot reach.
    s.stop();
    let out = std::process::Command::new(&bins().server)
        .args(["run", "--data-dir"])
        .arg(&s.dir)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("cannot reach the database at postgres://"),
        "{e}"
    );

    pg.restart();
    s.restart();
    assert_eq!(s.json(&["volume", "show", "root"])["state"], "ready");
    // And a running server whose database comes back serves again.
    pg.restart();
    s.wait_for(20, "served again", || {
        s.ctl(&["volume", "show", "root"]).status.success()
    });
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "data", "--size",
        "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "data"])["state"] == "ready"
    });
    let id = s.json(&["volume", "show", "root"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.ok(&["volume", "delete", "root"]);
    s.wait_for(20, "deleted", || {
        s.json(&["volume", "show", &id])["state"] == "deleted"
    });
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
}

#[test]
fn an_installation_moves_from_sqlite_to_postgres_verified_and_runs_there() {
    let pg = Postgres::shared();
    let db = pg.database();
    let mut s = common::start_sqlite_server(Some(FAST));
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    for name in ["root", "data"] {
        s.ok(&[
            "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", name, "--size",
            "1M",
        ]);
        s.wait_for(20, "ready", || {
            s.json(&["volume", "show", name])["state"] == "ready"
        });
    }
    // An escrow packet (its bytes column is copied too): asked by the
    // first admin, approved by a second.
    let bob = s.dir.join("bob-credential");
    let out = std::process::Command::new(&bins().server)
        .args(["admin", "add", "bob", "--out", bob.to_str().unwrap()])
        .args(["--data-dir", s.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let to = age::x25519::Identity::generate().to_public().to_string();
    let escrow = s.json(&["volume", "escrow", "data", "--to", &to]);
    let escrow_id = escrow["id"].as_str().unwrap().to_owned();
    let o = s
        .ctl_command(&["escrow", "approve", &escrow_id])
        .env("GUESTKEY_ADMIN_DIR", &bob)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let escrows = s.json(&["escrow", "list", "--all"]);
    let volumes = s.json(&["volume", "list"]);
    let audit = s.json(&["audit"]).as_array().unwrap().len();
    let mv = |dir: &std::path::Path, url: &str| {
        std::process::Command::new(&bins().server)
            .args(["move-to-postgres", "--data-dir"])
            .arg(dir)
            .args(["--database", url])
            .output()
            .unwrap()
    };
    // Not while the server runs.
    let out = mv(&s.dir, &db.url);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("stop the server first"), "{e}");
    assert_eq!(
        pg.psql(
            &db.name,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        Ok("0".into()),
        "nothing was written"
    );

    s.stop();
    let out = mv(&s.dir, &db.url);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("now uses postgresql postgres://")
            && said.contains(&format!("the audit chain ({audit} records)"))
            && said.contains("2 keys unwrap"),
        "{said}"
    );
    assert!(!s.dir.join("guestkey.db").exists());
    assert!(s.dir.join("guestkey.db.before-postgres").exists());
    assert_eq!(
        pg.psql(&db.name, "SELECT count(*) FROM volumes"),
        Ok("2".into())
    );

    s.restart();
    assert_eq!(s.json(&["volume", "list"]), volumes);
    assert_eq!(s.json(&["escrow", "list", "--all"]), escrows);
    let packet = s.dir.join("data.escrow");
    s.ok(&[
        "escrow",
        "fetch",
        &escrow_id,
        "--out",
        packet.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&packet).unwrap(),
        format!("test escrow packet {escrow_id}").into_bytes()
    );
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
    let id = s.json(&["volume", "show", "root"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.ok(&["volume", "delete", "root"]);
    s.wait_for(20, "deleted", || {
        s.json(&["volume", "show", &id])["state"] == "deleted"
    });
    s.stop();

    // Again: it uses PostgreSQL already. Another installation into the
    // same database: refused, and that one keeps its SQLite.
    let out = mv(&s.dir, &db.url);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already uses postgresql"));
    let mut other = common::start_sqlite_server(None);
    other.stop();
    let out = mv(&other.dir, &db.url);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("is not empty") && e.contains("never writes over a database"),
        "{e}"
    );
    assert!(other.dir.join("guestkey.db").exists());
    assert!(!other.dir.join("database").exists());
}

#[test]
fn a_copy_that_does_not_verify_is_rolled_back_and_the_installation_keeps_sqlite() {
    let pg = Postgres::shared();
    let db = pg.database();
    let mut s = common::start_sqlite_server(None);
    s.ok(&["host", "add", "kvm-a", "--address", "127.0.0.1:1"]);
    s.stop();
    // An altered audit record: the chain no longer verifies.
    let conn = rusqlite::Connection::open(s.dir.join("guestkey.db")).unwrap();
    conn.execute_batch(
        "DROP TRIGGER audit_no_update; UPDATE audit SET detail = 'altered' WHERE seq = 2;",
    )
    .unwrap();
    drop(conn);
    let out = std::process::Command::new(&bins().server)
        .args(["move-to-postgres", "--data-dir"])
        .arg(&s.dir)
        .args(["--database", &db.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("does not verify") && e.contains("nothing was moved"),
        "{e}"
    );
    assert_eq!(
        pg.psql(&db.name, "SELECT count(*) FROM audit"),
        Ok("0".into()),
        "the copy was rolled back"
    );
    assert!(s.dir.join("guestkey.db").exists());
    assert!(!s.dir.join("database").exists());
}

#[test]
fn tls_to_postgres_is_used_and_the_database_servers_certificate_is_checked() {
    // A cluster of this test's own that serves TLS, with a CA of its own.
    let pg = Postgres::start_tls();
    let db = pg.database();
    let ca = pg.tls_ca().unwrap().display().to_string();
    let url = format!("{}?sslmode=require&sslrootcert={ca}", db.url);
    let (s, _gone) = server_on(&url);
    s.ok(&["host", "add", "kvm-a", "--address", "127.0.0.1:1"]);
    // The server's sessions are encrypted.
    let ssl = pg
        .psql(
            &db.name,
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE datname = current_database() AND ssl AND pid <> pg_backend_pid()",
        )
        .unwrap();
    assert!(ssl.parse::<u32>().unwrap() >= 1, "TLS sessions: {ssl}");

    // Another CA than the one that signed the database's certificate.
    let other = Postgres::start_tls();
    let other_ca = other.tls_ca().unwrap().display().to_string();
    let db2 = pg.database();
    let e = refused_init(&format!(
        "{}?sslmode=require&sslrootcert={other_ca}",
        db2.url
    ));
    assert!(
        e.contains("cannot reach the database") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
    // TLS asked for without a CA to check against; a CA file that is not one.
    let e = refused_init(&format!("{}?sslmode=require", db2.url));
    assert!(e.contains("add sslrootcert=/PATH/ca.pem"), "{e}");
    let e = refused_init(&format!(
        "{}?sslmode=require&sslrootcert=/etc/hostname",
        db2.url
    ));
    assert!(
        e.contains("sslrootcert /etc/hostname") && e.contains("no certificate"),
        "{e}"
    );
    assert_eq!(
        pg.psql(
            &db2.name,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        Ok("0".into()),
        "nothing was written"
    );
}

#[test]
fn a_client_certificate_is_presented_to_a_database_that_asks_for_one() {
    // A cluster whose role guestkey logs in only with a client certificate
    // (`hostssl ... cert`, CN=guestkey, of the cluster's CA).
    let pg = Postgres::start_client_certs();
    let db = pg.database();
    let ca = pg.tls_ca().unwrap().display().to_string();
    let (cert, key) = pg.client_identity();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let base = pg.url_as("guestkey", &db.name);
    let url = format!("{base}?sslmode=require&sslrootcert={ca}&sslcert={cert}&sslkey={key}");
    let (s, _gone) = server_on(&url);
    s.ok(&["host", "add", "kvm-a", "--address", "127.0.0.1:1"]);
    // The server's sessions are the certificate's role, over TLS.
    let dn = pg
        .psql(
            &db.name,
            "SELECT string_agg(DISTINCT client_dn, ',') FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE datname = current_database() AND usename = 'guestkey'",
        )
        .unwrap();
    assert_eq!(dn, "/CN=guestkey");

    let db2 = pg.database();
    let base2 = pg.url_as("guestkey", &db2.name);
    // No certificate: the database refuses, and says why.
    let e = refused_init(&format!("{base2}?sslmode=require&sslrootcert={ca}"));
    assert!(
        e.contains("cannot reach the database") && e.contains("certificate"),
        "{e}"
    );
    // Half of an identity; an identity without a CA to check the server.
    let e = refused_init(&format!(
        "{base2}?sslmode=require&sslrootcert={ca}&sslcert={cert}"
    ));
    assert!(e.contains("needs both"), "{e}");
    let e = refused_init(&format!(
        "{base2}?sslmode=require&sslcert={cert}&sslkey={key}"
    ));
    assert!(e.contains("add sslrootcert"), "{e}");
    // A key that others may read.
    let loose = pg.root().join("loose.key");
    std::fs::copy(&key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = refused_init(&format!(
        "{base2}?sslmode=require&sslrootcert={ca}&sslcert={cert}&sslkey={}",
        loose.display()
    ));
    assert!(
        e.contains("others may read it (mode 644): chmod 600 it"),
        "{e}"
    );
    // A certificate file that holds none.
    let e = refused_init(&format!(
        "{base2}?sslmode=require&sslrootcert={ca}&sslcert=/etc/hostname&sslkey={key}"
    ));
    assert!(
        e.contains("sslcert /etc/hostname") && e.contains("no certificate"),
        "{e}"
    );
    assert_eq!(
        pg.psql(
            &db2.name,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        Ok("0".into()),
        "nothing was written"
    );
}
