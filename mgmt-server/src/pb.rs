//! Conversions between domain types and protobuf messages, and from domain
//! errors to gRPC statuses. Nothing else touches prost types.

use guestkey_proto::admin as pb;
use tonic::{Code, Status};

use crate::audit::{AuditRecord, Verification};
use crate::core::{CoreError, HostInfo};
use crate::volumes::VolumeInfo;

pub(crate) fn host(h: HostInfo) -> pb::Host {
    pb::Host {
        name: h.name,
        address: h.address,
        state: h.state,
        created_unix: h.created_unix,
        enrolled_unix: h.enrolled_unix,
        certificate_sha256: h.certificate_sha256,
        volume_count: h.volume_count,
        held_keys: h.held_keys,
        inventory_reported_unix: h.inventory_reported_unix,
        libvirt_uri: h.libvirt_uri,
        migration_uri: h.migration_uri,
    }
}

pub(crate) fn volume(v: VolumeInfo) -> pb::Volume {
    pb::Volume {
        id: v.id,
        name: v.name,
        host: v.host,
        pool: v.pool,
        format: v.format,
        capacity_bytes: v.capacity_bytes,
        key_generation: v.key_generation,
        state: v.state,
        last_error: v.last_error,
        attempts: v.attempts,
        secret_uuid: v.secret_uuid,
        created_unix: v.created_unix,
        rekey_due_unix: v.rekey_due_unix,
        progress_phase: v
            .progress
            .as_ref()
            .map(|p| p.phase.clone())
            .unwrap_or_default(),
        progress_done_bytes: v.progress.as_ref().map_or(0, |p| p.done_bytes),
        progress_total_bytes: v.progress.as_ref().map_or(0, |p| p.total_bytes),
    }
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
    }
}

pub(crate) fn status(e: CoreError) -> Status {
    let code = match &e {
        CoreError::Invalid(_) | CoreError::Xml(_) => Code::InvalidArgument,
        CoreError::NotFound(_) => Code::NotFound,
        CoreError::AlreadyExists(_) => Code::AlreadyExists,
        CoreError::FailedPrecondition(_) => Code::FailedPrecondition,
        CoreError::Denied(_) => Code::PermissionDenied,
        CoreError::Exhausted(_) => Code::ResourceExhausted,
        CoreError::Db(_) | CoreError::Ca(_) | CoreError::MasterKey(_) | CoreError::Internal(_) => {
            tracing::error!(error = %e, "internal error");
            Code::Internal
        }
    };
    Status::new(code, e.to_string())
}

pub(crate) fn guest(g: crate::guests::GuestInfo) -> pb::Guest {
    pb::Guest {
        uuid: g.uuid,
        name: g.name,
        host: g.host,
        state: g.state,
        pending: g.pending,
        last_error: g.last_error,
        attempts: g.attempts,
        volumes: g.volumes,
        domain_xml: g.domain_xml,
        migrating_to: g.migrating_to,
    }
}

pub(crate) fn policy(p: crate::policy::Policy) -> pb::Policy {
    pb::Policy {
        scope: p.scope,
        target: p.target,
        max_key_age_secs: p.max_key_age_secs,
        mode: p.mode,
        after_migration_secs: p.after_migration_secs,
    }
}

pub(crate) fn policy_from(p: pb::Policy) -> crate::policy::Policy {
    crate::policy::Policy {
        scope: p.scope,
        target: p.target,
        max_key_age_secs: p.max_key_age_secs,
        mode: p.mode,
        after_migration_secs: p.after_migration_secs,
    }
}
