//! Snapshots of every rendering, from fixed protobuf values: tables, show
//! blocks, JSON documents, sizes, times and progress lines. A change to
//! what users or scripts read fails here; review the diff, then accept it
//! (`cargo insta review`, or `INSTA_UPDATE=always cargo test`).
//!
//! insta ignores trailing whitespace at the end of a snapshot, so each
//! rendering is snapshotted through `exact`: every line ends in `$` (as
//! `cat -A` shows it), which keeps trailing spaces and the final newline
//! part of what is compared.

use guestkey_proto::admin as pb;

use super::*;

/// Asserts a snapshot of `text`, byte for byte (see the module's header).
macro_rules! assert_snapshot {
    ($name:expr, $text:expr) => {
        insta::assert_snapshot!($name, exact(&$text))
    };
    ($text:expr) => {
        insta::assert_snapshot!(exact(&$text))
    };
}

/// `text` with a `$` at the end of each line; a last line without a
/// newline ends in `$(no newline)`.
fn exact(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('\n') {
        out.push_str(&rest[..i]);
        out.push_str("$\n");
        rest = &rest[i + 1..];
    }
    if !rest.is_empty() {
        out.push_str(rest);
        out.push_str("$(no newline)\n");
    }
    out
}

/// 2026-12-01 09:30:00 UTC.
const T: i64 = 1_796_117_400;

fn host_a() -> pb::Host {
    pb::Host {
        name: "kvm-01".into(),
        address: "10.0.0.11:7444".into(),
        state: "enrolled".into(),
        created_unix: T,
        enrolled_unix: T + 65,
        certificate_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            .into(),
        volume_count: 12,
        held_keys: 3,
        inventory_reported_unix: T + 3600,
        libvirt_uri: "qemu+tls://kvm-01.example/system".into(),
        migration_uri: "tcp://kvm-01.example:49152".into(),
        tpm: Some(pb::HostTpm {
            tcti: "device:/dev/tpmrm0".into(),
            pcrs: "sha256:0,7".into(),
            authority: "3f1c9a0b7d2e4f55".into(),
            current: vec![
                format!("0={}", "ab".repeat(32)),
                format!("7={}", "cd".repeat(32)),
            ],
            approvals: 2,
            unseals: false,
            reported_unix: T + 60,
        }),
        attestation: Some(pb::HostAttestation {
            ek_sha256: "e1".repeat(32),
            ak_sha256: "a2".repeat(32),
            ek_certificate: true,
            pinned: true,
            last_unix: T + 3500,
            last_ok: false,
            last_detail: format!(
                "PCR 7 is {}, which the allowlists (host kvm-01 v2, group rack-1 v1) do not name (software on the host changed); if the change is expected, run `guestkeyctl attestation allow --host kvm-01 --pcr 7={}`",
                "cd".repeat(32),
                "cd".repeat(32)
            ),
            differing: vec![7],
            allowlist_version: 2,
            group_allowlist_version: 1,
            fresh_until_unix: 0,
        }),
        group: "rack-1".into(),
    }
}

fn host_b() -> pb::Host {
    pb::Host {
        name: "kvm-new".into(),
        address: "kvm-new.example:7444".into(),
        state: "pending-enrollment".into(),
        created_unix: T + 7200,
        ..Default::default()
    }
}

fn volume_ready() -> pb::Volume {
    pb::Volume {
        id: "6f1c2b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f".into(),
        name: "vm1-disk".into(),
        host: "kvm-01".into(),
        pool: "default".into(),
        format: "qcow2".into(),
        capacity_bytes: 10 << 30,
        key_generation: 3,
        state: "ready".into(),
        secret_uuid: "0d9e4c3b-1a2b-4c5d-8e9f-a0b1c2d3e4f5".into(),
        created_unix: T,
        release: "auto".into(),
        ..Default::default()
    }
}

