//! The store: every SQL statement of the server, behind traits of ours.
//!
//! [`Store`] hands out transactions ([`Tx`]); a transaction's methods are
//! grouped by what they touch ([`MetaStore`], [`AuditStore`],
//! [`HostStore`], [`VolumeStore`], [`GuestStore`], [`PolicyStore`],
//! [`MigrationStore`]). Domain code begins a transaction, calls these
//! methods, appends its audit record and commits: one mutation, one
//! transaction. Dropping a transaction without committing rolls it back.
//!
//! The traits are synchronous, and a write transaction is exclusive (SQLite:
//! `BEGIN IMMEDIATE`; a PostgreSQL backend takes a transaction-scoped
//! advisory lock at begin), so domain code never sees a serialisation
//! failure and never needs a retry loop. Callers on an async runtime run
//! domain code on a blocking thread (see `domain::Core::blocking`); because
//! the code inside a transaction cannot `.await`, no transaction is ever
//! held open across a call to a host. `docs/server.md` says why this shape
//! was chosen over an async store.
//!
//! Implementations: [`sqlite::SqliteStore`] (file or `:memory:` for tests),
//! with the schema and its migrations in [`sqlite::schema`].
//!
//! May import: `model` only (and its database crate, inside the
//! implementation's folder). Imported by `domain`, `init` and the programs;
//! `transport` and `scheduler` reach it only through `domain`.

pub mod postgres;
pub mod sql;
pub mod sqlite;

use crate::model::{
    AllowScope, AttestationOutcome, AuditRecord, EscrowEntry, EscrowState, GuestInfo, GuestOp,
    GuestState, HostInfo, HostState, ManagedPool, Overdue, Policy, PolicyScope, RekeyKind,
    RekeyOrder, ReleasePolicy, ReleaseRequest, RequestState, StoreError, TpmClock, VolumeFormat,
    VolumeInfo, VolumeOp, VolumeState,
};

/// What a transaction is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only (may run beside other readers).
    Read,
    /// Reads and writes; exclusive until commit or rollback.
    Write,
}

/// A database of the server.
pub trait Store: Send + Sync {
    /// Begins a transaction.
    fn begin(&self, access: Access) -> Result<Box<dyn Tx + '_>>;
    /// The round trips to the database so far, and the time callers
    /// waited for them.
    fn stats(&self) -> StoreStats;
}

/// What the database cost its callers so far ([`Store::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Round trips: on PostgreSQL every call to the server (begin, each
    /// statement, commit, prepare, connect); on SQLite every call into the
    /// engine (begin, each statement, commit).
    pub round_trips: u64,
    /// Time callers spent in them (summed over threads), in nanoseconds.
    pub waited_ns: u64,
}

impl StoreStats {
    /// What happened between `before` and `self`.
    pub fn since(self, before: StoreStats) -> StoreStats {
        StoreStats {
            round_trips: self.round_trips.saturating_sub(before.round_trips),
            waited_ns: self.waited_ns.saturating_sub(before.waited_ns),
        }
    }
}

/// The counters behind [`StoreStats`], kept by each engine.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    round_trips: std::sync::atomic::AtomicU64,
    waited_ns: std::sync::atomic::AtomicU64,
}

impl Counters {
    /// Counts one round trip that began at `started`.
    pub(crate) fn count(&self, started: std::time::Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        self.round_trips.fetch_add(1, Relaxed);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(ns, Relaxed);
    }

    pub(crate) fn stats(&self) -> StoreStats {
        use std::sync::atomic::Ordering::Relaxed;
        StoreStats {
            round_trips: self.round_trips.load(Relaxed),
            waited_ns: self.waited_ns.load(Relaxed),
        }
    }
}

/// One transaction: everything the domain may read or change.
pub trait Tx:
    MetaStore
    + AuditStore
    + HostStore
    + VolumeStore
    + GuestStore
    + PolicyStore
    + MigrationStore
    + AttestStore
    + ApprovalStore
    + HalfStore
    + LeaseStore
    + EscrowStore
    + RecoveryStore
{
    /// Makes the transaction's changes durable. Without it they are rolled
    /// back when the transaction is dropped.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Result of store calls.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A volume key as stored: ciphertext under the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Id of the master key it is wrapped under.
    pub master_key_id: String,
    /// nonce || ciphertext || tag.
    pub wrapped: Vec<u8>,
}

