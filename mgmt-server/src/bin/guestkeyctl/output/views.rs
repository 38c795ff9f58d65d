//! The renderings of each server answer: for every kind, the text users
//! read (a table or a key/value block) and the JSON document scripts read
//! with `--json`. Keys of the JSON documents and the text layouts are an
//! interface: the snapshot tests pin them.

use guestkey_proto::admin as pb;
use serde_json::{Value, json};

use super::{Empty, fields, progress_line, size, table, time};

/// `host add`: the host and its one-time enrollment token.
pub(crate) fn host_added_json(r: &pb::AddHostResponse) -> Value {
    let h = r.host.clone().unwrap_or_default();
    json!({"host": host_json(&h), "enrollment_token": r.enrollment_token, "token_expires_unix": r.token_expires_unix})
}

/// `host add` as text.
pub(crate) fn host_added_text(r: &pb::AddHostResponse) -> String {
    let h = r.host.clone().unwrap_or_default();
    format!(
        "host {} registered ({})\nenrollment token (one use, expires {}):\n{}\n{}\n",
        h.name,
        h.address,
        time(r.token_expires_unix),
        r.enrollment_token,
        "on the host: guestkeyd enroll --server URL --token TOKEN --ca-file CA.pem --state-dir DIR"
    )
}

/// One host as JSON.
pub(crate) fn host_json(h: &pb::Host) -> Value {
    json!({"name": h.name, "address": h.address, "state": h.state, "created_unix": h.created_unix,
           "enrolled_unix": h.enrolled_unix, "certificate_sha256": h.certificate_sha256, "volume_count": h.volume_count,
           "held_keys": h.held_keys, "inventory_reported_unix": h.inventory_reported_unix,
           "libvirt_uri": h.libvirt_uri, "migration_uri": h.migration_uri, "group": h.group,
           "tpm": h.tpm.as_ref().map(|t| json!({"tcti": t.tcti, "pcrs": t.pcrs, "authority": t.authority,
               "current": t.current, "approvals": t.approvals, "unseals": t.unseals,
               "reported_unix": t.reported_unix})),
           "attestation": h.attestation.as_ref().map(|a| json!({"ek_sha256": a.ek_sha256, "ak_sha256": a.ak_sha256,
               "ek_certificate": a.ek_certificate, "pinned": a.pinned, "last_unix": a.last_unix,
               "last_ok": a.last_ok, "last_detail": a.last_detail, "differing": a.differing,
               "allowlist_version": a.allowlist_version, "group_allowlist_version": a.group_allowlist_version,
               "fresh_until_unix": a.fresh_until_unix}))})
}

/// `host list` as a table.
pub(crate) fn hosts_table(hosts: &[pb::Host]) -> String {
    table(
        &["NAME", "ADDRESS", "STATE", "VOLUMES", "ENROLLED"],
        hosts
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    h.address.clone(),
                    h.state.clone(),
                    h.volume_count.to_string(),
                    time(h.enrolled_unix),
                ]
            })
            .collect(),
    )
}

/// One host as a key/value block (every row, also empty ones).
pub(crate) fn host_text(h: &pb::Host) -> String {
    let libvirt_uri = if h.libvirt_uri.is_empty() {
        "(default: qemu+tls://ADDRESS-HOST/system)".into()
    } else {
        h.libvirt_uri.clone()
    };
    fields(
        19,
        &[
            ("name", h.name.clone()),
            ("address", h.address.clone()),
            ("state", h.state.clone()),
            ("volumes", h.volume_count.to_string()),
            ("registered", time(h.created_unix)),
            ("enrolled", time(h.enrolled_unix)),
            ("certificate sha256", h.certificate_sha256.clone()),
            ("keys held", h.held_keys.to_string()),
            ("last report", time(h.inventory_reported_unix)),
            ("libvirt URI", libvirt_uri),
            ("migration URI", h.migration_uri.clone()),
            ("group", h.group.clone()),
        ],
        Empty::Show,
    ) + &host_tpm_text(h.tpm.as_ref())
        + &host_attestation_text(h.attestation.as_ref())
}

