//! Conversions between the host-agent protobuf messages and the domain:
//! requests become [`crate::ops::requests`] values (every field checked
//! here, at the edge), errors become statuses. Nothing outside
//! [`crate::grpc`] sees a prost type.

use guestkey_proto::agent as pb;
use tonic::{Code, Status};

use crate::model::{
    Format, InvalidInput, Name, Placement, RekeyKind, VolumeId, canonical_uuid, volume_id,
};
use crate::ops::OpsError;
use crate::ops::requests::{
    CreateVolume, DecryptVolume, DefineGuest, DeleteVolume, EscrowPacket, HeldKey, MigrateGuest,
    MigratingVolume, PrepareMigration, Rekey, SealedKey,
};

/// The longest status message sent: tonic carries it in an HTTP/2 header,
/// and one over the peer's header limit breaks the whole call ("h2
/// protocol error"). Longer messages are cut, and logged whole here.
const MAX_MESSAGE: usize = 2000;

/// The status for an operation's error.
pub(super) fn status(e: OpsError) -> Status {
    let code = match &e {
        OpsError::Invalid(_) | OpsError::Packet(_) => Code::InvalidArgument,
        OpsError::Precondition(_) | OpsError::Libvirt(_) | OpsError::Image(_) => {
            Code::FailedPrecondition
        }
        OpsError::Aborted(_) => Code::Aborted,
        OpsError::Remote(_) => Code::Unavailable,
        OpsError::Store(_) | OpsError::Internal(_) => Code::Internal,
    };
    let mut message = e.to_string();
    if message.len() > MAX_MESSAGE {
        tracing::warn!(error = %message, "error message cut for the gRPC status");
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("... (cut: the whole message is in guestkeyd's log)");
    }
    Status::new(code, message)
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m.into())
}

fn edge(e: InvalidInput) -> Status {
    invalid(e.0)
}

fn sealed_key(k: Option<pb::SealedKey>, what: &str, volume: VolumeId) -> Result<SealedKey, Status> {
    let k = k.ok_or_else(|| invalid(format!("no {what}")))?;
    let v = volume_id(&k.volume_id).map_err(edge)?;
    if v != volume {
        return Err(invalid(format!("the {what} is for another volume")));
    }
    Ok(SealedKey {
        volume: v,
        generation: k.generation,
        sealed: k.sealed_packet,
    })
}

fn keys(keys: Vec<pb::SealedKey>) -> Result<Vec<SealedKey>, Status> {
    keys.into_iter()
        .map(|k| {
            Ok(SealedKey {
                volume: volume_id(&k.volume_id).map_err(edge)?,
                generation: k.generation,
                sealed: k.sealed_packet,
            })
        })
        .collect()
}

fn format(f: i32) -> Result<Format, Status> {
    match pb::VolumeFormat::try_from(f) {
        Ok(pb::VolumeFormat::Qcow2) => Ok(Format::Qcow2),
        Ok(pb::VolumeFormat::Raw) => Ok(Format::Raw),
        _ => Err(invalid(format!("volume format {f} is not qcow2 or raw"))),
    }
}

/// `CreateVolume`.
pub(super) fn create_volume(r: pb::CreateVolumeRequest) -> Result<CreateVolume, Status> {
    let volume = volume_id(&r.volume_id).map_err(edge)?;
    Ok(CreateVolume {
        pool: Name::parse("pool name", &r.pool).map_err(edge)?,
        name: Name::parse("volume name", &r.name).map_err(edge)?,
        secret: canonical_uuid("secret_uuid", &r.secret_uuid).map_err(edge)?,
        format: format(r.format)?,
        key: sealed_key(r.key, "key packet", volume)?,
        capacity: r.capacity_bytes,
        encrypt_existing: r.encrypt_existing,
        op_id: r.op_id,
        volume,
    })
}

/// `DecryptVolume`.
pub(super) fn decrypt_volume(r: pb::DecryptVolumeRequest) -> Result<DecryptVolume, Status> {
    let volume = volume_id(&r.volume_id).map_err(edge)?;
    Ok(DecryptVolume {
        volume,
        key: sealed_key(r.key, "key packet", volume)?,
    })
}

/// `DeleteVolume`.
pub(super) fn delete_volume(r: pb::DeleteVolumeRequest) -> Result<DeleteVolume, Status> {
    Ok(DeleteVolume {
        volume: volume_id(&r.volume_id).map_err(edge)?,
        pool: Name::parse("pool name", &r.pool).map_err(edge)?,
        name: Name::parse("volume name", &r.name).map_err(edge)?,
    })
}

