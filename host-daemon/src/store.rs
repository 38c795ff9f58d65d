//! The sealed guest store and the volume registry.
//!
//! Per guest (libvirt domain UUID) one file, `guests/UUID.sealed`: the
//! guest's domain XML and the key packets of its encrypted disks, exactly as
//! the server sealed them to this host, all encrypted once more with
//! XChaCha20-Poly1305 under `store.key` (associated data: the UUID), written
//! atomically. A key is opened from its packet only when libvirt needs it.
//!
//! `volumes.json` lists the volumes created on this host (ids, names,
//! paths, libvirt secret UUIDs): no key material.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretBox};

use xdr_wipe::packet::VolumeId;
use xdr_wipe::seal::MAX_CIPHERTEXT;
use xdr_wipe::{BoundedVec, Opaque, XdrString};
use zeroize::Zeroizing;

pub use crate::model::VolumeEntry;
use crate::state::{StateDir, private_dir, write_atomic};
use guestkey_protect::{KeyProtector, ProtectError, ProtectedKey};

xdr_wipe::xdr_struct! {
    /// One disk key of a guest: the sealed packet as received.
    pub struct StoredKey {
        /// Volume.
        pub volume_id: VolumeId,
        /// Key generation.
        pub generation: u64,
        /// The libvirt secret UUID the domain XML names for this disk.
        pub secret_uuid: XdrString<36>,
        /// The volume's path on this host.
        pub path: XdrString<4096>,
        /// xdr-wipe SealedPacket, sealed to this host.
        pub sealed: Opaque<MAX_CIPHERTEXT>,
    }
}

xdr_wipe::xdr_struct! {
    /// A guest's sealed record.
    pub struct GuestRecord {
        /// libvirt domain UUID.
        pub uuid: XdrString<36>,
        /// libvirt domain name.
        pub name: XdrString<255>,
        /// Domain XML as defined.
        pub domain_xml: XdrString<1048576>,
        /// Keys of its encrypted disks.
        pub keys: BoundedVec<StoredKey, 256>,
    }
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A sealed record does not open.
    #[error(
        "sealed record of guest {0} does not authenticate: it was altered, or store.key changed"
    )]
    Corrupt(String),
    /// A record does not decode.
    #[error("sealed record of guest {uuid} is malformed: {error}")]
    Malformed {
        /// Guest.
        uuid: String,
        /// Decoding error.
        error: xdr_wipe::Error,
    },
    /// The store key is wrong.
    #[error("the store key from {0} must be 32 bytes")]
    BadKey(String),
    /// The store key's protector failed.
    #[error("the store key: {0}")]
    Protector(#[from] ProtectError),
}

