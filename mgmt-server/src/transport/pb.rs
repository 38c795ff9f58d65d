//! Conversions between domain types and protobuf messages (admin, host and
//! host-agent APIs), and from domain errors to gRPC statuses and back from
//! host statuses to [`AgentError`]s. Nothing outside `transport/` touches
//! prost types.

use guestkey_proto::admin as pb;
use guestkey_proto::agent;
use tonic::{Code, Status};

use crate::domain::agent::{AgentError, AgentErrorKind, SealedKey};
use crate::model::{
    AuditRecord, CoreError, EnrolledHost, GuestInfo, HostInfo, InvalidInput, Policy, RekeyKind,
    Verification, VolumeFormat, VolumeInfo,
};

pub(crate) fn host(h: HostInfo) -> pb::Host {
    pb::Host {
        name: h.name,
        address: h.address,
        state: h.state.to_string(),
        created_unix: h.created_unix,
        enrolled_unix: h.enrolled_unix,
        certificate_sha256: h.certificate_sha256,
        volume_count: h.volume_count,
        held_keys: h.held_keys,
        inventory_reported_unix: h.inventory_reported_unix,
        libvirt_uri: h.libvirt_uri,
        migration_uri: h.migration_uri,
        tpm: h.tpm.map(|t| pb::HostTpm {
            tcti: t.tcti,
            pcrs: t.pcrs,
            authority: t.authority,
            current: t
                .current
                .into_iter()
                .map(|(p, v)| format!("{p}={v}"))
                .collect(),
            approvals: t.approvals,
            unseals: t.unseals,
            reported_unix: t.reported_unix,
        }),
        group: h.group,
        attestation: h.attestation.map(|a| {
            let (last_unix, last_ok, last_detail, differing) = match a.last {
                Some(o) => (
                    o.at_unix,
                    o.ok,
                    o.detail,
                    o.differing.into_iter().map(u32::from).collect(),
                ),
                None => (0, false, String::new(), vec![]),
            };
            pb::HostAttestation {
                ek_sha256: a.ek_sha256,
                ak_sha256: a.ak_sha256,
                ek_certificate: a.ek_certificate,
                pinned: a.pinned,
                last_unix,
                last_ok,
                last_detail,
                differing,
                allowlist_version: a.allowlist_version,
                group_allowlist_version: a.group_allowlist_version,
                fresh_until_unix: a.fresh_until_unix,
            }
        }),
    }
}

pub(crate) fn pending(r: crate::model::ReleaseRequest, attestation: String) -> pb::PendingRequest {
    pb::PendingRequest {
        id: r.id,
        host: r.host,
        guest_uuid: r.guest_uuid,
        guest_name: r.guest_name,
        volumes: r.volumes,
        state: r.state.to_string(),
        created_unix: r.created_unix,
        decided_unix: r.decided_unix,
        decided_by: r.decided_by,
        note: r.note,
        attestation,
    }
}

pub(crate) fn escrow(e: crate::model::EscrowEntry) -> pb::EscrowEntry {
    pb::EscrowEntry {
        id: e.id,
        volume_id: e.volume_id,
        volume_name: e.volume_name,
        host: e.host,
        generation: e.generation,
        recipients: e.recipients,
        reason: e.reason,
        requested_by: e.requested_by,
        requested_unix: e.requested_unix,
        state: e.state.to_string(),
        decided_by: e.decided_by,
        decided_unix: e.decided_unix,
        note: e.note,
        obsolete: e.obsolete,
        luks_uuid: e.luks_uuid,
        packet_bytes: e.packet_bytes,
    }
}

pub(crate) fn allowlist(a: crate::domain::allowlist::Allowlist) -> pb::Allowlist {
    pb::Allowlist {
        scope: a.scope.to_string(),
        target: a.target,
        version: a.version,
        pcrs: a
            .values
            .into_iter()
            .map(|(pcr, sha256)| pb::AllowedPcr {
                pcr: u32::from(pcr),
                sha256,
            })
            .collect(),
    }
}

pub(crate) fn volume(v: VolumeInfo) -> pb::Volume {
    let (phase, done, total) = match v.progress {
        Some(p) => (p.phase, p.done_bytes, p.total_bytes),
        None => (String::new(), 0, 0),
    };
    pb::Volume {
        release: v.release.to_string(),
        split: v.split,
        id: v.id,
        name: v.name,
        host: v.host,
        pool: v.pool,
        format: v.format.to_string(),
        capacity_bytes: v.capacity_bytes,
        key_generation: v.key_generation,
        state: v.state.to_string(),
        last_error: v.last_error,
        attempts: v.attempts,
        secret_uuid: v.secret_uuid,
        created_unix: v.created_unix,
        rekey_due_unix: v.rekey_due_unix,
        progress_phase: phase,
        progress_done_bytes: done,
        progress_total_bytes: total,
    }
}

pub(crate) fn guest(g: GuestInfo) -> pb::Guest {
    pb::Guest {
        uuid: g.uuid,
        name: g.name,
        host: g.host,
        state: g.state.to_string(),
        pending: g.pending.map(|p| p.to_string()).unwrap_or_default(),
        last_error: g.last_error,
        attempts: g.attempts,
        volumes: g.volumes,
        domain_xml: g.domain_xml,
        migrating_to: g.migrating_to.unwrap_or_default(),
    }
}

