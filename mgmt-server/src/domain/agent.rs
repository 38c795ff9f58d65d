//! What the server asks of a host: the [`AgentClient`] trait, its request
//! and result types, and [`AgentError`], which says whether the host
//! refused, declined, could not be reached, or failed, so that callers
//! decide on retries without knowing the wire protocol.
//!
//! The one real implementation is the gRPC client in
//! `crate::transport::agents` (mutual TLS, one channel per host). Unit
//! tests use a fake that stands in for a host (`domain::fake_agent`).

use std::future::Future;
use std::pin::Pin;

use crate::model::{EnrolledHost, GuestState, RekeyKind, RekeyPlacement, VolumeFormat};

/// A boxed future that may move between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A key packet sealed to the receiving host (xdr-wipe `SealedPacket`
/// bytes: no clear key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    /// Volume id.
    pub volume_id: String,
    /// Key generation.
    pub generation: u64,
    /// The sealed packet.
    pub sealed: Vec<u8>,
}

/// Create a volume, or encrypt the existing cleartext one.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// Volume id.
    pub volume_id: String,
    /// libvirt pool.
    pub pool: String,
    /// libvirt volume name.
    pub name: String,
    /// Size (ignored when encrypting an existing volume).
    pub capacity_bytes: u64,
    /// Container format.
    pub format: VolumeFormat,
    /// libvirt secret UUID its `<encryption>` names.
    pub secret_uuid: String,
    /// Its key.
    pub key: SealedKey,
    /// Encrypt the existing cleartext volume instead of creating one.
    pub encrypt_existing: bool,
    /// The caller waits for the whole copy (hours), not a push's minute.
    pub wait_long: bool,
}

/// Where a host keeps a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOnHost {
    /// Its path ("" when it no longer exists).
    pub path: String,
    /// Its guest-visible size (0 when not known).
    pub capacity_bytes: u64,
}

/// Turn a volume back into cleartext.
#[derive(Debug, Clone)]
pub struct DecryptVolume {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// Volume id.
    pub volume_id: String,
    /// Its key.
    pub key: SealedKey,
}

/// Delete a volume and the host's copy of its key.
#[derive(Debug, Clone)]
pub struct DeleteVolume {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// Volume id.
    pub volume_id: String,
    /// libvirt pool.
    pub pool: String,
    /// libvirt volume name.
    pub name: String,
}

/// Rekey a volume from one generation to the next.
#[derive(Debug, Clone)]
pub struct Rekey {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// Volume id.
    pub volume_id: String,
    /// The current generation.
    pub from_generation: u64,
    /// Shallow or deep.
    pub kind: RekeyKind,
    /// The current key (the host may not hold it).
    pub old_key: SealedKey,
    /// The next generation's key.
    pub new_key: SealedKey,
    /// libvirt secret UUID for the new key.
    pub new_secret_uuid: String,
    /// Tied to the guest running, or not.
    pub placement: RekeyPlacement,
    /// Bytes per second at most (0: no limit).
    pub bandwidth: u64,
}

/// Define a guest with its disks' keys.
#[derive(Debug, Clone)]
pub struct DefineGuest {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// Domain XML with the `<encryption>` elements set.
    pub domain_xml: String,
    /// One key per managed disk.
    pub keys: Vec<SealedKey>,
}

/// A call about one guest (undefine, start, stop, abort a migration).
#[derive(Debug, Clone)]
pub struct GuestCall {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// The guest's UUID.
    pub guest_uuid: String,
}

/// A volume of a migrating guest, as the source host made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigratingVolume {
    /// Volume id.
    pub volume_id: String,
    /// libvirt pool.
    pub pool: String,
    /// libvirt volume name.
    pub name: String,
    /// Its path (shared storage: the same on both hosts).
    pub path: String,
    /// libvirt secret UUID.
    pub secret_uuid: String,
}

/// The destination of a migration: check the shared storage, store the keys.
#[derive(Debug, Clone)]
pub struct PrepareMigration {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// The guest's domain XML.
    pub domain_xml: String,
    /// Its keys, sealed to the destination.
    pub keys: Vec<SealedKey>,
    /// Its managed volumes.
    pub volumes: Vec<MigratingVolume>,
}

