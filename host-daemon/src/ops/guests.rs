//! Guests: define with sealed keys, undefine, forget (erase keys), and the
//! inventory of keys held.

use std::collections::BTreeSet;

use xdr_wipe::{BoundedVec, Opaque, XdrString};

use super::requests::{DefineGuest, HeldKey, SealedKey};
use super::{Daemon, OpsError, internal};
use crate::model::{DomainState, InvalidInput, VolumeEntry};
use crate::store::{GuestRecord, StoredKey};

/// Name and UUID from domain XML, read by the one strict reader the
/// server and the hook use too (`guestkey-domxml`): a document that libvirt
/// could read another way (two `<uuid>`, a non-canonical UUID...) is refused.
pub(super) fn domain_identity(xml: &str) -> Result<(String, String), OpsError> {
    let id = guestkey_domxml::identity(xml)
        .map_err(|e| OpsError::Invalid(InvalidInput(e.to_string())))?;
    Ok((id.name, id.uuid))
}

impl Daemon {
    /// Stores a guest's sealed keys and defines it in libvirt.
    pub fn define_guest(&self, r: DefineGuest) -> Result<String, OpsError> {
        let _guard = self.lock();
        let vols = self.store.volumes()?;
        let (uuid, record) = self.guest_record(&r.domain_xml, r.keys, |id| {
            vols.get(id).ok_or_else(|| {
                OpsError::Precondition(format!("volume {id} was not created on this host"))
            })
        })?;
        self.store.save(&record)?;
        if let Err(e) = self.hv.define_domain(&r.domain_xml) {
            // No half-defined guest: the record goes with the failure.
            if let Err(s) = self.store.erase(&uuid) {
                tracing::error!(guest = %uuid, error = %s, "the sealed record of a guest libvirt refused stays");
            }
            return Err(e.into());
        }
        tracing::info!(guest = %uuid, "guest defined");
        Ok(uuid)
    }

    /// The sealed record of the guest `domain_xml` with `keys`, each key
    /// checked to open now (refused here rather than at start time) and
    /// bound to its volume's secret and path, found by `volume`. Returns the
    /// guest's UUID and the record.
    pub(super) fn guest_record<'v>(
        &self,
        domain_xml: &str,
        keys: Vec<SealedKey>,
        volume: impl Fn(&str) -> Result<&'v VolumeEntry, OpsError>,
    ) -> Result<(String, GuestRecord), OpsError> {
        let (name, uuid) = domain_identity(domain_xml)?;
        let mut stored = Vec::with_capacity(keys.len());
        let mut seen = BTreeSet::new();
        for k in keys {
            let id = k.volume.to_string();
            if !seen.insert(id.clone()) {
                return Err(OpsError::Invalid(InvalidInput(format!(
                    "two keys for volume {id} in one guest"
                ))));
            }
            let v = volume(&id)?;
            // An empty packet: a key this host keeps no copy of (its
            // volume's release is gated); the hook asks the server for it
            // each time QEMU needs it.
            if !k.sealed.is_empty() {
                drop(
                    self.keys
                        .open(&k.sealed, k.volume, k.generation)
                        .map_err(|e| OpsError::Packet(format!("key packet of volume {id}: {e}")))?,
                );
            }
            stored.push(StoredKey {
                volume_id: k.volume,
                generation: k.generation,
                secret_uuid: XdrString::new(v.secret_uuid.clone()).map_err(internal)?,
                path: XdrString::new(v.path.clone()).map_err(internal)?,
                sealed: Opaque::new(k.sealed).map_err(internal)?,
            });
        }
        let too_big = |m: &str| OpsError::Invalid(InvalidInput(m.to_owned()));
        let record = GuestRecord {
            uuid: XdrString::new(uuid.clone()).map_err(internal)?,
            name: XdrString::new(name).map_err(|_| too_big("domain name over 255 bytes"))?,
            domain_xml: XdrString::new(domain_xml.to_owned())
                .map_err(|_| too_big("domain XML over 1 MiB"))?,
            keys: BoundedVec::new(stored).map_err(|_| too_big("more than 256 encrypted disks"))?,
        };
        Ok((uuid, record))
    }

    /// Undefines a guest and erases its keys.
    pub fn undefine_guest(&self, uuid: &str) -> Result<(), OpsError> {
        let _guard = self.lock();
        self.hv.undefine_domain(uuid)?;
        self.forget_guest(uuid);
        Ok(())
    }

    /// Starts a guest (the hook hands its keys to libvirt).
    pub fn start_guest(&self, uuid: &str) -> Result<DomainState, OpsError> {
        Ok(self.hv.start_domain(uuid)?)
    }

    /// Stops (destroys) a guest.
    pub fn stop_guest(&self, uuid: &str) -> Result<DomainState, OpsError> {
        Ok(self.hv.stop_domain(uuid)?)
    }

    /// A guest's state here (None: not defined).
    pub fn guest_state(&self, uuid: &str) -> Result<Option<DomainState>, OpsError> {
        Ok(self.hv.domain_state(uuid)?)
    }

    /// Erases a guest's keys (sealed record and any libvirt secret).
    pub fn forget_guest(&self, uuid: &str) {
        match self.store.load(uuid) {
            Ok(Some(rec)) => {
                for k in rec.keys.iter() {
                    self.drop_secret(k.secret_uuid.as_str());
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(guest = %uuid, error = %e, "cannot read the guest's record to remove its secrets")
            }
        }
        match self.store.erase(uuid) {
            Ok(true) => tracing::info!(guest = %uuid, "guest keys erased"),
            Ok(false) => {}
            Err(e) => tracing::error!(guest = %uuid, error = %e, "cannot erase guest keys"),
        }
    }

    /// The guest is not this host's any more (it left, or never came):
    /// its keys go, and so do the volumes of its record `gone` (read before
    /// the erasure) that no remaining guest uses.
    pub(super) fn forget_guest_here(
        &self,
        uuid: &str,
        gone: Option<GuestRecord>,
    ) -> Result<(), OpsError> {
        self.forget_guest(uuid);
        let Some(gone) = gone else { return Ok(()) };
        let used: BTreeSet<String> = self
            .records()?
            .iter()
            .flat_map(|rec| rec.keys.iter().map(|k| k.volume_id.to_string()))
            .collect();
        let mut vols = self.store.volumes()?;
        for k in gone.keys.iter() {
            let id = k.volume_id.to_string();
            if !used.contains(&id) {
                vols.remove(&id);
            }
        }
        self.store.save_volumes(&vols)?;
        self.write_managed_list()
    }

    /// What this host holds keys for (ids only).
    pub fn inventory(&self) -> Result<Vec<HeldKey>, OpsError> {
        let mut out = vec![];
        for rec in self.records()? {
            for k in rec.keys.iter() {
                out.push(HeldKey {
                    volume: k.volume_id.to_string(),
                    generation: k.generation,
                    guest: rec.uuid.to_string(),
                });
            }
        }
        Ok(out)
    }
}