/// Server-wide values and the admin credential.
pub trait MetaStore {
    /// Id of the master key every stored key is wrapped under.
    fn master_key_id(&mut self) -> Result<Option<String>>;
    /// Records a new master key id (a rotation, or init).
    fn set_master_key_id(&mut self, id: &str) -> Result<()>;
    /// Name of the admin whose certificate has this SHA-256.
    fn admin_by_cert(&mut self, cert_sha256: &str) -> Result<Option<String>>;
    /// Records the admin credential.
    fn insert_admin(&mut self, cert_sha256: &str, name: &str, created: i64) -> Result<()>;
    /// The admin credentials: (name, certificate SHA-256, created), by name.
    fn admins(&mut self) -> Result<Vec<(String, String, i64)>>;
    /// Removes the credentials named `name`; how many there were.
    fn delete_admin(&mut self, name: &str) -> Result<usize>;
    /// Makes this the only admin certificate (`migrate-roles`: the admin
    /// CA's); returns how many others no longer authenticate.
    fn replace_admins(&mut self, cert_sha256: &str, name: &str, created: i64) -> Result<usize>;
}

/// The audit log's rows (the chain logic is `domain::audit`).
pub trait AuditStore {
    /// The newest record's (seq, hash) as kept beside the log.
    fn audit_head(&mut self) -> Result<Option<(u64, String)>>;
    /// Appends a record and moves the head to it.
    fn append_audit(&mut self, record: &AuditRecord) -> Result<()>;
    /// Records after `after_seq`, oldest first, at most `limit`.
    fn list_audit(&mut self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>>;
    /// One record.
    fn audit_record(&mut self, seq: u64) -> Result<Option<AuditRecord>>;
    /// The newest `limit` records about `subject`, oldest first.
    fn audit_of(&mut self, subject: &str, limit: u32) -> Result<Vec<AuditRecord>>;
    /// The audit key, wrapped under the master key.
    fn audit_key(&mut self) -> Result<Option<WrappedKey>>;
    /// Stores (or, re-wrapped, replaces) the audit key.
    fn put_audit_key(&mut self, key: &WrappedKey, created: i64) -> Result<()>;
}

/// A signed-in console login (the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of its token.
    pub token_hash: Vec<u8>,
    /// The login.
    pub login: String,
    /// The tag of the login's password at sign-in.
    pub tag: Vec<u8>,
    /// Its CSRF token.
    pub csrf: String,
    /// Signed in at (Unix ms).
    pub started_ms: i64,
    /// Last used at (Unix ms; updated at most every half minute).
    pub last_ms: i64,
}

/// A host registered for enrollment.
#[derive(Debug, Clone)]
pub struct NewHost {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// Hash of its one-time token.
    pub token_hash: Vec<u8>,
    /// Token valid until (Unix seconds).
    pub token_expires: i64,
    /// Now.
    pub created: i64,
}

/// What the server needs of a host to talk to it.
#[derive(Debug, Clone)]
pub struct HostRecord {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// Where it is in its life.
    pub state: HostState,
    /// Packet-sealing public key (after enrollment).
    pub sealing_key: Option<Vec<u8>>,
    /// libvirt URI for migrations to it ("" for the default).
    pub libvirt_uri: String,
    /// QEMU migration URI ("" for libvirt's choice).
    pub migration_uri: String,
    /// SHA-256 of its certificate (after enrollment).
    pub cert_sha256: Option<String>,
}

/// The host an enrollment token belongs to.
#[derive(Debug, Clone)]
pub struct TokenHolder {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// Where it is in its life.
    pub state: HostState,
    /// Token valid until (Unix seconds).
    pub expires: Option<i64>,
}

/// A completed enrollment.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// Host name.
    pub name: String,
    /// Hash of the token it presented (checked again in the update).
    pub token_hash: Vec<u8>,
    /// Now.
    pub enrolled: i64,
    /// SHA-256 of the certificate signed for it.
    pub cert_sha256: String,
    /// Its packet-sealing public key.
    pub sealing_key: Vec<u8>,
}

/// One key a host reported holding (ids only, never keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKey {
    /// Volume id.
    pub volume_id: String,
    /// Generation.
    pub generation: u64,
    /// Guest it is held for.
    pub guest_uuid: String,
}