/// The source of a migration: have libvirt migrate the guest.
#[derive(Debug, Clone)]
pub struct MigrateGuest {
    /// Makes a repeated delivery harmless.
    pub op_id: String,
    /// The guest's UUID.
    pub guest_uuid: String,
    /// libvirt URI of the destination, as the source reaches it.
    pub destination_libvirt_uri: String,
    /// QEMU migration URI ("" for libvirt's default).
    pub migration_uri: String,
    /// Live migration.
    pub live: bool,
    /// As `virsh migrate --unsafe`.
    pub unsafe_: bool,
}

/// An attestation challenge: a quote of these PCRs with this nonce.
#[derive(Debug, Clone)]
pub struct AttestChallenge {
    /// Fresh random bytes.
    pub nonce: Vec<u8>,
    /// SHA-256 PCRs to quote.
    pub pcrs: Vec<u8>,
}

/// A host's answer: its TPM's quote, signature, and the values quoted.
#[derive(Debug, Clone)]
pub struct QuoteAnswer {
    /// `TPMS_ATTEST`.
    pub quote: Vec<u8>,
    /// `TPMT_SIGNATURE`.
    pub signature: Vec<u8>,
    /// (PCR, value).
    pub values: Vec<(u8, guestkey_protect::tpm::PcrValue)>,
}

/// Make an escrow packet of a volume: its passphrase and data key,
/// age-encrypted by the host to recipients its own configuration names.
#[derive(Debug, Clone)]
pub struct EscrowPacketCall {
    /// Volume id.
    pub volume_id: String,
    /// Its current key, sealed to the host.
    pub key: SealedKey,
    /// age X25519 recipients (`age1...`).
    pub recipients: Vec<String>,
    /// The request's id, written into the packet.
    pub packet_id: String,
    /// The host's name, as the server knows it.
    pub host_name: String,
    /// The volume's name.
    pub volume_name: String,
    /// Who asked (`admin:NAME`).
    pub requested_by: String,
    /// Who approved (`admin:NAME`).
    pub approved_by: String,
}

/// A packet a host made: ciphertext only the recipients open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscrowPacketMade {
    /// The age-encrypted packet (binary age format).
    pub packet: Vec<u8>,
    /// The LUKS header's UUID.
    pub luks_uuid: String,
}

/// A key a host holds (ids only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKeyInfo {
    /// Volume id.
    pub volume_id: String,
    /// Generation.
    pub generation: u64,
    /// Guest it is held for.
    pub guest_uuid: String,
}

/// What a host holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    /// Its keys (ids only).
    pub held: Vec<HeldKeyInfo>,
    /// The host's libvirt UUID.
    pub host_uuid: String,
}

/// Where a disk's image is on its host, as `guest adopt` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlace {
    /// Volume `volume` of the host's active libvirt pool `pool`.
    InPool {
        /// The pool.
        pool: String,
        /// The volume's name.
        volume: String,
    },
    /// The image exists; no active libvirt pool holds it.
    NotInPool,
    /// Nothing at the disk's source.
    Missing,
    /// The disk's `<driver type>` is neither qcow2 nor raw.
    OtherFormat,
}

/// One disk of a domain a host described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlace {
    /// `<target dev>`.
    pub target: String,
    /// The image's path on the host.
    pub path: String,
    /// Where it is.
    pub place: ImagePlace,
    /// The image says it is encrypted.
    pub encrypted: bool,
    /// The image has a backing file.
    pub backing: bool,
}

/// A domain a host's libvirt has (`guest adopt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDescription {
    /// Its UUID.
    pub uuid: String,
    /// Its state, as libvirt names it.
    pub state: String,
    /// Its persistent definition, without security information.
    pub xml: String,
    /// libvirt keeps a graphics or console password in it that `xml` lacks.
    pub security_info_withheld: bool,
    /// Its disks with an image source.
    pub disks: Vec<DiskPlace>,
}

/// A domain of a host's libvirt with a disk on a pool's volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUser {
    /// The domain's name.
    pub domain: String,
    /// It runs.
    pub running: bool,
}

/// A volume of a storage pool, as its host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVolume {
    /// Its name in the pool.
    pub name: String,
    /// Its path.
    pub path: String,
    /// The format libvirt found ("qcow2", "raw", "iso"...; may be empty).
    pub format: String,
    /// What qemu-img says of a qcow2 or raw image: (encrypted, backing
    /// file, virtual size); None for other formats.
    pub image: Option<Result<PoolImage, String>>,
    /// Domains with a disk on it.
    pub used_by: Vec<VolumeUser>,
    /// Names of the pool's images whose backing file it is.
    pub base_of: Vec<String>,
}