/// The store.
pub struct Store {
    dir: StateDir,
    key: SecretBox<[u8; 32]>,
    /// Bumped by every change, so readers can tell when to look again.
    changes: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens the store, making its key on first use.
    pub fn open(dir: &StateDir, protector: &dyn KeyProtector) -> Result<Self, StoreError> {
        private_dir(&dir.guests()).map_err(|source| StoreError::Io {
            what: "create",
            path: dir.guests(),
            source,
        })?;
        if !protector.exists()? {
            let k = ProtectedKey::random(32).map_err(|e| StoreError::Io {
                what: "random",
                path: dir.root().to_owned(),
                source: e,
            })?;
            protector.create(&k)?;
        }
        let k = protector.unseal()?;
        if k.len() != 32 {
            return Err(StoreError::BadKey(protector.describe()));
        }
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        secrecy::ExposeSecretMut::expose_secret_mut(&mut key).copy_from_slice(k.expose_secret());
        Ok(Self {
            dir: dir.clone(),
            key,
            changes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn path(&self, uuid: &str) -> PathBuf {
        self.dir.guests().join(format!("{uuid}.sealed"))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.expose_secret().into())
    }

    fn aad(uuid: &str) -> Vec<u8> {
        format!("guestkey guest record v1:{uuid}").into_bytes()
    }

    /// How many changes the store has seen (records saved or erased).
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seals and writes a guest record.
    pub fn save(&self, record: &GuestRecord) -> Result<(), StoreError> {
        let uuid = record.uuid.as_str();
        let mut body = xdr_wipe::encode(record);
        let mut out = vec![0u8; 24];
        getrandom::fill(&mut out).map_err(|e| StoreError::Io {
            what: "random",
            path: self.path(uuid),
            source: std::io::Error::other(e.to_string()),
        })?;
        let nonce = XNonce::try_from(&out[..24]).expect("24 bytes");
        let tag = self
            .cipher()
            .encrypt_inout_detached(&nonce, &Self::aad(uuid), body.as_mut_slice().into())
            .expect("XChaCha20-Poly1305 takes any record size here");
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        let path = self.path(uuid);
        write_atomic(&path, &out).map_err(|source| StoreError::Io {
            what: "write",
            path,
            source,
        })?;
        self.changed();
        Ok(())
    }

    /// Reads and opens a guest record, if there is one.
    pub fn load(&self, uuid: &str) -> Result<Option<GuestRecord>, StoreError> {
        let path = self.path(uuid);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    what: "read",
                    path,
                    source,
                });
            }
        };
        if data.len() < 24 + 16 {
            return Err(StoreError::Corrupt(uuid.to_owned()));
        }
        let nonce = XNonce::try_from(&data[..24]).expect("24 bytes");
        let tag = Tag::try_from(&data[data.len() - 16..]).expect("16 bytes");
        let mut body = Zeroizing::new(data[24..data.len() - 16].to_vec());
        self.cipher()
            .decrypt_inout_detached(&nonce, &Self::aad(uuid), body.as_mut_slice().into(), &tag)
            .map_err(|_| StoreError::Corrupt(uuid.to_owned()))?;
        xdr_wipe::decode(&body)
            .map(Some)
            .map_err(|error| StoreError::Malformed {
                uuid: uuid.to_owned(),
                error,
            })
    }

    /// Erases a guest's record.
    pub fn erase(&self, uuid: &str) -> Result<bool, StoreError> {
        let path = self.path(uuid);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.changed();
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io {
                what: "remove",
                path,
                source,
            }),
        }
    }

    /// UUIDs of all stored guests.
    pub fn guests(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.dir.guests();
        let rd = std::fs::read_dir(&dir).map_err(|source| StoreError::Io {
            what: "list",
            path: dir.clone(),
            source,
        })?;
        Ok(rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".sealed"))
                    .map(str::to_owned)
            })
            .collect())
    }

    /// The volume registry.
    pub fn volumes(&self) -> Result<BTreeMap<String, VolumeEntry>, StoreError> {
        let path = self.dir.file("volumes.json");
        match std::fs::read(&path) {
            Ok(d) => serde_json::from_slice(&d).map_err(|e| StoreError::Io {
                what: "parse",
                path,
                source: std::io::Error::other(e.to_string()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(StoreError::Io {
                what: "read",
                path,
                source,
            }),
        }
    }

    /// Replaces the volume registry.
    pub fn save_volumes(&self, v: &BTreeMap<String, VolumeEntry>) -> Result<(), StoreError> {
        let path = self.dir.file("volumes.json");
        let data = serde_json::to_vec_pretty(v).unwrap_or_default();
        write_atomic(&path, &data).map_err(|source| StoreError::Io {
            what: "write",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uuid: &str) -> GuestRecord {
        GuestRecord {
            uuid: XdrString::new(uuid.to_owned()).unwrap(),
            name: XdrString::new("g").unwrap(),
            domain_xml: XdrString::new("<domain/>").unwrap(),
            keys: BoundedVec::new(vec![StoredKey {
                volume_id: VolumeId(uuid::Uuid::nil()),
                generation: 3,
                secret_uuid: XdrString::new(uuid::Uuid::nil().to_string()).unwrap(),
                path: XdrString::new("/p").unwrap(),
                sealed: Opaque::new(vec![1, 2, 3]).unwrap(),
            }])
            .unwrap(),
        }
    }

    #[test]
    fn records_round_trip_and_tampering_is_detected() {
        let dir = std::env::temp_dir().join(format!("gk-store-{}", std::process::id()));
        let state = StateDir::new(&dir);
        private_dir(&dir).unwrap();
        let store = Store::open(
            &state,
            &*crate::protect::HostProtectors::files(&state).store,
        )
        .unwrap();
        let uuid = "6f1c2b1e-0000-0000-0000-0000000000aa";
        store.save(&record(uuid)).unwrap();
        assert_eq!(store.guests().unwrap(), vec![uuid.to_owned()]);
        let back = store.load(uuid).unwrap().unwrap();
        assert_eq!(back.keys[0].generation, 3);
        assert_eq!(&*back.keys[0].sealed, &[1, 2, 3]);
        // The clear XML is not in the file.
        let file = dir.join(format!("guests/{uuid}.sealed"));
        let bytes = std::fs::read(&file).unwrap();
        assert!(!bytes.windows(9).any(|w| w == b"<domain/>"));
        // A flipped bit, or the record moved to another UUID: refused.
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        std::fs::write(&file, &bad).unwrap();
        assert!(matches!(store.load(uuid), Err(StoreError::Corrupt(_))));
        let other = "6f1c2b1e-0000-0000-0000-0000000000bb";
        std::fs::write(dir.join(format!("guests/{other}.sealed")), &bytes).unwrap();
        assert!(matches!(store.load(other), Err(StoreError::Corrupt(_))));
        assert!(store.erase(uuid).unwrap());
        assert!(store.load(uuid).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