/// `DefineGuest`.
pub(super) fn define_guest(r: pb::DefineGuestRequest) -> Result<DefineGuest, Status> {
    Ok(DefineGuest {
        domain_xml: r.domain_xml,
        keys: keys(r.keys)?,
    })
}

/// A guest UUID from a request.
pub(super) fn guest_uuid(s: &str) -> Result<String, Status> {
    canonical_uuid("guest_uuid", s)
        .map(|u| u.hyphenated().to_string())
        .map_err(edge)
}

/// `Rekey`.
pub(super) fn rekey(r: pb::RekeyRequest) -> Result<Rekey, Status> {
    let volume = volume_id(&r.volume_id).map_err(edge)?;
    let kind = match pb::RekeyKind::try_from(r.kind) {
        Ok(pb::RekeyKind::Shallow) => RekeyKind::Shallow,
        Ok(pb::RekeyKind::Deep) => RekeyKind::Deep,
        _ => return Err(invalid("rekey kind must be shallow or deep")),
    };
    let placement = match r.placement.as_str() {
        "" => Placement::Any,
        "online" => Placement::Online,
        "offline" => Placement::Offline,
        other => {
            return Err(invalid(format!(
                "placement {other:?} is not online, offline or empty"
            )));
        }
    };
    Ok(Rekey {
        volume,
        from_generation: r.from_generation,
        kind,
        old_key: sealed_key(r.old_key, "old key packet", volume)?,
        new_key: sealed_key(r.new_key, "new key packet", volume)?,
        placement,
        bandwidth: r.bandwidth_bytes_per_sec,
    })
}

/// `PrepareMigration`.
pub(super) fn prepare_migration(
    r: pb::PrepareMigrationRequest,
) -> Result<PrepareMigration, Status> {
    let volumes = r
        .volumes
        .into_iter()
        .map(|v| {
            Ok(MigratingVolume {
                volume: volume_id(&v.volume_id).map_err(edge)?,
                pool: Name::parse("pool name", &v.pool).map_err(edge)?,
                name: Name::parse("volume name", &v.name).map_err(edge)?,
                secret: canonical_uuid("secret_uuid", &v.secret_uuid).map_err(edge)?,
                path: if v.path.starts_with('/') {
                    v.path
                } else {
                    return Err(invalid(format!("volume path {:?} is not absolute", v.path)));
                },
            })
        })
        .collect::<Result<_, Status>>()?;
    Ok(PrepareMigration {
        domain_xml: r.domain_xml,
        keys: keys(r.keys)?,
        volumes,
    })
}

/// `MigrateGuest`.
pub(super) fn migrate_guest(r: pb::MigrateGuestRequest) -> Result<MigrateGuest, Status> {
    if r.destination_libvirt_uri.is_empty() {
        return Err(invalid("no destination libvirt URI"));
    }
    Ok(MigrateGuest {
        guest: canonical_uuid("guest_uuid", &r.guest_uuid).map_err(edge)?,
        destination: r.destination_libvirt_uri,
        migration_uri: (!r.migration_uri.is_empty()).then_some(r.migration_uri),
        live: r.live,
        unsafe_: r.r#unsafe,
    })
}

/// A held key for the inventory.
pub(super) fn held(k: HeldKey) -> pb::HeldKeyInfo {
    pb::HeldKeyInfo {
        volume_id: k.volume,
        generation: k.generation,
        guest_uuid: k.guest,
    }
}

/// A described domain, as the host-agent API sends it (no key in it: see
/// `DomainDescription` in agent.proto).
pub(super) fn domain_description(d: crate::ops::DomainDescription) -> pb::DomainDescription {
    use crate::ops::ImagePlace;
    pb::DomainDescription {
        guest_uuid: d.uuid,
        state: d.state.as_str().to_owned(),
        domain_xml: d.xml,
        security_info_withheld: d.security_info_withheld,
        disks: d
            .disks
            .into_iter()
            .map(|p| {
                let (lookup, pool, volume) = match p.place {
                    ImagePlace::InPool { pool, volume } => (pb::DiskLookup::InPool, pool, volume),
                    ImagePlace::NotInPool => {
                        (pb::DiskLookup::NotInPool, String::new(), String::new())
                    }
                    ImagePlace::Missing => (pb::DiskLookup::Missing, String::new(), String::new()),
                    ImagePlace::OtherFormat => {
                        (pb::DiskLookup::OtherFormat, String::new(), String::new())
                    }
                };
                pb::DiskPlace {
                    target: p.target,
                    lookup: lookup as i32,
                    path: p.path,
                    pool,
                    volume,
                    encrypted: p.info.is_some_and(|i| i.encrypted),
                    backing: p.info.is_some_and(|i| i.backing),
                    capacity_bytes: p.info.map_or(0, |i| i.virtual_size),
                }
            })
            .collect(),
    }
}