/// Hosts and enrollment.
pub trait HostStore {
    /// Whether a host of this name exists (in any state).
    fn host_exists(&mut self, name: &str) -> Result<bool>;
    /// Keeps what a host reported of its TPM-sealed keys.
    fn set_host_tpm(&mut self, name: &str, tpm: &crate::model::HostTpm) -> Result<()>;
    /// Registers a host.
    fn insert_host(&mut self, host: &NewHost) -> Result<()>;
    /// All hosts, by name.
    fn hosts(&mut self) -> Result<Vec<HostInfo>>;
    /// One host.
    fn host(&mut self, name: &str) -> Result<Option<HostInfo>>;
    /// What is needed to talk to a host.
    fn host_record(&mut self, name: &str) -> Result<Option<HostRecord>>;
    /// The enrolled host whose certificate has this SHA-256.
    fn enrolled_host_by_cert(&mut self, cert_sha256: &str) -> Result<Option<String>>;
    /// Revokes a host; false if it was revoked already (or is unknown).
    fn revoke_host(&mut self, name: &str) -> Result<bool>;
    /// The host whose pending token has this hash.
    fn host_by_token(&mut self, token_hash: &[u8]) -> Result<Option<TokenHolder>>;
    /// Records an enrollment if the host is still pending with that token;
    /// false if not (a concurrent enrollment won).
    fn complete_enrollment(&mut self, e: &Enrollment) -> Result<bool>;
    /// Replaces what a host reported holding.
    fn replace_inventory(&mut self, host: &str, held: &[HeldKey], now: i64) -> Result<()>;
    /// What the host last reported holding (ids only), by volume.
    fn inventory(&mut self, host: &str) -> Result<Vec<HeldKey>>;
    /// Sets where migrations to a host go.
    fn set_host_migration(
        &mut self,
        name: &str,
        libvirt_uri: &str,
        migration_uri: &str,
    ) -> Result<()>;
}

/// A volume record to insert, with generation 1.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// UUID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Pool.
    pub pool: String,
    /// Format.
    pub format: VolumeFormat,
    /// Size in bytes.
    pub capacity: u64,
    /// libvirt secret UUID.
    pub secret_uuid: String,
    /// First state.
    pub state: VolumeState,
    /// Now.
    pub created: i64,
    /// What a release of its key needs.
    pub release: ReleasePolicy,
    /// Its key is one half of a split passphrase.
    pub split: bool,
}

/// Volumes and their wrapped keys.
pub trait VolumeStore {
    /// Whether a live (not deleted or decrypted) volume has this name.
    fn volume_name_taken(&mut self, name: &str) -> Result<bool>;
    /// Volumes assigned to a host that are not deleted.
    fn host_volume_count(&mut self, host: &str) -> Result<u32>;
    /// How many volumes are in each state (deleted ones included), for the
    /// metrics: one scan of the state index.
    fn volume_state_counts(&mut self) -> Result<Vec<(String, u64)>>;
    /// Inserts a volume record.
    fn insert_volume(&mut self, v: &NewVolume) -> Result<()>;
    /// Sets what a release of the volume's key needs.
    fn set_release_policy(&mut self, id: &str, release: ReleasePolicy) -> Result<()>;
    /// What a release of the volume's key needs, whether the key is split,
    /// and the wrapped key of `generation` (None when it has none), read now
    /// in one query (None: no such volume).
    fn release_material(
        &mut self,
        id: &str,
        generation: u64,
    ) -> Result<Option<(ReleasePolicy, bool, Option<WrappedKey>)>>;
    /// Volumes not deleted, optionally of one host, by name.
    fn volumes(&mut self, host: Option<&str>) -> Result<Vec<VolumeInfo>>;
    /// A volume by UUID.
    fn volume(&mut self, id: &str) -> Result<Option<VolumeInfo>>;
    /// Whether volume `id` is still in `state` at key `generation` on
    /// `host` (a push's outcome is recorded only then).
    fn volume_is(
        &mut self,
        id: &str,
        state: VolumeState,
        generation: u64,
        host: &str,
    ) -> Result<bool>;
    /// A volume by UUID (any state) or name (not deleted), the live one first.
    fn find_volume(&mut self, name_or_id: &str) -> Result<Option<VolumeInfo>>;
    /// The volume (not deleted) of this name.
    fn volume_named(&mut self, name: &str) -> Result<Option<VolumeInfo>>;
    /// The volume (not deleted) the host keeps at this path.
    fn volume_at_path(&mut self, path: &str) -> Result<Option<VolumeInfo>>;
    /// Volumes whose pending operation is due at `now_ms`, soonest first.
    fn due_volumes(&mut self, now_ms: i64, limit: u32) -> Result<Vec<VolumeInfo>>;
    /// Names of the defined guests that use a volume.
    fn volume_users(&mut self, id: &str) -> Result<Vec<String>>;

