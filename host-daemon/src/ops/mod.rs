//! The daemon's operations: volumes, guests, rekeys, migrations and the
//! hook's just-in-time secrets, written against the two traits of ours,
//! [`Hypervisor`] (libvirt) and [`Images`] (qemu-img and the LUKS engine),
//! the sealed [`Store`] and the host's [`HostKeys`].
//!
//! [`Daemon`] holds them; each operation takes a request of
//! [`requests`] (made by [`crate::grpc`] from the wire) and returns domain
//! values or an [`OpsError`]. Every operation that changes the store or the
//! volume registry runs under one lock (new volumes' images are made
//! before it, in parallel: [`commit`]) and is repeatable: the server
//! retries after any failure or crash, so a step already done is
//! recognised and not done twice.
//!
//! May import: [`crate::model`], [`crate::libvirt`], [`crate::image`],
//! [`crate::store`], [`crate::protect`], [`crate::state`],
//! [`crate::progress`]. Imported by: [`crate::grpc`], [`crate::hook`], the
//! binary.

mod adopt;
mod commit;
mod escrow;
mod guests;
mod hook;
mod migrate;
mod pools;
mod rekey;
pub mod requests;
mod volumes;

pub use adopt::{DiskPlace, DomainDescription, ImagePlace};
pub use escrow::{Escrowed, load_recipients_file};
pub use pools::{MAX_POOL_VOLUMES, PoolDescription, PoolEntry, VolumeUser};
pub use volumes::{Online, copy_online};

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::image::{ImageError, Images};
use crate::libvirt::{HvError, Hypervisor};
use crate::model::{InvalidInput, VolumeId};
use crate::protect::HostKeys;
use crate::store::{GuestRecord, Store, StoreError};
use requests::SealedKey;

/// Why an operation was refused or failed. The gRPC layer maps each kind
/// to a status code; every message names what to fix, never a key.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The request itself is wrong.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// A key packet does not open (wrong host, volume or generation, or
    /// altered): the request is wrong.
    #[error("{0}")]
    Packet(String),
    /// The host's state does not allow it now.
    #[error("{0}")]
    Precondition(String),
    /// The host cannot honour the request as it stands: the server should
    /// not retry it.
    #[error("{0}")]
    Aborted(String),
    /// Another host's libvirt does not answer.
    #[error("{0}")]
    Remote(String),
    /// libvirt refused or failed.
    #[error(transparent)]
    Libvirt(#[from] HvError),
    /// An image operation failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The sealed store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something that should not happen; described.
    #[error("{0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> OpsError {
    OpsError::Internal(e.to_string())
}

/// What the management server knows of a disk this host holds no key for
/// (names and states only): see [`DiskLookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDisk {
    /// The guestkey volume.
    pub volume: String,
    /// The host its key goes to.
    pub host: String,
    /// Its state.
    pub state: String,
    /// Whether the disk names the volume's own libvirt secret.
    pub same_secret: bool,
}

/// Asks the management server, for the hook: about a disk it refuses, and
/// for the keys this host keeps no copy of. The gRPC layer implements it.
pub trait DiskLookup: Send + Sync {
    /// The volume at `source`, whose `<encryption>` names `secret`. `None`:
    /// not a guestkey volume, or the server did not answer in time (the
    /// refusal then says less).
    fn describe(&self, source: &virt_plugin::protocol::Source, secret: &str) -> Option<KnownDisk>;
    /// The keys of guest `uuid` that this host does not keep at rest,
    /// released by the server now (through each volume's gates), sealed to
    /// this host. The error is the server's reason, for the `virsh` user.
    fn release(&self, uuid: &str) -> Result<Vec<SealedKey>, String>;
}