/// The attestation rows of `host show`.
fn host_attestation_text(a: Option<&pb::HostAttestation>) -> String {
    let Some(a) = a else {
        return fields(
            19,
            &[("attestation", "none (enrolled without a TPM)".into())],
            Empty::Show,
        );
    };
    let key = if a.pinned {
        format!("sha256 {} (proven in its TPM)", a.ak_sha256)
    } else {
        format!(
            "sha256 {} NOT PROVEN: the host cannot be attested (enroll it again)",
            a.ak_sha256
        )
    };
    let last = if a.last_unix == 0 {
        "never".to_owned()
    } else if a.last_ok {
        format!("passed at {} ({})", time(a.last_unix), a.last_detail)
    } else {
        format!("FAILED at {}: {}", time(a.last_unix), a.last_detail)
    };
    let mut rows = vec![
        (
            "endorsement key",
            format!(
                "sha256 {}{}",
                a.ek_sha256,
                if a.ek_certificate {
                    " (with EK certificate)"
                } else {
                    " (no EK certificate)"
                }
            ),
        ),
        ("attestation key", key),
        ("allowlist version", a.allowlist_version.to_string()),
        ("group allowlist", a.group_allowlist_version.to_string()),
        ("last attestation", last),
    ];
    if !a.differing.is_empty() {
        let pcrs: Vec<String> = a.differing.iter().map(|p| p.to_string()).collect();
        rows.push(("PCRs not allowed", pcrs.join(",")));
    }
    rows.push((
        "attested until",
        if a.fresh_until_unix == 0 {
            "not attested".to_owned()
        } else {
            time(a.fresh_until_unix)
        },
    ));
    fields(19, &rows, Empty::Show)
}

/// A host's allowlist as JSON.
pub(crate) fn allowlist_json(a: &pb::Allowlist) -> Value {
    json!({"scope": a.scope, "target": a.target, "version": a.version,
           "pcrs": a.pcrs.iter().map(|p| json!({"pcr": p.pcr, "sha256": p.sha256})).collect::<Vec<_>>()})
}

/// A host's allowlist as a table.
pub(crate) fn allowlist_text(a: &pb::Allowlist) -> String {
    let mut out = format!("{} {} allowlist version {}\n", a.scope, a.target, a.version);
    if a.pcrs.is_empty() {
        out.push_str(
            "no PCR values allowed: `guestkeyctl attestation allow --host HOST --learn`\n",
        );
        return out;
    }
    out.push_str(&table(
        &["PCR", "SHA-256"],
        a.pcrs
            .iter()
            .map(|p| vec![p.pcr.to_string(), p.sha256.clone()])
            .collect(),
    ));
    out
}

/// The TPM rows of `host show`: the PCR policy and the values the host read.
fn host_tpm_text(t: Option<&pb::HostTpm>) -> String {
    let Some(t) = t else {
        return fields(
            19,
            &[("keys at rest", "files (not sealed to a TPM)".into())],
            Empty::Show,
        );
    };
    let rows = vec![
        ("keys at rest", format!("sealed to the TPM {}", t.tcti)),
        (
            "PCR policy",
            format!("{} approved by authority {}", t.pcrs, t.authority),
        ),
        ("approvals", t.approvals.to_string()),
        (
            "unseals",
            if t.unseals {
                "yes".to_owned()
            } else {
                "no: this boot's PCR values are not approved (guestkeyd tpm approve on the host)"
                    .to_owned()
            },
        ),
        ("TPM reported", time(t.reported_unix)),
    ];
    let pcrs: Vec<(String, String)> = t
        .current
        .iter()
        .map(|c| match c.split_once('=') {
            Some((p, v)) => (format!("PCR {p}"), v.to_owned()),
            None => ("PCR".to_owned(), c.clone()),
        })
        .collect();
    let mut out = fields(19, &rows, Empty::Show);
    let pcr_rows: Vec<(&str, String)> = pcrs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    out.push_str(&fields(19, &pcr_rows, Empty::Show));
    out
}