    /// Stores a wrapped key generation.
    fn insert_volume_key(
        &mut self,
        id: &str,
        generation: u64,
        key: &WrappedKey,
        created: i64,
    ) -> Result<()>;
    /// One wrapped key generation.
    fn volume_key(&mut self, id: &str, generation: u64) -> Result<Option<WrappedKey>>;
    /// Every wrapped key, for a master key rotation.
    fn all_volume_keys(&mut self) -> Result<Vec<(String, u64, WrappedKey)>>;
    /// Replaces a wrapped key (a master key rotation).
    fn rewrap_volume_key(&mut self, id: &str, generation: u64, key: &WrappedKey) -> Result<()>;
    /// Destroys one key generation.
    fn delete_volume_key(&mut self, id: &str, generation: u64) -> Result<()>;
    /// Destroys every key generation of a volume.
    fn delete_volume_keys(&mut self, id: &str) -> Result<()>;

    /// Sets the state, keeping everything else.
    fn set_volume_state(&mut self, id: &str, state: VolumeState) -> Result<()>;
    /// Sets the state and the last error (a volume that leaves guestkey's
    /// care, or a refused operation).
    fn set_volume_state_error(&mut self, id: &str, state: VolumeState, error: &str) -> Result<()>;
    /// Queues an operation: the state, with attempts, failures and error
    /// cleared.
    fn queue_volume_op(&mut self, id: &str, state: VolumeState) -> Result<()>;
    /// Queues a rekey to the next generation.
    fn queue_rekey(&mut self, id: &str, order: &RekeyOrder) -> Result<()>;
    /// Records a failed attempt and when to try again; `counts`: it counts
    /// towards giving up.
    fn volume_attempt_failed(
        &mut self,
        id: &str,
        error: &str,
        next_attempt_ms: i64,
        counts: bool,
    ) -> Result<()>;
    /// Gives up the pending operation `op`: state `failed`, with the reason.
    fn fail_volume(&mut self, id: &str, op: VolumeOp, error: &str) -> Result<()>;
    /// The encryption's outcome is unknown: back to `pending-encrypt`, one
    /// attempt made, retried at `next_attempt_ms`.
    fn encrypt_later(&mut self, id: &str, error: &str, next_attempt_ms: i64) -> Result<()>;
    /// The host made (or encrypted) the volume: ready at `path`, with its
    /// size when known.
    fn volume_made(&mut self, id: &str, path: &str, capacity: Option<u64>) -> Result<()>;
    /// A rekey was confirmed: ready at `generation`; a deep one ends a
    /// pending after-migration rekey.
    fn volume_rekeyed(&mut self, id: &str, generation: u64, deep: bool) -> Result<()>;
    /// A rekey was dropped: ready, with the reason.
    fn rekey_dropped(&mut self, id: &str, error: &str) -> Result<()>;
    /// The volume moved (migration): ready on `host`, a deep rekey due.
    fn move_volume(&mut self, id: &str, host: &str, rekey_due: i64) -> Result<()>;
}

/// A guest record to insert (pending definition).
#[derive(Debug, Clone)]
pub struct NewGuest {
    /// UUID.
    pub uuid: String,
    /// libvirt name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Domain XML as sent to the host.
    pub xml: String,
    /// Now.
    pub created: i64,
}

/// A wrapped key of one of a guest's disks.
#[derive(Debug, Clone)]
pub struct GuestKey {
    /// Volume id.
    pub volume_id: String,
    /// Its current generation.
    pub generation: u64,
    /// Its format.
    pub format: VolumeFormat,
    /// The wrapped key of that generation.
    pub key: WrappedKey,
    /// What a release of its key needs.
    pub release: ReleasePolicy,
}