/// The verifier this host enrolled with, which keeps the other half of
/// each split key (`guestkeyd enroll-verifier`). The gRPC layer implements
/// it.
pub trait HalfSource: Send + Sync {
    /// The verifier's URL, for messages.
    fn url(&self) -> &str;
    /// The halves of these (volume, generation)s, released after the
    /// verifier's own attestation of this host, sealed to it. The error
    /// is the verifier's reason.
    fn halves(&self, wanted: &[(VolumeId, u64)]) -> Result<Vec<SealedKey>, String>;
    /// Asks the verifier to destroy `volume`'s halves below generation
    /// `below` (0: all); returns how many went.
    fn forget(&self, volume: VolumeId, below: u64) -> Result<u32, String>;
}

/// How often a secret's removal is tried at once before it is left to
/// [`Daemon::sweep_secrets`].
const REMOVE_TRIES: u32 = 3;

/// The host daemon's state.
pub struct Daemon {
    /// libvirt.
    pub hv: Box<dyn Hypervisor>,
    /// Volume images.
    pub images: Box<dyn Images>,
    /// Sealed guest store and volume registry.
    pub store: Store,
    /// Host name and sealing key.
    pub keys: HostKeys,
    /// Outcomes of operations already done, by operation id.
    done: Mutex<HashMap<String, String>>,
    /// Serialises changes to the store and the registry.
    changes: Mutex<()>,
    /// Held while a storage pool is described (one at a time).
    describing: Mutex<()>,
    /// Volume creations running in parallel, and their group commits.
    creations: commit::Creations,
    /// Where the list of managed secret UUIDs goes (for the hook).
    managed_list: PathBuf,
    /// The user libvirtd and so the hook run as (0 for the system daemon).
    hook_uid: u32,
    /// libvirt secrets whose removal failed: tried again until gone.
    stale_secrets: Mutex<BTreeSet<String>>,
    /// The server, asked about disks the hook refuses.
    lookup: std::sync::OnceLock<Box<dyn DiskLookup>>,
    /// The verifier, asked for the other halves of split keys.
    verifier: std::sync::OnceLock<Box<dyn HalfSource>>,
    /// The age recipients escrow packets may be sealed to (from
    /// `--escrow-recipients`); unset: no packets.
    escrow_recipients: std::sync::OnceLock<Vec<String>>,
    /// Secrets a prepare of this process defined and its release has not
    /// removed yet: the only guestkey secrets libvirt should have.
    preparing: Mutex<BTreeSet<String>>,
    /// Secrets handed to libvirt by prepares, in all (for the metrics).
    prepared: std::sync::atomic::AtomicU64,
}

/// What guestkeyd's metrics show of the daemon (counts only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Volumes in the registry.
    pub volumes: usize,
    /// Guests in the sealed store.
    pub guests: usize,
    /// libvirt secrets defined now for starting guests.
    pub secrets_now: usize,
    /// Secrets whose removal failed, retried until gone.
    pub stale_secrets: usize,
    /// Secrets handed to libvirt by prepares since start.
    pub secrets_prepared: u64,
}

