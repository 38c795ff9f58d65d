//! What the admin sees of hosts, volumes, guests, policies and the audit
//! log, and who is calling. None of these holds key material.

use xdr_wipe::seal::HostPublicKey;

use crate::model::states::{
    EscrowState, GuestOp, GuestState, HostState, PolicyScope, RekeyKind, RekeyPlacement,
    ReleasePolicy, RequestState, VolumeFormat, VolumeOp, VolumeState,
};

/// A host as the admin sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// Where it is in its life.
    pub state: HostState,
    /// Registered at (Unix seconds).
    pub created_unix: i64,
    /// Enrolled at (0 before).
    pub enrolled_unix: i64,
    /// SHA-256 of its certificate, hex (empty before enrollment).
    pub certificate_sha256: String,
    /// Volumes assigned to it.
    pub volume_count: u32,
    /// Keys it last reported holding.
    pub held_keys: u32,
    /// When it last reported (0: never).
    pub inventory_reported_unix: i64,
    /// libvirt URI for migrations to it ("" for the default).
    pub libvirt_uri: String,
    /// QEMU migration URI for guests coming to it ("": libvirt's choice).
    pub migration_uri: String,
    /// What it last reported of its keys sealed to its TPM.
    pub tpm: Option<HostTpm>,
    /// Its TPM identity and last attestation (None: enrolled without a
    /// TPM).
    pub attestation: Option<HostAttestation>,
    /// Its host group ("" for none): the group's allowlist applies too.
    pub group: String,
}

/// A host's TPM identity and its last attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAttestation {
    /// SHA-256 of the EK's public area, hex.
    pub ek_sha256: String,
    /// SHA-256 of the AK's public area, hex.
    pub ak_sha256: String,
    /// Whether the TPM presented an EK certificate.
    pub ek_certificate: bool,
    /// Whether the AK was proven to live in the EK's TPM.
    pub pinned: bool,
    /// The last attestation.
    pub last: Option<AttestationOutcome>,
    /// The host's own allowlist version (0: none).
    pub allowlist_version: u64,
    /// Its group's allowlist version (0: no group, or none).
    pub group_allowlist_version: u64,
    /// Until when the last passed attestation counts (0: it does not).
    pub fresh_until_unix: i64,
}

/// The outcome of one attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationOutcome {
    /// When (Unix seconds).
    pub at_unix: i64,
    /// Whether it passed.
    pub ok: bool,
    /// Why not (or what passed).
    pub detail: String,
    /// PCRs whose quoted value the allowlist does not name.
    pub differing: Vec<u8>,
}

/// A host's request for the keys of a guest whose release needs an
/// operator's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// Its id (`rq-` and 12 hex digits), what the operator names.
    pub id: String,
    /// The host that asks.
    pub host: String,
    /// The guest.
    pub guest_uuid: String,
    /// Its name.
    pub guest_name: String,
    /// Names of the volumes whose keys it asks for.
    pub volumes: Vec<String>,
    /// Where it is.
    pub state: RequestState,
    /// Made at (Unix seconds).
    pub created_unix: i64,
    /// Decided at (0: not yet).
    pub decided_unix: i64,
    /// Who decided (`admin:NAME`).
    pub decided_by: String,
    /// The operator's note.
    pub note: String,
}

/// A request for an escrow packet of a volume (`guestkeyctl volume
/// escrow`), and once a second admin approved it, the packet the host
/// made (its ciphertext is read apart: [`EscrowEntry::packet_bytes`] only
/// says how big it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscrowEntry {
    /// Its id (`es-` and 12 hex digits).
    pub id: String,
    /// The volume's UUID.
    pub volume_id: String,
    /// Its name when asked.
    pub volume_name: String,
    /// Its host when asked.
    pub host: String,
    /// The key generation the packet holds (the volume's when asked).
    pub generation: u64,
    /// age X25519 recipients (`age1...`), as given.
    pub recipients: Vec<String>,
    /// Why, as the requester said.
    pub reason: String,
    /// Who asked (`admin:NAME`).
    pub requested_by: String,
    /// Asked at (Unix seconds).
    pub requested_unix: i64,
    /// Where it is.
    pub state: EscrowState,
    /// Who decided (`admin:NAME`; "" while pending).
    pub decided_by: String,
    /// Decided at (0: not yet).
    pub decided_unix: i64,
    /// The decider's note.
    pub note: String,
    /// The LUKS header's UUID the host read ("" until made).
    pub luks_uuid: String,
    /// Bytes of the packet (0 until made).
    pub packet_bytes: u64,
    /// Made, and its generation is no longer the volume's (rekeyed,
    /// deleted or decrypted since): what it holds opens nothing now.
    pub obsolete: bool,
}

/// A TPM's clock and boot counters, as its last passed quote said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpmClock {
    /// Milliseconds.
    pub clock: u64,
    /// Resets (reboots).
    pub reset_count: u32,
    /// Restarts since the last reset.
    pub restart_count: u32,
}

/// A host's keys sealed to its TPM, as it reported them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostTpm {
    /// The TCTI.
    pub tcti: String,
    /// The PCR selection (`sha256:7`).
    pub pcrs: String,
    /// The PCR authority's fingerprint.
    pub authority: String,
    /// (PCR, SHA-256 hex) as the host read them.
    pub current: Vec<(u8, String)>,
    /// Approvals it keeps.
    pub approvals: u32,
    /// Whether its keys unseal now.
    pub unseals: bool,
    /// When it reported (Unix seconds).
    pub reported_unix: i64,
}