/// Guests and their disks.
pub trait GuestStore {
    /// Guests not undefined, optionally of one host, by host and name.
    fn guests(&mut self, host: Option<&str>) -> Result<Vec<GuestInfo>>;
    /// A guest by UUID (any state).
    fn guest(&mut self, uuid: &str) -> Result<Option<GuestInfo>>;
    /// Guests not undefined with this name (on any host).
    fn live_guests_named(&mut self, name: &str) -> Result<Vec<GuestInfo>>;
    /// Whether a guest the host may have (not undefined, not failed) has
    /// this UUID, or this name on `host`.
    fn live_guest_conflicts(&mut self, uuid: &str, host: &str, name: &str) -> Result<bool>;
    /// Forgets the undefined or failed guests of this UUID, or of this name
    /// on `host` (they may be defined again).
    fn forget_gone_guests(&mut self, uuid: &str, host: &str, name: &str) -> Result<()>;
    /// Inserts a guest, pending its definition.
    fn insert_guest(&mut self, g: &NewGuest) -> Result<()>;
    /// Records that a guest's disk `target` is on a volume.
    fn insert_guest_disk(&mut self, uuid: &str, volume_id: &str, target: &str) -> Result<()>;
    /// Records that a guest's disk `target` is on a volume, unless that
    /// volume is recorded for the guest already.
    fn add_guest_disk(&mut self, uuid: &str, volume_id: &str, target: &str) -> Result<()>;
    /// Queues an operation for the host, attempts and error cleared.
    fn queue_guest_op(&mut self, uuid: &str, op: GuestOp) -> Result<()>;
    /// Replaces the domain XML and queues its definition.
    fn redefine_guest(&mut self, uuid: &str, xml: &str) -> Result<()>;
    /// Guests whose pending operation is due at `now_ms`, soonest first.
    fn due_guests(&mut self, now_ms: i64, limit: u32) -> Result<Vec<GuestInfo>>;
    /// The current keys of a guest's disks on volumes of `host`.
    fn guest_keys(&mut self, uuid: &str, host: &str) -> Result<Vec<GuestKey>>;
    /// The guest's managed volumes, by name.
    fn guest_volumes(&mut self, uuid: &str) -> Result<Vec<VolumeInfo>>;
    /// The host confirmed `op`: the guest is in `state`, nothing pending.
    /// Nothing changes if another operation was queued meanwhile.
    fn guest_op_done(&mut self, uuid: &str, op: GuestOp, state: GuestState) -> Result<()>;
    /// Records a failed attempt and when to try again; `counts`: it counts
    /// towards giving up.
    fn guest_attempt_failed(
        &mut self,
        uuid: &str,
        error: &str,
        next_attempt_ms: i64,
        counts: bool,
    ) -> Result<()>;
    /// Nothing pending any more (an operation given up, or done without
    /// the host): the state set if given, `error` shown.
    fn settle_guest(&mut self, uuid: &str, state: Option<GuestState>, error: &str) -> Result<()>;
    /// Guests of a host, not undefined, with nothing but a definition
    /// pending: (UUID, domain XML).
    fn guests_to_adopt(&mut self, host: &str) -> Result<Vec<(String, String)>>;
    /// The guest moved (migration): on `host`, in `state`, no error.
    fn move_guest(&mut self, uuid: &str, host: &str, state: GuestState) -> Result<()>;
    /// Shows an error on the guest.
    fn set_guest_error(&mut self, uuid: &str, error: &str) -> Result<()>;
}