/// A deep rekey under way, after a migration, with a retried error.
fn volume_rekeying() -> pb::Volume {
    pb::Volume {
        id: "a2b3c4d5-e6f7-4a8b-9c0d-1e2f3a4b5c6d".into(),
        name: "db-data".into(),
        host: "kvm-02".into(),
        pool: "fast".into(),
        format: "raw".into(),
        capacity_bytes: 482_345_123,
        key_generation: 1,
        state: "rekeying".into(),
        last_error: "host kvm-02 unreachable: connection refused".into(),
        attempts: 2,
        secret_uuid: "11111111-2222-4333-8444-555555555555".into(),
        created_unix: T,
        rekey_due_unix: T + 86_400,
        progress_phase: "re-encrypting".into(),
        progress_done_bytes: 217_055_305,
        progress_total_bytes: 482_345_123,
        release: "attested".into(),
        split: true,
    }
}

fn volume_pending() -> pb::Volume {
    pb::Volume {
        id: "0e0e0e0e-1f1f-4a2a-8b3b-4c4c4c4c4c4c".into(),
        name: "late".into(),
        host: "kvm-late".into(),
        pool: "p".into(),
        format: "qcow2".into(),
        capacity_bytes: 64 << 20,
        key_generation: 1,
        state: "pending-create".into(),
        last_error: "host kvm-late unreachable: tcp connect error".into(),
        attempts: 4,
        created_unix: T,
        ..Default::default()
    }
}

fn guest_running() -> pb::Guest {
    pb::Guest {
        uuid: "c0ffee00-1234-4567-89ab-cdef01234567".into(),
        name: "web1".into(),
        host: "kvm-01".into(),
        state: "running".into(),
        volumes: vec!["vm1-disk".into(), "vm1-data".into()],
        domain_xml: "<domain type='kvm'>\n  <name>web1</name>\n</domain>\n".into(),
        ..Default::default()
    }
}

fn guest_pending() -> pb::Guest {
    pb::Guest {
        uuid: "deadbeef-0000-4000-8000-000000000001".into(),
        name: "batch".into(),
        host: "kvm-late".into(),
        state: "pending-define".into(),
        pending: "define".into(),
        last_error: "host kvm-late unreachable".into(),
        attempts: 7,
        migrating_to: "kvm-02".into(),
        ..Default::default()
    }
}

fn policies() -> Vec<pb::Policy> {
    vec![
        pb::Policy {
            scope: "pool".into(),
            target: "default".into(),
            max_key_age_secs: 90 * 86_400,
            mode: "shallow".into(),
            after_migration_secs: 0,
        },
        pb::Policy {
            scope: "volume".into(),
            target: "6f1c2b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f".into(),
            max_key_age_secs: 3600,
            mode: "deep".into(),
            after_migration_secs: 600,
        },
    ]
}

fn audit_records() -> Vec<pb::AuditRecord> {
    vec![
        pb::AuditRecord {
            seq: 1,
            time_unix_ms: T * 1000 + 250,
            actor: "admin:3fa9".into(),
            action: "host.added".into(),
            subject: "kvm-01".into(),
            detail: "address 10.0.0.11:7444".into(),
            hash: "aa".repeat(32),
        },
        pb::AuditRecord {
            seq: 2,
            time_unix_ms: T * 1000 + 61_000,
            actor: "server".into(),
            action: "key.pushed".into(),
            subject: "6f1c2b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f".into(),
            detail: "volume vm1-disk created on host kvm-01".into(),
            hash: "bb".repeat(32),
        },
        pb::AuditRecord {
            seq: 10,
            time_unix_ms: T * 1000 + 90_000,
            actor: "server".into(),
            action: "refused".into(),
            subject: "".into(),
            detail: "".into(),
            hash: "cc".repeat(32),
        },
    ]
}

#[test]
fn sizes() {
    let values: [u64; 18] = [
        0,
        1,
        1000,
        1023,
        1024,
        1025,
        1536,
        1 << 20,
        64 << 20,
        (1 << 20) + 1,
        1536 << 20,
        10 << 30,
        482_345_123,
        217_055_305,
        1 << 50,
        (1 << 50) + (1 << 49),
        1 << 60,
        u64::MAX,
    ];
    let text: String = values
        .iter()
        .map(|b| format!("{b} => {}\n", size(*b)))
        .collect();
    assert_snapshot!(text);
}

