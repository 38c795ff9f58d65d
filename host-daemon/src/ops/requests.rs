//! What the management server asks of this host, as domain values: the
//! gRPC layer ([`crate::grpc`]) turns each request into one of these,
//! checking every field at the edge, so the operations never see a
//! protobuf type or an unchecked string.

use crate::model::{Format, Name, Placement, RekeyKind, VolumeId};

/// A key packet as the server sealed it to this host.
pub struct SealedKey {
    /// Its volume.
    pub volume: VolumeId,
    /// Its generation.
    pub generation: u64,
    /// xdr-wipe SealedPacket bytes (no clear key).
    pub sealed: Vec<u8>,
}

/// Create a volume, or encrypt an existing cleartext one.
pub struct CreateVolume {
    /// Operation id: a repeat returns the first outcome.
    pub op_id: String,
    /// The volume.
    pub volume: VolumeId,
    /// libvirt pool.
    pub pool: Name,
    /// libvirt volume name.
    pub name: Name,
    /// Size of a new volume.
    pub capacity: u64,
    /// Container.
    pub format: Format,
    /// The libvirt secret UUID of its key.
    pub secret: uuid::Uuid,
    /// Its key.
    pub key: SealedKey,
    /// Encrypt the existing cleartext volume of that name instead.
    pub encrypt_existing: bool,
}

/// Turn a volume back into cleartext.
pub struct DecryptVolume {
    /// The volume.
    pub volume: VolumeId,
    /// Its key.
    pub key: SealedKey,
}

/// Delete a volume.
pub struct DeleteVolume {
    /// The volume.
    pub volume: VolumeId,
    /// libvirt pool.
    pub pool: Name,
    /// libvirt volume name.
    pub name: Name,
}

/// Define a guest with the keys of its encrypted disks.
pub struct DefineGuest {
    /// Domain XML as the server rewrote it.
    pub domain_xml: String,
    /// One key per managed disk.
    pub keys: Vec<SealedKey>,
}

/// Replace a volume's key.
pub struct Rekey {
    /// The volume.
    pub volume: VolumeId,
    /// The generation now active.
    pub from_generation: u64,
    /// Shallow or deep.
    pub kind: RekeyKind,
    /// The current key.
    pub old_key: SealedKey,
    /// The next generation.
    pub new_key: SealedKey,
    /// Where it may run.
    pub placement: Placement,
    /// Bytes per second at most (0: no limit).
    pub bandwidth: u64,
}

/// A volume of a guest migrating to this host.
pub struct MigratingVolume {
    /// The volume.
    pub volume: VolumeId,
    /// Its pool (the same name here).
    pub pool: Name,
    /// Its libvirt volume name.
    pub name: Name,
    /// Its path on the source (shared storage: the same here).
    pub path: String,
    /// The libvirt secret UUID of its key.
    pub secret: uuid::Uuid,
}

/// Get ready for an incoming migration.
pub struct PrepareMigration {
    /// The guest's domain XML.
    pub domain_xml: String,
    /// Its disks' keys, sealed to this host.
    pub keys: Vec<SealedKey>,
    /// Its managed volumes.
    pub volumes: Vec<MigratingVolume>,
}

/// Migrate a guest away.
pub struct MigrateGuest {
    /// The guest.
    pub guest: uuid::Uuid,
    /// The destination's libvirt URI.
    pub destination: String,
    /// QEMU's migration stream URI (None: libvirt's default).
    pub migration_uri: Option<String>,
    /// Live migration.
    pub live: bool,
    /// As `virsh migrate --unsafe`.
    pub unsafe_: bool,
}

/// A key this host holds, as reported to the server (ids only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKey {
    /// Volume.
    pub volume: String,
    /// Generation.
    pub generation: u64,
    /// The guest that holds it.
    pub guest: String,
}

/// Make an escrow packet of a volume.
pub struct EscrowPacket {
    /// The volume.
    pub volume: VolumeId,
    /// Its current key.
    pub key: SealedKey,
    /// age X25519 recipients, checked and without repeats.
    pub recipients: Vec<String>,
    /// The request's id on the server.
    pub packet_id: String,
    /// This host's name on the server.
    pub host_name: String,
    /// The volume's name on the server.
    pub volume_name: String,
    /// The admin who asked.
    pub requested_by: String,
    /// The admin who approved.
    pub approved_by: String,
}