/// Rotation policies.
pub trait PolicyStore {
    /// Sets or replaces a policy (its target already resolved).
    fn upsert_policy(&mut self, p: &Policy) -> Result<()>;
    /// All policies, by scope and target.
    fn policies(&mut self) -> Result<Vec<Policy>>;
    /// Removes a policy; false if there was none.
    fn delete_policy(&mut self, scope: PolicyScope, target: &str) -> Result<bool>;
    /// The policy that applies to a volume: its own, else its pool's.
    fn policy_for(&mut self, volume_id: &str, pool: &str) -> Result<Option<Policy>>;
    /// Ready volumes of enrolled hosts whose active key is older than their
    /// policy allows at `now`, with the policy's mode.
    fn due_for_rotation(&mut self, now: i64) -> Result<Vec<(String, RekeyKind)>>;
    /// Ready volumes of enrolled hosts whose after-migration rekey is due.
    fn due_after_migration(&mut self, now: i64) -> Result<Vec<String>>;
    /// Volumes not deleted and not rekeying whose key is older than their
    /// policy allows at `now`, or whose after-migration rekey is past due
    /// (a host that does not answer, a failed volume, a retry waiting).
    fn rekeys_overdue(&mut self, now: i64) -> Result<Overdue>;
    /// Marks a pool managed; false if it was already.
    fn manage_pool(&mut self, p: &ManagedPool) -> Result<bool>;
    /// Unmarks a pool; false if it was not marked.
    fn unmanage_pool(&mut self, host: &str, pool: &str) -> Result<bool>;
    /// A console login's password hash (PHC string).
    fn console_user(&mut self, name: &str) -> Result<Option<String>>;
    /// Sets (or replaces) a console login.
    fn put_console_user(&mut self, name: &str, hash: &str, now: i64, by: &str) -> Result<()>;
    /// Removes a console login; false if there was none.
    fn delete_console_user(&mut self, name: &str) -> Result<bool>;
    /// Console logins: (name, created, by), by name.
    fn console_users(&mut self) -> Result<Vec<(String, i64, String)>>;
    /// Adds a console session.
    fn insert_console_session(&mut self, s: &ConsoleSession) -> Result<()>;
    /// A console session by its token's hash.
    fn console_session(&mut self, token_hash: &[u8]) -> Result<Option<ConsoleSession>>;
    /// Marks a session used at `now_ms`.
    fn touch_console_session(&mut self, token_hash: &[u8], now_ms: i64) -> Result<()>;
    /// Ends a session; false if there was none.
    fn delete_console_session(&mut self, token_hash: &[u8]) -> Result<bool>;
    /// Ends the sessions idle since before `idle_before_ms` or started
    /// before `started_before_ms`, then the oldest beyond `keep`.
    fn prune_console_sessions(
        &mut self,
        idle_before_ms: i64,
        started_before_ms: i64,
        keep: u32,
    ) -> Result<()>;
    /// When a volume's key of `generation` was made (None: no such key).
    fn key_created(&mut self, volume_id: &str, generation: u64) -> Result<Option<i64>>;
    /// Managed pools, optionally of one host, by host and pool.
    fn managed_pools(&mut self, host: Option<&str>) -> Result<Vec<ManagedPool>>;
    /// The managed pool `pool` of `host`, if marked.
    fn managed_pool(&mut self, host: &str, pool: &str) -> Result<Option<ManagedPool>>;
}

/// A migration under way: the journal the server resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRecord {
    /// The guest.
    pub guest_uuid: String,
    /// Source host.
    pub from_host: String,
    /// Destination host.
    pub to_host: String,
    /// Began at (Unix seconds).
    pub started: i64,
    /// Live migration.
    pub live: bool,
    /// As `virsh migrate --unsafe`.
    pub unsafe_: bool,
    /// The replica that drives it ("" for none named: a single server, or
    /// a record from before replicas).
    pub driver: String,
}

/// Migrations under way.
pub trait MigrationStore {
    /// Records a migration that begins.
    fn insert_migration(&mut self, m: &MigrationRecord) -> Result<()>;
    /// The migration of a guest, if one is under way.
    fn migration(&mut self, guest_uuid: &str) -> Result<Option<MigrationRecord>>;
    /// Every migration under way.
    fn migrations(&mut self) -> Result<Vec<MigrationRecord>>;
    /// Names the replica that drives a migration now.
    fn set_migration_driver(&mut self, guest_uuid: &str, driver: &str) -> Result<()>;
    /// Ends the record of a migration.
    fn delete_migration(&mut self, guest_uuid: &str) -> Result<()>;
}

/// A host's TPM identity as enrollment recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// The EK's `TPMT_PUBLIC`.
    pub ek_public: Vec<u8>,
    /// The EK certificate (DER), when the TPM had one.
    pub ek_certificate: Option<Vec<u8>>,
    /// The AK's `TPMT_PUBLIC`.
    pub ak_public: Vec<u8>,
    /// SHA-256 of the credential the AK's proof must present (None once
    /// pinned).
    pub challenge_hash: Option<Vec<u8>>,
    /// Whether the AK was proven to live in the EK's TPM.
    pub pinned: bool,
}