/// What an image says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolImage {
    /// Encrypted (qcow2 encryption or a LUKS header).
    pub encrypted: bool,
    /// It has a backing file.
    pub backing: bool,
    /// Guest-visible size.
    pub capacity_bytes: u64,
}

/// A storage pool of a host's libvirt and its volumes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolDescription {
    /// The pool's type ("dir", "logical"...).
    pub kind: String,
    /// Its target path.
    pub path: String,
    /// Its volumes, by name.
    pub volumes: Vec<PoolVolume>,
    /// Domains whose definition the host could not read.
    pub unreadable_domains: Vec<String>,
}

/// How a call to a host went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentErrorKind {
    /// No answer: the host is down or the network fails. Whether a
    /// mutating call took effect is not known.
    Unreachable,
    /// The host declined the request as it stands and changed nothing: a
    /// condition the admin set does not hold (a rekey `--online` without a
    /// running guest). Repeating it will not help.
    Declined,
    /// The host answered that it did not do it: bad input, or a state it
    /// cannot work from (no such volume, libvirt refused the XML).
    Refused,
    /// The host failed otherwise.
    Failed,
}

/// A call to a host that did not succeed, in words an operator can act
/// on (the host's name and address, and what it said).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// How.
    pub kind: AgentErrorKind,
    /// What, for the operator.
    pub message: String,
}

impl AgentError {
    /// An error of `kind`.
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Result of a call to a host.
pub type AgentResult<T> = Result<T, AgentError>;

/// Everything the server asks a host. Every mutating request carries an
/// operation id: the host answers a repeat with the first outcome, so a
/// retry after an unknown outcome is harmless.
pub trait AgentClient: Send + Sync {
    /// Makes sure the host can be reached now (cheap when a connection is
    /// open). Keys are released for a host only after this succeeds.
    fn connect<'a>(&'a self, host: &'a EnrolledHost) -> BoxFuture<'a, AgentResult<()>>;
    /// Creates (or encrypts) a volume.
    fn create_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: CreateVolume,
    ) -> BoxFuture<'a, AgentResult<VolumeOnHost>>;
    /// Turns a volume back into cleartext.
    fn decrypt_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: DecryptVolume,
    ) -> BoxFuture<'a, AgentResult<()>>;
    /// Deletes a volume.
    fn delete_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: DeleteVolume,
    ) -> BoxFuture<'a, AgentResult<()>>;
    /// Rekeys a volume; returns when the host is done.
    fn rekey<'a>(&'a self, host: &'a EnrolledHost, req: Rekey) -> BoxFuture<'a, AgentResult<()>>;
    /// Defines a guest; returns its state there.
    fn define_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: DefineGuest,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>>;
    /// Undefines a guest; the host erases its keys.
    fn undefine_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>>;
    /// Starts a guest; returns its state.
    fn start_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>>;
    /// Stops a guest; returns its state.
    fn stop_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>>;
    /// Destination: checks the shared storage and stores the guest's keys.
    fn prepare_migration<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: PrepareMigration,
    ) -> BoxFuture<'a, AgentResult<()>>;
    /// Destination: drops a prepared migration; returns the guest's state
    /// there (None when it is not there, the expected case).
    fn abort_migration<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>>;
    /// Source: migrates the guest (may take hours); returns its state on
    /// the destination.
    fn migrate_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: MigrateGuest,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>>;
    /// The domain `name_or_uuid` of the host's libvirt and where its
    /// disks' images are (changes nothing).
    fn describe_domain<'a>(
        &'a self,
        host: &'a EnrolledHost,
        name_or_uuid: &'a str,
    ) -> BoxFuture<'a, AgentResult<DomainDescription>>;
    /// The active storage pool `pool` of the host's libvirt and its
    /// volumes (changes nothing).
    fn describe_pool<'a>(
        &'a self,
        host: &'a EnrolledHost,
        pool: &'a str,
    ) -> BoxFuture<'a, AgentResult<PoolDescription>>;
    /// What the host holds.
    fn inventory<'a>(&'a self, host: &'a EnrolledHost) -> BoxFuture<'a, AgentResult<Inventory>>;
    /// A TPM quote for an attestation challenge (changes nothing).
    fn attest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: AttestChallenge,
    ) -> BoxFuture<'a, AgentResult<QuoteAnswer>>;
    /// An escrow packet of a volume (changes nothing).
    fn make_escrow_packet<'a>(
        &'a self,
        host: &'a EnrolledHost,
        req: EscrowPacketCall,
    ) -> BoxFuture<'a, AgentResult<EscrowPacketMade>>;
}
