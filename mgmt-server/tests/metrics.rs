//! `/metrics` of guestkey-server, against the real server binary with
//! `common::TestAgent` as the host (see its header): off unless
//! `[metrics] listen` is set; once on, it counts calls by method and result
//! code, key releases (by host) and pushes, hosts by state, their last
//! reports and leadership, in the Prometheus text format, and names no
//! volume or key.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn get(addr: &str, path: &str) -> (String, String) {
    guestkey_testkit::http_get(addr, path)
}

/// The value of the sample `name` (labels included) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_calls_releases_pushes_and_hosts_and_name_no_volume() {
    let port = guestkey_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        "[metrics]\nlisten = \"{addr}\"\n[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 200\n"
    );
    let s = start_server(Some(&config));
    let mut a = TestAgent::enroll(&s, "kvm-m");
    a.serve();
    add_host(&s, "kvm-waiting", 1);
    let v = s.json(&[
        "volume", "create", "--host", "kvm-m", "--pool", "p", "--name", "metered", "--size", "1M",
    ]);
    assert_eq!(v["state"], "ready", "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let e = s.fails(&["volume", "show", "no-such-volume"]);
    assert!(e.contains("no-such-volume"), "{e}");

    let mut body = String::new();
    s.wait_for(20, "the replica leading", || {
        let (status, b) = get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{b}");
        body = b;
        sample(&body, "guestkey_leader") == Some(1.0)
    });
    let at_least = |name: &str, n: f64| {
        let got = sample(&body, name);
        assert!(got.is_some_and(|g| g >= n), "{name}: {got:?}\n{body}");
    };
    at_least(
        r#"guestkey_rpc_requests_total{service="admin",method="CreateVolume",code="OK"}"#,
        1.0,
    );
    at_least(
        r#"guestkey_rpc_requests_total{service="admin",method="GetVolume",code="NOT_FOUND"}"#,
        1.0,
    );
    at_least(
        r#"guestkey_rpc_duration_seconds_count{service="admin",method="CreateVolume"}"#,
        1.0,
    );
    at_least(r#"guestkey_key_releases_total{host="kvm-m"}"#, 1.0);
    assert!(
        sample(
            &body,
            r#"guestkey_host_last_report_timestamp_seconds{host="kvm-m"}"#
        )
        .is_some(),
        "{body}"
    );
    at_least(r#"guestkey_pushes_total{result="ok"}"#, 1.0);
    assert_eq!(
        sample(&body, r#"guestkey_hosts{state="enrolled"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, r#"guestkey_hosts{state="pending-enrollment"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&body, "guestkey_hosts_attested"), Some(0.0));
    assert_eq!(sample(&body, "guestkey_store_failures_total"), Some(0.0));
    assert_eq!(
        sample(&body, r#"guestkey_volumes{state="ready"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, r#"guestkey_volumes{state="rekeying"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, r#"guestkey_volumes{state="failed"}"#),
        Some(0.0)
    );
    assert!(!body.contains(r#"state="deleted""#), "{body}");
    at_least(
        "guestkey_server_certificate_expiry_timestamp_seconds",
        1.7e9,
    );
    assert!(
        body.contains(r#"guestkey_master_key_source{source="file"} 1"#),
        "{body}"
    );
    // Nothing per volume or secret; a host only in the per-host series.
    for word in [id.as_str(), "metered", "kvm-waiting", "no-such-volume"] {
        assert!(!body.contains(word), "{word} in the metrics:\n{body}");
    }
    for line in body.lines().filter(|l| l.contains("kvm-m")) {
        assert!(
            line.starts_with("guestkey_key_releases_total{host=\"kvm-m\"}")
                || line.starts_with("guestkey_host_last_report_timestamp_seconds{host=\"kvm-m\"}"),
            "{line}"
        );
    }
    assert!(body.ends_with("# EOF\n"), "{body}");
    // The example alert rules use only names the server exports.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/prometheus-alerts.yml"
    ))
    .unwrap();
    let mut used = 0;
    for (at, _) in rules.match_indices("guestkey_") {
        let name: String = rules[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            body.lines().any(|l| l.starts_with(&name)),
            "examples/prometheus-alerts.yml uses {name}, which the server does not export"
        );
        used += 1;
    }
    assert!(used >= 8, "{used}");
    // Any other path: not found, nothing else served.
    assert!(get(&addr, "/").0.contains("404"));
    assert!(get(&addr, "/metrics/x").0.contains("404"));

    // Rekeys overdue: none so far; then a policy the scheduler cannot
    // honour (the volume's host is revoked) makes the volume overdue.
    assert_eq!(sample(&body, "guestkey_rekeys_overdue"), Some(0.0));
    assert_eq!(
        sample(&body, "guestkey_rekey_overdue_since_timestamp_seconds"),
        Some(0.0)
    );
    s.ok(&["host", "revoke", "kvm-m"]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    s.ok(&[
        "policy",
        "set",
        "--volume",
        "metered",
        "--max-key-age",
        "2s",
        "--mode",
        "shallow",
    ]);
    s.wait_for(20, "the volume's rekey overdue", || {
        body = get(&addr, "/metrics").1;
        sample(&body, "guestkey_rekeys_overdue") == Some(1.0)
    });
    let since = sample(&body, "guestkey_rekey_overdue_since_timestamp_seconds").unwrap();
    assert!(since > 1.7e9 && since <= before + 3.0, "{since} {before}");
    assert_eq!(
        sample(&body, r#"guestkey_volumes{state="rekeying"}"#),
        Some(0.0),
        "{body}"
    );
}

#[test]
fn metrics_are_off_unless_configured_and_a_bad_address_is_refused() {
    let port = guestkey_testkit::free_port();
    let s = start_server(None);
    assert!(!s.log().contains("metrics served"), "{}", s.log());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    drop(s);
    let dir = std::env::temp_dir().join(format!("gk-metrics-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[metrics]\nlisten = \"localhost\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bins().server)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("metrics.listen") && err.contains("`localhost` is not an IP:PORT address"),
        "{err}"
    );
}
