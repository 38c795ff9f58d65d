//! Migration: the destination prepares (volumes visible at the same paths,
//! keys stored for the incoming QEMU), the source migrates and then erases
//! the keys, and a failed migration is abandoned at the destination.

use super::guests::domain_identity;
use super::requests::{MigrateGuest, PrepareMigration};
use super::{Daemon, OpsError};
use crate::model::{DomainState, VolumeEntry};

impl Daemon {
    /// Destination of a migration: the guest's volumes must be visible here
    /// (shared storage, same pool and path); they join this host's registry
    /// and the guest's sealed keys are stored, so that the hook can hand
    /// them to the incoming QEMU. Nothing is defined in libvirt (the
    /// migration does that). Repeatable.
    pub fn prepare_migration(&self, r: PrepareMigration) -> Result<String, OpsError> {
        let (_, uuid) = domain_identity(&r.domain_xml)?;
        let mut entries = Vec::with_capacity(r.volumes.len());
        for v in &r.volumes {
            let (pool, name) = (v.pool.as_str(), v.name.as_str());
            match self.hv.volume_path(pool, name) {
                Ok(Some(p)) if p == v.path => {}
                Ok(Some(p)) => {
                    return Err(OpsError::Precondition(format!(
                        "volume {name} of pool {pool} is at {p} on this host, not at {} as on the source: the guest's storage must be shared at the same path",
                        v.path
                    )));
                }
                Ok(None) => {
                    return Err(OpsError::Precondition(format!(
                        "this host sees no volume {name} in pool {pool} ({}): define the shared storage pool {pool} here first",
                        v.path
                    )));
                }
                Err(e) => {
                    return Err(OpsError::Precondition(format!(
                        "this host sees no volume {name} ({}): {e}; define the shared storage pool {pool} here first",
                        v.path
                    )));
                }
            }
            entries.push(VolumeEntry {
                volume_id: v.volume.to_string(),
                name: name.to_owned(),
                pool: pool.to_owned(),
                path: v.path.clone(),
                secret_uuid: v.secret.hyphenated().to_string(),
            });
        }
        let _guard = self.lock();
        let (_, record) = self.guest_record(&r.domain_xml, r.keys, |id| {
            entries.iter().find(|e| e.volume_id == id).ok_or_else(|| {
                OpsError::Invalid(crate::model::InvalidInput(format!(
                    "key for volume {id} without its volume"
                )))
            })
        })?;
        let mut vols = self.store.volumes()?;
        for e in entries {
            vols.insert(e.volume_id.clone(), e);
        }
        self.store.save_volumes(&vols)?;
        self.write_managed_list()?;
        self.store.save(&record)?;
        tracing::info!(guest = %uuid, "incoming migration prepared");
        Ok(uuid)
    }

    /// Destination, after a failed migration: erases the prepared keys and
    /// volume entries, unless libvirt has the guest here after all.
    pub fn abort_migration(&self, uuid: &str) -> Result<Option<DomainState>, OpsError> {
        if let Some(state) = self.hv.domain_state(uuid)? {
            return Ok(Some(state));
        }
        let _guard = self.lock();
        let rec = self.store.load(uuid)?;
        self.forget_guest_here(uuid, rec)?;
        tracing::info!(guest = %uuid, "incoming migration abandoned; its keys are erased");
        Ok(None)
    }

    /// Source: libvirt migrates the guest; then its keys and volume entries
    /// are erased here. Repeatable: a guest already gone from here but
    /// present at the destination counts as migrated. Returns its state at
    /// the destination.
    pub fn migrate_guest(&self, r: MigrateGuest) -> Result<DomainState, OpsError> {
        let uuid = r.guest.hyphenated().to_string();
        let dest = r.destination.as_str();
        // Read before libvirt migrates: its undefine event erases the record.
        let rec = self.store.load(&uuid)?;
        if self.hv.domain_state(&uuid)?.is_some() {
            self.hv
                .migrate_domain(&uuid, dest, r.migration_uri.as_deref(), r.live, r.unsafe_)?;
        }
        let there = self
            .hv
            .remote_domain_state(dest, &uuid)
            .map_err(|e| OpsError::Remote(e.to_string()))?;
        let Some(state) = there else {
            return Err(OpsError::Precondition(format!(
                "domain {uuid} is neither on this host nor at {dest}"
            )));
        };
        let _guard = self.lock();
        self.forget_guest_here(&uuid, rec)?;
        tracing::info!(guest = %uuid, %dest, "guest migrated; its keys are erased here");
        Ok(state)
    }
}
