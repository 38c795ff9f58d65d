//! Snapshots of what `guestkeyctl` prints without a server: its help
//! texts, its errors for bad arguments, and its errors for a missing or
//! invalid admin credential. Each snapshot holds the exit code, stdout and
//! stderr; a change to any of them fails the test (review it, then accept
//! the new snapshot with `cargo insta review` or `INSTA_UPDATE=always`).
//! The rendering of server answers (tables, show blocks, progress, sizes)
//! is snapshotted from fixed protobuf values in the binary's own tests.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{CTL, SERVER, temp_dir};

/// Runs guestkeyctl with `args` and no GUESTKEY_* variables; returns the
/// exit code and both streams as one text, with `dir` shown as `[DIR]`.
fn run(args: &[&str], dir: Option<&Path>) -> String {
    let out = Command::new(CTL)
        .args(args)
        .env_remove("GUESTKEY_SERVER")
        .env_remove("GUESTKEY_ADMIN_DIR")
        .output()
        .unwrap();
    let mut text = format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(d) = dir {
        text = text.replace(d.to_str().unwrap(), "[DIR]");
    }
    text
}

/// A real admin directory, made by `guestkey-server init` (no server runs).
fn admin_dir(tag: &str) -> std::path::PathBuf {
    let data = temp_dir(tag).join("data");
    let out = Command::new(SERVER)
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data.join("admin")
}