impl Daemon {
    /// A daemon over these parts.
    pub fn new(
        hv: Box<dyn Hypervisor>,
        images: Box<dyn Images>,
        store: Store,
        keys: HostKeys,
        managed_list: PathBuf,
        hook_uid: u32,
    ) -> Self {
        Self {
            hv,
            images,
            store,
            keys,
            done: Mutex::new(HashMap::new()),
            changes: Mutex::new(()),
            describing: Mutex::new(()),
            creations: commit::Creations::new(),
            managed_list,
            hook_uid,
            stale_secrets: Mutex::new(BTreeSet::new()),
            lookup: std::sync::OnceLock::new(),
            verifier: std::sync::OnceLock::new(),
            escrow_recipients: std::sync::OnceLock::new(),
            preparing: Mutex::new(BTreeSet::new()),
            prepared: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// What the metrics show (no names, no keys).
    pub fn counts(&self) -> Result<Counts, OpsError> {
        let len = |m: &Mutex<BTreeSet<String>>| m.lock().unwrap_or_else(|p| p.into_inner()).len();
        Ok(Counts {
            volumes: self.store.volumes()?.len(),
            guests: self.store.guests()?.len(),
            secrets_now: len(&self.preparing),
            stale_secrets: len(&self.stale_secrets),
            secrets_prepared: self.prepared.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// At start-up: removes every secret of a volume under this host's care
    /// that libvirt still has but no prepare of this process defined, such
    /// as those a guestkeyd killed between a guest's prepare and its
    /// release left (libvirt keeps an ephemeral secret until it restarts).
    /// Returns how many went.
    pub fn sweep_leftover_secrets(&self) -> usize {
        let volumes = match self.store.volumes() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the volumes: leftover secrets not looked for");
                return 0;
            }
        };
        let mut n = 0;
        for v in volumes.values() {
            let busy = self
                .preparing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&v.secret_uuid);
            if busy || !matches!(self.hv.secret_defined(&v.secret_uuid), Ok(true)) {
                continue;
            }
            if self.drop_secret(&v.secret_uuid) {
                tracing::info!(secret = %v.secret_uuid, volume = %v.name, "a leftover libvirt secret removed");
                n += 1;
            }
        }
        n
    }

    /// Lets split keys be completed by the verifier (once).
    pub fn set_verifier(&self, verifier: Box<dyn HalfSource>) {
        if self.verifier.set(verifier).is_err() {
            tracing::warn!("the verifier was set twice; the first one stays");
        }
    }

    /// Opens a packet sealed to this host for `volume`/`generation`. A
    /// split key's half (from the management server) is completed here
    /// with the verifier's half, released now after its own attestation of
    /// this host; the passphrase of the two is made in wiped memory.
    pub fn open_key(
        &self,
        sealed: &[u8],
        volume: VolumeId,
        generation: u64,
    ) -> Result<xdr_wipe::packet::KeyPacket, OpsError> {
        self.open_key_split(sealed, volume, generation)
            .map(|(p, _)| p)
    }

    /// As [`Daemon::open_key`], and whether the key was split.
    pub fn open_key_split(
        &self,
        sealed: &[u8],
        volume: VolumeId,
        generation: u64,
    ) -> Result<(xdr_wipe::packet::KeyPacket, bool), OpsError> {
        let packet = self
            .keys
            .open(sealed, volume, generation)
            .map_err(|e| OpsError::Packet(format!("key of volume {volume}: {e}")))?;
        if packet.mechanism != xdr_wipe::packet::Mechanism::QemuLuksPassphraseHalf {
            return Ok((packet, false));
        }
        let missing = |why: String| {
            OpsError::Precondition(format!(
                "volume {volume} has a split key: the management server released its half, but {why}"
            ))
        };
        let v = self.verifier.get().ok_or_else(|| {
            missing("this host is not enrolled with a verifier, which keeps the other half (`guestkeyd enroll-verifier --server URL --ca-file CA.pem`, then restart guestkeyd)".into())
        })?;
        let got = v.halves(&[(volume, generation)]).map_err(|e| {
            missing(format!(
                "the verifier at {} released no other half: {e}",
                v.url()
            ))
        })?;
        let other = got
            .iter()
            .find(|h| h.volume == volume && h.generation == generation)
            .ok_or_else(|| {
                missing(format!(
                    "the verifier at {} sent no half of generation {generation}",
                    v.url()
                ))
            })?;
        let other = self
            .keys
            .open(&other.sealed, volume, generation)
            .map_err(|e| missing(format!("the verifier's half does not open: {e}")))?;
        let combined = xdr_wipe::packet::combine_halves(&packet, &other)
            .map_err(|e| missing(format!("the halves do not combine: {e}")))?;
        Ok((combined, true))
    }

    /// After a split volume's removal (`below` 0) or rekey: asks the
    /// verifier to destroy the halves no longer needed. Logged; a verifier
    /// that does not answer keeps a half that opens nothing without the
    /// management server's, which is gone.
    pub fn forget_halves(&self, volume: VolumeId, below: u64) {
        let Some(v) = self.verifier.get() else { return };
        match v.forget(volume, below) {
            Ok(0) => {}
            Ok(n) => tracing::info!(%volume, destroyed = n, "the verifier destroyed halves"),
            Err(e) => {
                tracing::warn!(%volume, error = %e, "the verifier did not destroy the old halves")
            }
        }
    }

    /// Lets the hook's refusals ask the server about a disk (once).
    pub fn set_lookup(&self, lookup: Box<dyn DiskLookup>) {
        if self.lookup.set(lookup).is_err() {
            tracing::warn!("the disk look-up was set twice; the first one stays");
        }
    }

    /// Rewrites the list of secret UUIDs of volumes under this host's care,
    /// which the hook reads when guestkeyd does not answer (no keys in it).
    pub fn write_managed_list(&self) -> Result<(), OpsError> {
        self.write_managed_list_of(&self.store.volumes()?)
    }

    /// [`Daemon::write_managed_list`] from the registry `vols` just written.
    fn write_managed_list_of(
        &self,
        vols: &std::collections::BTreeMap<String, crate::model::VolumeEntry>,
    ) -> Result<(), OpsError> {
        let text: String = vols
            .values()
            .map(|v| format!("{}\n", v.secret_uuid))
            .collect();
        let io =
            |e: std::io::Error| OpsError::Internal(format!("{}: {e}", self.managed_list.display()));
        if let Some(dir) = self.managed_list.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        crate::state::write_atomic(&self.managed_list, text.as_bytes())
            .and_then(|()| match self.hook_uid {
                0 => Ok(()),
                uid => std::os::unix::fs::chown(&self.managed_list, Some(uid), None),
            })
            .map_err(io)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, op_id: &str, outcome: &str) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(op_id.to_owned(), outcome.to_owned());
    }

    fn recall(&self, op_id: &str) -> Option<String> {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(op_id)
            .cloned()
    }

    /// Every stored guest record (unsealed).
    fn records(&self) -> Result<Vec<GuestRecord>, OpsError> {
        let mut out = vec![];
        for uuid in self.store.guests()? {
            if let Some(rec) = self.store.load(&uuid)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The stored guests that hold a key of volume `vid`.
    fn users_of(&self, vid: VolumeId) -> Result<Vec<GuestRecord>, OpsError> {
        let mut users = self.records()?;
        users.retain(|rec| rec.keys.iter().any(|k| k.volume_id == vid));
        Ok(users)
    }

    /// Removes a libvirt secret; a failure is logged, tried again a few
    /// times, and then left to [`Daemon::sweep_secrets`] — never ignored.
    /// Returns whether it is gone now.
    pub fn drop_secret(&self, uuid: &str) -> bool {
        self.preparing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uuid);
        let mut last = None;
        for attempt in 0..REMOVE_TRIES {
            match self.hv.remove_secret(uuid) {
                Ok(()) => {
                    self.stale_secrets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(uuid);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(secret = %uuid, attempt, error = %e, "libvirt secret not removed; trying again");
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(50 << attempt));
                }
            }
        }
        if let Some(e) = last {
            tracing::error!(secret = %uuid, error = %e, "libvirt secret still defined: guestkeyd keeps trying to remove it");
        }
        self.stale_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uuid.to_owned());
        false
    }

    /// Tries again to remove the secrets whose removal failed; returns how
    /// many are still defined. Run every few seconds.
    pub fn sweep_secrets(&self) -> usize {
        let pending: Vec<String> = self
            .stale_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for uuid in &pending {
            match self.hv.remove_secret(uuid) {
                Ok(()) => {
                    tracing::info!(secret = %uuid, "libvirt secret removed at last");
                    self.stale_secrets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(uuid);
                }
                Err(e) => {
                    tracing::error!(secret = %uuid, error = %e, "libvirt secret still defined")
                }
            }
        }
        self.stale_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