/// Hosts' TPM identities, attestations and allowlists.
pub trait AttestStore {
    /// Records a host's TPM identity (unpinned, with its challenge).
    fn set_host_identity(&mut self, host: &str, id: &HostIdentity) -> Result<()>;
    /// A host's TPM identity.
    fn host_identity(&mut self, host: &str) -> Result<Option<HostIdentity>>;
    /// The AK proved where it lives: pinned, its challenge forgotten.
    fn pin_attestation_key(&mut self, host: &str) -> Result<()>;
    /// Records an attestation's outcome unless one issued later is
    /// recorded; `clock` (of a verified quote) replaces the TPM clock the
    /// next quote may not go back from.
    fn record_attestation(
        &mut self,
        host: &str,
        outcome: &AttestationOutcome,
        clock: Option<TpmClock>,
    ) -> Result<()>;
    /// The last attestation and the clock of the last passed one.
    fn attestation(&mut self, host: &str)
    -> Result<(Option<AttestationOutcome>, Option<TpmClock>)>;
    /// Adds (or with `replace`, sets the PCRs named to) allowed values of
    /// the allowlist of `scope` `target`; returns its new version.
    fn allow_pcr_values(
        &mut self,
        scope: AllowScope,
        target: &str,
        values: &[(u8, String)],
        replace: bool,
        now: i64,
    ) -> Result<u64>;
    /// An allowlist: its version (0: none) and (PCR, SHA-256 hex) pairs,
    /// by PCR.
    fn allowlist(&mut self, scope: AllowScope, target: &str) -> Result<(u64, Vec<(u8, String)>)>;
    /// A host's group ("" for none).
    fn host_group(&mut self, host: &str) -> Result<String>;
    /// Puts a host in a group ("": none).
    fn set_host_group(&mut self, host: &str, group: &str) -> Result<()>;
}

/// Requests for start keys that wait for an operator's approval.
pub trait ApprovalStore {
    /// Records a new request.
    fn insert_request(&mut self, r: &ReleaseRequest) -> Result<()>;
    /// The newest pending or approved request of `host` for `guest_uuid`.
    fn open_request(&mut self, host: &str, guest_uuid: &str) -> Result<Option<ReleaseRequest>>;
    /// A request by id.
    fn request(&mut self, id: &str) -> Result<Option<ReleaseRequest>>;
    /// Requests, newest first; only those in `state` when given.
    fn requests(&mut self, state: Option<RequestState>) -> Result<Vec<ReleaseRequest>>;
    /// Moves a request from `from` to `to` (decided at `now` by `by`,
    /// with `note`); false if it was not in `from`.
    fn move_request(
        &mut self,
        id: &str,
        from: RequestState,
        to: RequestState,
        now: i64,
        by: &str,
        note: &str,
    ) -> Result<bool>;
    /// Pending and approved requests made before `before` expire; returns
    /// their ids.
    fn expire_requests(&mut self, before: i64) -> Result<Vec<String>>;
}

/// Escrow packets: requests, decisions, and the packets' ciphertext.
pub trait EscrowStore {
    /// Records a new request (its packet empty).
    fn insert_escrow(&mut self, e: &EscrowEntry) -> Result<()>;
    /// A request by id, `obsolete` computed against its volume now.
    fn escrow(&mut self, id: &str) -> Result<Option<EscrowEntry>>;
    /// Requests, newest first: of one volume (by UUID) or all; with
    /// `open_only`, only the pending ones and the made ones not obsolete.
    fn escrow_entries(
        &mut self,
        volume_id: Option<&str>,
        open_only: bool,
    ) -> Result<Vec<EscrowEntry>>;
    /// How many requests of the volume are pending or made at
    /// `generation`.
    fn escrow_open_count(&mut self, volume_id: &str, generation: u64) -> Result<u32>;
    /// How many requests `requested_by` has pending.
    fn escrow_pending_count(&mut self, requested_by: &str) -> Result<u32>;
    /// Moves a pending request to `to` (decided at `now` by `by`, with
    /// `note`); with `made`, the LUKS UUID and the packet are stored too.
    /// False if it was not pending.
    fn decide_escrow(
        &mut self,
        id: &str,
        to: EscrowState,
        now: i64,
        by: &str,
        note: &str,
        made: Option<(&str, &[u8])>,
    ) -> Result<bool>;
    /// The packet of a request (empty until made).
    fn escrow_packet(&mut self, id: &str) -> Result<Option<Vec<u8>>>;
    /// Pending requests made before `before` expire; returns their ids.
    fn expire_escrow(&mut self, before: i64) -> Result<Vec<String>>;
}