/// One volume as JSON.
pub(crate) fn volume_json(v: &pb::Volume) -> Value {
    json!({"id": v.id, "name": v.name, "host": v.host, "pool": v.pool, "format": v.format,
           "capacity_bytes": v.capacity_bytes, "key_generation": v.key_generation, "state": v.state,
           "last_error": v.last_error, "attempts": v.attempts, "secret_uuid": v.secret_uuid, "created_unix": v.created_unix,
           "rekey_due_unix": v.rekey_due_unix, "release": v.release, "split": v.split,
           "progress": if v.progress_phase.is_empty() { Value::Null } else {
               json!({"phase": v.progress_phase, "done_bytes": v.progress_done_bytes, "total_bytes": v.progress_total_bytes}) }})
}

/// `volume list` as a table.
pub(crate) fn volumes_table(vols: &[pb::Volume]) -> String {
    table(
        &[
            "NAME", "HOST", "POOL", "FORMAT", "SIZE", "GEN", "STATE", "ID",
        ],
        vols.iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.host.clone(),
                    v.pool.clone(),
                    v.format.clone(),
                    size(v.capacity_bytes),
                    v.key_generation.to_string(),
                    v.state.clone(),
                    v.id.clone(),
                ]
            })
            .collect(),
    )
}

/// One volume as a key/value block (empty rows left out).
pub(crate) fn volume_text(v: &pb::Volume) -> String {
    let rekey_due = if v.rekey_due_unix == 0 {
        String::new()
    } else {
        format!("{} (after a migration)", time(v.rekey_due_unix))
    };
    let progress = if v.progress_phase.is_empty() {
        String::new()
    } else {
        progress_line(v)
    };
    fields(
        15,
        &[
            ("name", v.name.clone()),
            ("id", v.id.clone()),
            ("host", v.host.clone()),
            ("pool", v.pool.clone()),
            ("format", format!("{} (LUKS)", v.format)),
            ("size", size(v.capacity_bytes)),
            ("key generation", v.key_generation.to_string()),
            (
                "key release",
                if v.split {
                    format!("{} (split key: a verifier keeps the other half)", v.release)
                } else {
                    v.release.clone()
                },
            ),
            ("state", v.state.clone()),
            ("libvirt secret", v.secret_uuid.clone()),
            ("deep rekey due", rekey_due),
            ("progress", progress),
            ("attempts", v.attempts.to_string()),
            ("last error", v.last_error.clone()),
        ],
        Empty::Skip,
    )
}

/// One guest as JSON.
pub(crate) fn guest_json(g: &pb::Guest) -> Value {
    json!({"uuid": g.uuid, "name": g.name, "host": g.host, "state": g.state, "pending": g.pending,
           "last_error": g.last_error, "attempts": g.attempts, "volumes": g.volumes, "domain_xml": g.domain_xml,
           "migrating_to": g.migrating_to})
}

/// `guest list` as a table.
pub(crate) fn guests_table(guests: &[pb::Guest]) -> String {
    table(
        &["NAME", "HOST", "STATE", "PENDING", "VOLUMES", "UUID"],
        guests
            .iter()
            .map(|g| {
                vec![
                    g.name.clone(),
                    g.host.clone(),
                    g.state.clone(),
                    g.pending.clone(),
                    g.volumes.join(","),
                    g.uuid.clone(),
                ]
            })
            .collect(),
    )
}

/// One guest as a key/value block (empty rows left out).
pub(crate) fn guest_text(g: &pb::Guest) -> String {
    let attempts = if g.pending.is_empty() {
        String::new()
    } else {
        g.attempts.to_string()
    };
    fields(
        16,
        &[
            ("name", g.name.clone()),
            ("uuid", g.uuid.clone()),
            ("host", g.host.clone()),
            ("state", g.state.clone()),
            ("pending", g.pending.clone()),
            ("migrating to", g.migrating_to.clone()),
            ("encrypted disks", g.volumes.join(", ")),
            ("attempts", attempts),
            ("last error", g.last_error.clone()),
        ],
        Empty::Skip,
    )
}