pub(super) fn pool_description(d: crate::ops::PoolDescription) -> pb::PoolDescription {
    pb::PoolDescription {
        kind: d.kind,
        path: d.path,
        volumes: d
            .volumes
            .into_iter()
            .map(|v| {
                let (info, unreadable) = match v.info {
                    Some(Ok(i)) => (Some(i), String::new()),
                    Some(Err(why)) => (None, why),
                    None => (None, String::new()),
                };
                pb::PoolVolume {
                    name: v.name,
                    path: v.path,
                    format: v.format,
                    inspected: info.is_some(),
                    encrypted: info.is_some_and(|i| i.encrypted),
                    backing: info.is_some_and(|i| i.backing),
                    capacity_bytes: info.map_or(0, |i| i.virtual_size),
                    unreadable,
                    used_by: v
                        .used_by
                        .into_iter()
                        .map(|u| pb::VolumeUser {
                            domain: u.domain,
                            running: u.running,
                        })
                        .collect(),
                    base_of: v.base_of,
                }
            })
            .collect(),
        unreadable_domains: d.unreadable_domains,
    }
}

/// A text the server writes into an escrow packet: one line, bounded.
fn packet_text(what: &str, v: String) -> Result<String, Status> {
    if v.is_empty() || v.len() > 255 || v.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must be 1 to 255 bytes of text without control characters"
        )));
    }
    Ok(v)
}

/// `MakeEscrowPacket`.
pub(super) fn escrow_packet(r: pb::EscrowPacketRequest) -> Result<EscrowPacket, Status> {
    let volume = volume_id(&r.volume_id).map_err(edge)?;
    let max = crate::escrow::MAX_RECIPIENTS;
    if r.recipients.is_empty() || r.recipients.len() > max {
        return Err(invalid(format!(
            "an escrow packet needs 1 to {max} recipients"
        )));
    }
    let mut recipients: Vec<String> = vec![];
    for text in r.recipients {
        crate::escrow::parse_recipient(&text).map_err(|e| invalid(e.0))?;
        if text != text.trim() {
            return Err(invalid(format!(
                "recipient {} has spaces around it",
                crate::escrow::recipient_label(text.trim())
            )));
        }
        if recipients.contains(&text) {
            return Err(invalid(format!(
                "recipient {} is given twice",
                crate::escrow::recipient_label(&text)
            )));
        }
        recipients.push(text);
    }
    Ok(EscrowPacket {
        volume,
        key: sealed_key(r.key, "key packet", volume)?,
        recipients,
        packet_id: packet_text("packet_id", r.packet_id)?,
        host_name: packet_text("host_name", r.host_name)?,
        volume_name: packet_text("volume_name", r.volume_name)?,
        requested_by: packet_text("requested_by", r.requested_by)?,
        approved_by: packet_text("approved_by", r.approved_by)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_to_fit_a_header() {
        let s = status(OpsError::Precondition("é".repeat(5000)));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(
            s.message().len() < MAX_MESSAGE + 80,
            "{}",
            s.message().len()
        );
        assert!(s.message().ends_with("guestkeyd's log)"));
    }

    #[test]
    fn unknown_formats_and_loose_ids_are_refused() {
        let v = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let req = |format: i32, volume: &str| pb::CreateVolumeRequest {
            op_id: "o".into(),
            volume_id: volume.into(),
            pool: "p".into(),
            name: "n".into(),
            capacity_bytes: 1,
            format,
            secret_uuid: v.into(),
            key: Some(pb::SealedKey {
                volume_id: volume.into(),
                generation: 1,
                sealed_packet: vec![],
            }),
            encrypt_existing: false,
        };
        assert!(create_volume(req(pb::VolumeFormat::Raw as i32, v)).is_ok());
        let e = create_volume(req(77, v)).err().unwrap();
        assert!(e.message().contains("not qcow2 or raw"), "{}", e.message());
        let e = create_volume(req(1, &v.to_uppercase())).err().unwrap();
        assert!(e.message().contains("canonical"), "{}", e.message());
    }
}