#[test]
fn times() {
    let text: String = [0, -5, 1, T, T + 86_399, 253_402_300_799, 253_402_300_800]
        .iter()
        .map(|t| format!("{t} => {}\n", time(*t)))
        .collect();
    assert_snapshot!(text);
}

#[test]
fn tables() {
    assert_snapshot!("hosts_table", hosts_table(&[host_a(), host_b()]));
    assert_snapshot!("hosts_table_empty", hosts_table(&[]));
    assert_snapshot!(
        "volumes_table",
        volumes_table(&[volume_ready(), volume_rekeying(), volume_pending()])
    );
    assert_snapshot!(
        "guests_table",
        guests_table(&[guest_running(), guest_pending()])
    );
    assert_snapshot!("policies_table", policies_table(&policies()));
    assert_snapshot!("audit_table", audit_table(&audit_records()));
}

#[test]
fn show_blocks() {
    assert_snapshot!("host_enrolled", host_text(&host_a()));
    assert_snapshot!("host_pending", host_text(&host_b()));
    let added = pb::AddHostResponse {
        host: Some(host_b()),
        enrollment_token: "gkt_Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5".into(),
        token_expires_unix: T + 86_400,
    };
    assert_snapshot!("host_added", host_added_text(&added));
    assert_snapshot!("volume_ready", volume_text(&volume_ready()));
    assert_snapshot!("volume_rekeying", volume_text(&volume_rekeying()));
    assert_snapshot!("volume_pending", volume_text(&volume_pending()));
    assert_snapshot!("guest_running", guest_text(&guest_running()));
    assert_snapshot!("guest_pending", guest_text(&guest_pending()));
    let ok = pb::VerifyAuditResponse {
        ok: true,
        records: 1234,
        ..Default::default()
    };
    let bad = pb::VerifyAuditResponse {
        ok: false,
        records: 1234,
        first_bad_seq: 77,
        problem: "hash mismatch".into(),
        ..Default::default()
    };
    assert_snapshot!("verify", verify_text(&ok) + &verify_text(&bad));
}

#[test]
fn json_documents() {
    let added = pb::AddHostResponse {
        host: Some(host_b()),
        enrollment_token: "gkt_token".into(),
        token_expires_unix: T + 86_400,
    };
    let docs = [
        ("host_added", host_added_json(&added)),
        ("host", host_json(&host_a())),
        ("volume_ready", volume_json(&volume_ready())),
        ("volume_rekeying", volume_json(&volume_rekeying())),
        ("guest", guest_json(&guest_pending())),
        ("policies", policies_json(&policies())),
        ("audit", audit_json(&audit_records()[..1])),
        (
            "verify",
            verify_json(&pb::VerifyAuditResponse {
                ok: false,
                records: 3,
                first_bad_seq: 2,
                problem: "hash mismatch".into(),
                ..Default::default()
            }),
        ),
    ];
    for (name, doc) in docs {
        assert_snapshot!(format!("json_{name}"), json_text(&doc));
    }
}

#[test]
fn progress_lines() {
    let base = volume_rekeying();
    let cases = [
        ("45 percent with a retried error", base.clone()),
        (
            "done, no error",
            pb::Volume {
                progress_done_bytes: base.progress_total_bytes,
                last_error: String::new(),
                ..base.clone()
            },
        ),
        (
            "more done than the total",
            pb::Volume {
                progress_done_bytes: base.progress_total_bytes * 2,
                last_error: String::new(),
                ..base.clone()
            },
        ),
        (
            "phase without a total",
            pb::Volume {
                progress_total_bytes: 0,
                last_error: String::new(),
                ..base.clone()
            },
        ),
        ("no progress: the state", volume_pending()),
        (
            "a long error is cut at 200 characters",
            pb::Volume {
                last_error: "x".repeat(300),
                ..base.clone()
            },
        ),
    ];
    let text: String = cases
        .iter()
        .map(|(what, v)| format!("{what}:\n{}\n", progress_line(v)))
        .collect();
    assert_snapshot!(text);
}