/// Policies as JSON (a list, also for one).
pub(crate) fn policies_json(ps: &[pb::Policy]) -> Value {
    json!(ps
        .iter()
        .map(|p| json!({"scope": p.scope, "target": p.target, "max_key_age_secs": p.max_key_age_secs,
                         "mode": p.mode, "after_migration_secs": p.after_migration_secs}))
        .collect::<Vec<_>>())
}

/// Policies as a table.
pub(crate) fn policies_table(ps: &[pb::Policy]) -> String {
    table(
        &["SCOPE", "TARGET", "MAX KEY AGE", "MODE", "AFTER MIGRATION"],
        ps.iter()
            .map(|p| {
                vec![
                    p.scope.clone(),
                    p.target.clone(),
                    format!("{}s", p.max_key_age_secs),
                    p.mode.clone(),
                    if p.after_migration_secs == 0 {
                        "-".into()
                    } else {
                        format!("{}s", p.after_migration_secs)
                    },
                ]
            })
            .collect(),
    )
}

/// Audit records as JSON.
pub(crate) fn audit_json(recs: &[pb::AuditRecord]) -> Value {
    json!(recs.iter().map(|r| json!({"seq": r.seq, "time_unix_ms": r.time_unix_ms, "actor": r.actor, "action": r.action, "subject": r.subject, "detail": r.detail, "hash": r.hash})).collect::<Vec<_>>())
}

/// Audit records as a table.
pub(crate) fn audit_table(recs: &[pb::AuditRecord]) -> String {
    table(
        &["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
        recs.iter()
            .map(|r| {
                vec![
                    r.seq.to_string(),
                    time(r.time_unix_ms / 1000),
                    r.actor.clone(),
                    r.action.clone(),
                    r.subject.clone(),
                    r.detail.clone(),
                ]
            })
            .collect(),
    )
}

/// `audit --verify` as JSON.
pub(crate) fn verify_json(v: &pb::VerifyAuditResponse) -> Value {
    json!({"ok": v.ok, "records": v.records, "first_bad_seq": v.first_bad_seq, "problem": v.problem, "checkpoints": v.checkpoints})
}

/// `audit --head` as JSON.
pub(crate) fn head_json(h: &pb::AuditHead) -> Value {
    json!({"signed": h.signed, "seq": h.seq, "hash": h.hash, "time_unix_ms": h.time_unix_ms})
}

/// `audit --verify` as text.
pub(crate) fn verify_text(v: &pb::VerifyAuditResponse) -> String {
    if v.ok {
        format!(
            "audit log intact: {} records, hash chain verified, MACs checked, {} signed heads matched\n",
            v.records, v.checkpoints
        )
    } else {
        format!(
            "AUDIT LOG DAMAGED at record {}: {}\n",
            v.first_bad_seq, v.problem
        )
    }
}

/// A release request as JSON.
pub(crate) fn pending_json(r: &pb::PendingRequest) -> Value {
    json!({"id": r.id, "host": r.host, "guest_uuid": r.guest_uuid, "guest_name": r.guest_name,
           "volumes": r.volumes, "state": r.state, "created_unix": r.created_unix,
           "decided_unix": r.decided_unix, "decided_by": r.decided_by, "note": r.note,
           "attestation": r.attestation})
}

/// `pending list` as a table; `now` for the time waited.
pub(crate) fn pending_table(rs: &[pb::PendingRequest], now: i64) -> String {
    if rs.is_empty() {
        return "no start waits for an approval\n".into();
    }
    table(
        &[
            "ID",
            "HOST",
            "GUEST",
            "VOLUMES",
            "ATTESTATION",
            "STATE",
            "WAITED",
        ],
        rs.iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.host.clone(),
                    r.guest_name.clone(),
                    r.volumes.join(","),
                    if r.attestation.is_empty() {
                        "-".into()
                    } else {
                        r.attestation.clone()
                    },
                    r.state.clone(),
                    format!(
                        "{} s",
                        (if r.decided_unix > 0 {
                            r.decided_unix
                        } else {
                            now
                        }) - r.created_unix
                    ),
                ]
            })
            .collect(),
    )
}