#[test]
fn help_texts() {
    let commands: &[&[&str]] = &[
        &[],
        &["host"],
        &["host", "add"],
        &["host", "list"],
        &["host", "show"],
        &["host", "revoke"],
        &["host", "attest"],
        &["host", "set-group"],
        &["host", "set-migration"],
        &["volume"],
        &["volume", "create"],
        &["volume", "encrypt"],
        &["volume", "decrypt"],
        &["volume", "list"],
        &["volume", "show"],
        &["volume", "delete"],
        &["volume", "set-release"],
        &["volume", "rekey"],
        &["volume", "escrow"],
        &["console-user"],
        &["console-user", "add"],
        &["pool"],
        &["pool", "manage"],
        &["pool", "show"],
        &["pool", "offers"],
        &["pool", "encrypt"],
        &["guest"],
        &["guest", "define"],
        &["guest", "list"],
        &["guest", "show"],
        &["guest", "undefine"],
        &["guest", "start"],
        &["guest", "stop"],
        &["guest", "migrate"],
        &["policy"],
        &["policy", "set"],
        &["policy", "list"],
        &["policy", "remove"],
        &["audit"],
        &["attestation"],
        &["attestation", "allow"],
        &["attestation", "show"],
        &["pending"],
        &["pending", "list"],
        &["pending", "approve"],
        &["pending", "deny"],
        &["escrow"],
        &["escrow", "list"],
        &["escrow", "approve"],
        &["escrow", "deny"],
        &["escrow", "fetch"],
        &["ca-cert"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let name = if cmd.is_empty() {
            "help".to_owned()
        } else {
            format!("help_{}", cmd.join("_"))
        };
        insta::assert_snapshot!(name, run(&args, None));
    }
    insta::assert_snapshot!("version", run(&["--version"], None));
}

#[test]
fn bad_arguments() {
    let cases: &[(&str, &[&str])] = &[
        ("no_command", &[]),
        ("unknown_command", &["frobnicate"]),
        ("host_add_without_address", &["host", "add", "kvm-01"]),
        (
            "volume_create_without_size",
            &[
                "volume", "create", "--host", "h", "--pool", "p", "--name", "n",
            ],
        ),
        ("rekey_without_kind", &["volume", "rekey", "v"]),
        (
            "rekey_shallow_and_deep",
            &["volume", "rekey", "v", "--shallow", "--deep"],
        ),
        (
            "rekey_online_and_offline",
            &["volume", "rekey", "v", "--deep", "--online", "--offline"],
        ),
        (
            "policy_set_without_target",
            &["policy", "set", "--max-key-age", "90d", "--mode", "deep"],
        ),
        (
            "policy_set_pool_and_volume",
            &[
                "policy",
                "set",
                "--pool",
                "p",
                "--volume",
                "v",
                "--max-key-age",
                "90d",
                "--mode",
                "deep",
            ],
        ),
        ("audit_limit_not_a_number", &["audit", "--limit", "many"]),
        (
            "attestation_allow_pcr_and_learn",
            &[
                "attestation",
                "allow",
                "--host",
                "h",
                "--pcr",
                "7=00",
                "--learn",
            ],
        ),
        ("guest_migrate_without_to", &["guest", "migrate", "g"]),
        ("volume_escrow_without_to", &["volume", "escrow", "v"]),
        (
            "escrow_fetch_without_out",
            &["escrow", "fetch", "es-0a1b2c3d4e5f"],
        ),
    ];
    for (name, args) in cases {
        insta::assert_snapshot!(format!("bad_{name}"), run(args, None));
    }
}

/// Input that guestkeyctl checks itself is refused before it looks for a
/// credential or a server.
#[test]
fn bad_values_are_refused_before_connecting() {
    let cases: &[(&str, &[&str])] = &[
        (
            "size_unit",
            &[
                "volume", "create", "--host", "h", "--pool", "p", "--name", "n", "--size", "1Z",
            ],
        ),
        (
            "size_negative",
            &[
                "volume", "create", "--host", "h", "--pool", "p", "--name", "n", "--size", "-1",
            ],
        ),
        (
            "bandwidth",
            &["volume", "rekey", "v", "--deep", "--bandwidth", "fast"],
        ),
        (
            "max_key_age",
            &[
                "policy",
                "set",
                "--pool",
                "p",
                "--max-key-age",
                "90y",
                "--mode",
                "deep",
            ],
        ),
        (
            "after_migration_zero",
            &[
                "policy",
                "set",
                "--pool",
                "p",
                "--max-key-age",
                "90d",
                "--mode",
                "deep",
                "--after-migration",
                "0s",
            ],
        ),
        (
            "domain_xml_missing",
            &[
                "guest",
                "define",
                "--host",
                "h",
                "--xml",
                "/nonexistent/guest.xml",
            ],
        ),
    ];
    for (name, args) in cases {
        insta::assert_snapshot!(format!("bad_value_{name}"), run(args, None));
    }
}

#[test]
fn missing_or_invalid_admin_credential() {
    // No credential at all.
    insta::assert_snapshot!("no_admin_dir", run(&["host", "list"], None));

    // A directory that is not an admin directory.
    let empty = temp_dir("cli-empty");
    let e = empty.to_str().unwrap();
    insta::assert_snapshot!(
        "admin_dir_without_server_file",
        run(&["--admin-dir", e, "host", "list"], Some(&empty))
    );
    insta::assert_snapshot!(
        "admin_dir_without_admin_pem",
        run(
            &[
                "--admin-dir",
                e,
                "--server",
                "https://localhost:7443",
                "host",
                "list"
            ],
            Some(&empty)
        )
    );

    // A real admin directory, damaged one file at a time.
    let dir = admin_dir("cli-cred");
    let d = dir.to_str().unwrap();
    insta::assert_snapshot!(
        "server_url_not_https",
        run(
            &[
                "--admin-dir",
                d,
                "--server",
                "http://localhost:7443",
                "host",
                "list"
            ],
            Some(&dir)
        )
    );
    // Port 1 on the loopback: nothing listens there.
    insta::assert_snapshot!(
        "nothing_listens",
        run(
            &[
                "--admin-dir",
                d,
                "--server",
                "https://127.0.0.1:1",
                "host",
                "list"
            ],
            Some(&dir)
        )
    );
    let admin_pem = dir.join("admin.pem");
    let good = std::fs::read_to_string(&admin_pem).unwrap();
    std::fs::write(&admin_pem, "not a certificate\n").unwrap();
    insta::assert_snapshot!(
        "admin_pem_not_pem",
        run(&["--admin-dir", d, "host", "list"], Some(&dir))
    );
    std::fs::write(&admin_pem, dated_certificate(2000, 2001)).unwrap();
    insta::assert_snapshot!(
        "admin_pem_expired",
        run(&["--admin-dir", d, "host", "list"], Some(&dir))
    );
    std::fs::write(&admin_pem, dated_certificate(2900, 2901)).unwrap();
    insta::assert_snapshot!(
        "admin_pem_not_yet_valid",
        run(&["--admin-dir", d, "host", "list"], Some(&dir))
    );
    std::fs::write(&admin_pem, good).unwrap();
    // The CA file holding no certificate, or a broken one.
    let ca_pem = dir.join("ca.pem");
    let ca = std::fs::read_to_string(&ca_pem).unwrap();
    for (name, text) in [
        ("ca_pem_empty", String::new()),
        ("ca_pem_text", "not a certificate\n".to_owned()),
        (
            "ca_pem_only_a_key",
            std::fs::read_to_string(dir.join("admin.key")).unwrap(),
        ),
        (
            "ca_pem_broken_certificate",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
        ),
        (
            "ca_pem_truncated",
            ca.lines().take(3).collect::<Vec<_>>().join("\n"),
        ),
    ] {
        std::fs::write(&ca_pem, text).unwrap();
        insta::assert_snapshot!(name, run(&["--admin-dir", d, "host", "list"], Some(&dir)));
    }
    std::fs::write(&ca_pem, ca).unwrap();
    // The pin of the server's certificate: damaged, then missing (a
    // credential made before pins).
    let pin = dir.join("server.sha256");
    std::fs::write(&pin, "not a hash\n").unwrap();
    insta::assert_snapshot!(
        "server_pin_not_a_hash",
        run(&["--admin-dir", d, "host", "list"], Some(&dir))
    );
    std::fs::remove_file(&pin).unwrap();
    insta::assert_snapshot!(
        "server_pin_missing",
        run(&["--admin-dir", d, "host", "list"], Some(&dir))
    );
    std::fs::remove_file(dir.join("admin.key")).unwrap();
    insta::assert_snapshot!(
        "admin_key_missing",
        run(&["--admin-dir", d, "host", "list"], Some(&dir))
    );
    let _ = std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap());
    let _ = std::fs::remove_dir_all(&empty);
}

/// A self-signed certificate valid from January 1st of `from` to January
/// 1st of `to`.
fn dated_certificate(from: i32, to: i32) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["admin".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(to, 1, 1);
    params.self_signed(&key).unwrap().pem()
}