/// A host allowed to receive keys.
#[derive(Debug, Clone)]
pub struct EnrolledHost {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// Packet-sealing public key.
    pub sealing_key: HostPublicKey,
    /// SHA-256 (hex) of the certificate it enrolled with: the only one the
    /// server accepts from it when it calls it.
    pub cert_sha256: String,
}

/// A pending rekey as the admin asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RekeyOrder {
    /// Shallow or deep.
    pub kind: RekeyKind,
    /// Tied to the guest running, or not.
    pub placement: RekeyPlacement,
    /// Bytes per second at most (0: no limit).
    pub bandwidth: u64,
}

/// A volume as the admin sees it. Holds no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// UUID.
    pub id: String,
    /// Name, unique among live volumes.
    pub name: String,
    /// Host it lives on.
    pub host: String,
    /// libvirt storage pool on that host.
    pub pool: String,
    /// Container format.
    pub format: VolumeFormat,
    /// Size in bytes.
    pub capacity_bytes: u64,
    /// Current key generation.
    pub key_generation: u64,
    /// Where it is in its life.
    pub state: VolumeState,
    /// Last error of a pending operation.
    pub last_error: String,
    /// Push attempts of the pending operation.
    pub attempts: u32,
    /// Of those, attempts the host answered with an error (or the server
    /// could not prepare): the ones that count towards giving up.
    pub failures: u32,
    /// The operation given up, while the state is `failed`.
    pub failed_op: Option<VolumeOp>,
    /// libvirt secret UUID for this volume's key on the host.
    pub secret_uuid: String,
    /// Created at (Unix seconds).
    pub created_unix: i64,
    /// A deep rekey is due at this time (after a migration), 0 if none.
    pub rekey_due_unix: i64,
    /// Where the host keeps it ("" until the host reported it).
    pub path: String,
    /// The rekey asked for, while the state is `rekeying` (or `failed`
    /// with a rekey given up).
    pub rekey: Option<RekeyOrder>,
    /// The host's progress on the pending operation, while it runs.
    pub progress: Option<Progress>,
    /// What a release of its key needs.
    pub release: ReleasePolicy,
    /// Its key is one half of a split passphrase (a verifier keeps the
    /// other).
    pub split: bool,
}

/// A host's progress on a long volume operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// e.g. "re-encrypting".
    pub phase: String,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all (0: not known).
    pub total_bytes: u64,
    /// Reporting host.
    pub host: String,
    /// When reported.
    pub at: Option<std::time::Instant>,
}

/// A guest as the admin sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// libvirt domain UUID.
    pub uuid: String,
    /// libvirt domain name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Last known state.
    pub state: GuestState,
    /// Operation waiting for the host.
    pub pending: Option<GuestOp>,
    /// Last error of the pending operation.
    pub last_error: String,
    /// Attempts of the pending operation.
    pub attempts: u32,
    /// Of those, attempts that count towards giving up (see
    /// [`VolumeInfo::failures`]).
    pub failures: u32,
    /// Managed volumes it uses, by name.
    pub volumes: Vec<String>,
    /// Domain XML as sent to the host.
    pub domain_xml: String,
    /// Host it is migrating to, while it does.
    pub migrating_to: Option<String>,
}

/// A storage pool of a host marked managed: `pool offers` and the console
/// offer every cleartext volume in it for encryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedPool {
    /// The host.
    pub host: String,
    /// The libvirt pool's name.
    pub pool: String,
    /// Marked at (Unix seconds).
    pub since: i64,
    /// Marked by (the admin's name).
    pub by: String,
}

/// Volumes whose rekey is overdue, as the metrics show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overdue {
    /// Volumes (not deleted, not rekeying) whose key is older than their
    /// policy allows, or whose after-migration rekey is past due.
    pub volumes: u64,
    /// When the most overdue one became due (Unix seconds; 0: none).
    pub oldest_due: i64,
}

/// A rotation policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What it names.
    pub scope: PolicyScope,
    /// Pool name, or volume (name or UUID as given; UUID once stored).
    pub target: String,
    /// Maximum key age.
    pub max_key_age_secs: u64,
    /// Shallow or deep.
    pub mode: RekeyKind,
    /// Deep rekey this long after a migration (0: at once).
    pub after_migration_secs: u64,
}

/// The caller of an API, as identified by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin credential.
    Admin(String),
    /// An enrolled, non-revoked host.
    Host(String),
    /// The server's own rotation scheduler.
    Scheduler,
}

impl Caller {
    /// `admin:NAME`, `host:NAME` or `server:scheduler`, for the audit log.
    pub fn actor(&self) -> String {
        match self {
            Self::Admin(n) => format!("admin:{n}"),
            Self::Host(n) => format!("host:{n}"),
            Self::Scheduler => "server:scheduler".to_owned(),
        }
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Who: `admin:<name>`, `host:<name>`, `server`, or `unauthenticated`.
    pub actor: String,
    /// What, e.g. `key.created`, `key.released`, `host.enrolled`, `refused`.
    pub action: String,
    /// On what: a volume id, a host name.
    pub subject: String,
    /// Free text; never key material.
    pub detail: String,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
    /// HMAC of its seq and hash under the audit key (hex; "" for records
    /// written before MACs existed).
    pub mac: String,
}

/// Outcome of a chain verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Whether the whole chain verified.
    pub ok: bool,
    /// Records checked.
    pub records: u64,
    /// First bad record (0 when ok).
    pub first_bad_seq: u64,
    /// What is wrong (empty when ok).
    pub problem: String,
    /// Signed heads checked against the log (checkpoints and a kept head).
    pub checkpoints: u64,
}