pub(crate) fn managed_pool(m: crate::model::ManagedPool) -> pb::ManagedPool {
    pb::ManagedPool {
        host: m.host,
        pool: m.pool,
        since_unix: m.since,
        by: m.by,
    }
}

pub(crate) fn pool_view(v: crate::domain::pools::PoolView) -> pb::PoolView {
    use crate::domain::pools::Offer;
    pb::PoolView {
        host: v.host,
        pool: v.pool,
        managed: v.managed.map(managed_pool),
        kind: v.kind,
        path: v.path,
        volumes: v
            .volumes
            .into_iter()
            .map(|e| {
                let mut out = pb::PoolVolumeView {
                    name: e.name,
                    path: e.path,
                    format: e.format,
                    capacity_bytes: e.capacity_bytes,
                    used_by: e
                        .used_by
                        .into_iter()
                        .map(|u| {
                            if u.running {
                                format!("{} (running)", u.domain)
                            } else {
                                u.domain
                            }
                        })
                        .collect(),
                    ..Default::default()
                };
                match e.offer {
                    Offer::Managed { id, state } => {
                        out.state = "managed".into();
                        out.volume_id = id;
                        out.volume_state = state.as_str().to_owned();
                    }
                    Offer::Cleartext {
                        offered,
                        command,
                        adopt,
                    } => {
                        out.state = if offered { "offered" } else { "cleartext" }.into();
                        out.command = command;
                        out.adopt_domain = adopt.unwrap_or_default();
                    }
                    Offer::NotOffered { why } => {
                        out.state = "not-offered".into();
                        out.detail = why;
                    }
                }
                out
            })
            .collect(),
    }
}

pub(crate) fn policy(p: Policy) -> pb::Policy {
    pb::Policy {
        scope: p.scope.to_string(),
        target: p.target,
        max_key_age_secs: p.max_key_age_secs,
        mode: p.mode.to_string(),
        after_migration_secs: p.after_migration_secs,
    }
}

/// A policy from the admin API: scope and mode parsed here.
pub(crate) fn policy_from(p: pb::Policy) -> Result<Policy, InvalidInput> {
    Ok(Policy {
        scope: p.scope.parse()?,
        target: p.target,
        max_key_age_secs: p.max_key_age_secs,
        mode: p.mode.parse()?,
        after_migration_secs: p.after_migration_secs,
    })
}

pub(crate) fn audit_record(r: AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        time_unix_ms: r.time_ms,
        actor: r.actor,
        action: r.action,
        subject: r.subject,
        detail: r.detail,
        hash: r.hash,
    }
}

pub(crate) fn verification(v: Verification) -> pb::VerifyAuditResponse {
    pb::VerifyAuditResponse {
        ok: v.ok,
        records: v.records,
        first_bad_seq: v.first_bad_seq,
        problem: v.problem,
        checkpoints: v.checkpoints,
    }
}

/// The gRPC status of a domain error.
pub(crate) fn status(e: CoreError) -> Status {
    let code = match &e {
        CoreError::Invalid(_) | CoreError::Xml(_) => Code::InvalidArgument,
        CoreError::NotFound(_) => Code::NotFound,
        CoreError::AlreadyExists(_) => Code::AlreadyExists,
        CoreError::FailedPrecondition(_) | CoreError::Unattested(_) | CoreError::Unapproved(_) => {
            Code::FailedPrecondition
        }
        CoreError::Denied(_) => Code::PermissionDenied,
        CoreError::Exhausted(_) => Code::ResourceExhausted,
        CoreError::Store(_)
        | CoreError::Ca(_)
        | CoreError::MasterKey(_)
        | CoreError::Internal(_) => {
            tracing::error!(error = %e, "internal error");
            Code::Internal
        }
    };
    Status::new(code, e.to_string())
}

/// Bad input caught while converting a request.
pub(crate) fn invalid(e: InvalidInput) -> Status {
    status(e.into())
}

pub(crate) fn sealed_key(k: SealedKey) -> agent::SealedKey {
    agent::SealedKey {
        volume_id: k.volume_id,
        generation: k.generation,
        sealed_packet: k.sealed,
    }
}

pub(crate) fn format(f: VolumeFormat) -> i32 {
    let f = match f {
        VolumeFormat::Qcow2 => agent::VolumeFormat::Qcow2,
        VolumeFormat::Raw => agent::VolumeFormat::Raw,
    };
    f as i32
}

pub(crate) fn rekey_kind(k: RekeyKind) -> i32 {
    let k = match k {
        RekeyKind::Shallow => agent::RekeyKind::Shallow,
        RekeyKind::Deep => agent::RekeyKind::Deep,
    };
    k as i32
}

/// A host's error status, classified, in words an operator can act on.
pub(crate) fn agent_error(host: &EnrolledHost, s: &Status) -> AgentError {
    let kind = match s.code() {
        Code::Unavailable => AgentErrorKind::Unreachable,
        Code::Aborted => AgentErrorKind::Declined,
        Code::FailedPrecondition | Code::InvalidArgument => AgentErrorKind::Refused,
        _ => AgentErrorKind::Failed,
    };
    let message = match s.code() {
        Code::Unavailable => format!(
            "host {} at {} is unreachable: {}",
            host.name,
            host.address,
            s.message()
        ),
        Code::DeadlineExceeded => format!(
            "host {} at {} did not answer in time: {}",
            host.name,
            host.address,
            s.message()
        ),
        _ => format!("host {} refused: {}", host.name, s.message()),
    };
    AgentError::new(kind, message)
}