/// The server's recovery record (one at most): what `recovery split`
/// sealed to the recovery key whose private half the custodians' shares
/// hold. Nothing in it opens without M shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryRecord {
    /// The split's id, in every share.
    pub split_id: String,
    /// Shares needed (M).
    pub threshold: u8,
    /// Shares made (N).
    pub shares: u8,
    /// When the split was made (Unix seconds).
    pub created: i64,
    /// The recovery key's public age recipient.
    pub recipient: String,
    /// The custodians' age recipients, in share order.
    pub custodians: Vec<String>,
    /// The id of the master key in `sealed_master`.
    pub master_key_id: String,
    /// The master key, age-encrypted to `recipient`.
    pub sealed_master: Vec<u8>,
    /// The data directory's certificates and keys, encrypted under the
    /// master key ([`crate::masterkey::MasterKey::wrap_bundle`]).
    pub bundle: Vec<u8>,
    /// SHA-256 (hex) of the bundle's public files, to tell whether the
    /// data directory changed since.
    pub bundle_sha256: String,
}

/// The server's recovery record.
pub trait RecoveryStore {
    /// The record, if a split was made.
    fn recovery(&mut self) -> Result<Option<RecoveryRecord>>;
    /// Replaces the record.
    fn put_recovery(&mut self, r: &RecoveryRecord) -> Result<()>;
}

/// A verifier's halves of split keys, and the nonces it issued for the
/// attestations that precede their release.
pub trait HalfStore {
    /// Records a nonce (hex) issued to `host` at `issued`.
    fn insert_half_challenge(&mut self, nonce: &str, host: &str, issued: i64) -> Result<()>;
    /// Takes (removes) the nonce if it was issued to `host`: when.
    fn take_half_challenge(&mut self, nonce: &str, host: &str) -> Result<Option<i64>>;
    /// Removes `host`'s nonces issued before `before`, and all but its
    /// `keep` newest.
    fn prune_half_challenges(&mut self, host: &str, before: i64, keep: u32) -> Result<()>;
    /// The half of `volume` generation `generation`: the host it is bound
    /// to, and the half wrapped under the master key.
    fn key_half(&mut self, volume: &str, generation: u64) -> Result<Option<(String, WrappedKey)>>;
    /// Records a new half bound to `host`.
    fn insert_key_half(
        &mut self,
        volume: &str,
        generation: u64,
        host: &str,
        key: &WrappedKey,
        created: i64,
    ) -> Result<()>;
    /// Destroys `host`'s halves of `volume` below `below` (0: all);
    /// returns how many.
    fn delete_key_halves(&mut self, volume: &str, host: &str, below: u64) -> Result<u32>;
    /// Every half (for a master key rotation).
    fn all_key_halves(&mut self) -> Result<Vec<(String, u64, WrappedKey)>>;
    /// Replaces a half's wrapping (a master key rotation).
    fn rewrap_key_half(&mut self, volume: &str, generation: u64, key: &WrappedKey) -> Result<()>;
}

/// The lease of the replica that leads, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The replica that holds it.
    pub holder: String,
    /// Its fence number (grows with every new holder).
    pub fence: u64,
    /// Held by this holder since (database clock, ms).
    pub since_ms: i64,
    /// Lapses at (database clock, ms).
    pub expires_ms: i64,
}

/// A server replica as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its id (new at every start).
    pub id: String,
    /// The address it serves on.
    pub address: String,
    /// The URL hosts reach it at (empty: not given to hosts).
    pub url: String,
    /// Its machine's name.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Started at (database clock, ms).
    pub started_ms: i64,
    /// Last heard of (database clock, ms).
    pub seen_ms: i64,
}

/// Leadership among replicas, and the replicas themselves.
pub trait LeaseStore {
    /// The database's clock (ms since the Unix epoch): every replica reads
    /// the same one.
    fn db_now_ms(&mut self) -> Result<i64>;
    /// The lease, if one was ever taken.
    fn lease(&mut self) -> Result<Option<Lease>>;
    /// Writes the lease (take-over or renewal).
    fn put_lease(&mut self, lease: &Lease) -> Result<()>;
    /// Whether `holder` holds the lease with `fence` and it has not lapsed
    /// by the database's clock.
    fn holds_lease(&mut self, holder: &str, fence: u64) -> Result<bool>;
    /// Records (or refreshes) a replica.
    fn put_replica(&mut self, r: &Replica) -> Result<()>;
    /// Forgets a replica (it stopped).
    fn remove_replica(&mut self, id: &str) -> Result<()>;
    /// Forgets the replicas not heard of since `before_ms` (killed, or
    /// their machine lost); how many.
    fn prune_replicas(&mut self, before_ms: i64) -> Result<usize>;
    /// Every replica, by start.
    fn replicas(&mut self) -> Result<Vec<Replica>>;
}

#[cfg(test)]
pub(crate) mod testing;
