//! Volumes: create (or encrypt an existing cleartext one), decrypt, delete,
//! and the online copy that a running guest's disk moves to.

use super::requests::{CreateVolume, DecryptVolume, DeleteVolume};
use super::{Daemon, OpsError};
use crate::image::Images;
use crate::libvirt::{CopyTarget, DiskSource, Hypervisor};
use crate::model::{Format, VolumeEntry};

impl Daemon {
    /// Creates a volume from a pushed key (or encrypts an existing
    /// cleartext one); keeps no key afterwards. Returns its path and size.
    pub fn create_volume(&self, r: CreateVolume) -> Result<(String, u64), OpsError> {
        if let Some(path) = self.recall(&r.op_id) {
            let size = self.images.virtual_size(&path).unwrap_or(r.capacity);
            return Ok((path, size));
        }
        let id = r.volume.to_string();
        let t0 = std::time::Instant::now();
        let _claimed = self.creations.claim(&id);
        // Without the lock (the registry is replaced whole, atomically; the
        // claim keeps other operations on this volume out): a group's write
        // holds the lock for a pool refresh.
        if let Some(v) = self.store.volumes()?.get(&id) {
            if self.hv.volume_path(&v.pool, &v.name)?.is_some() {
                let size = self.images.virtual_size(&v.path).unwrap_or(r.capacity);
                return Ok((v.path.clone(), size));
            }
        }
        // A new image's key is opened only once its slot is free: a batch
        // of hundreds waiting keeps no key in clear.
        let slot = (!r.encrypt_existing).then(|| self.creations.slot());
        let packet = self.open_key(&r.key.sealed, r.volume, r.key.generation)?;
        let key = packet.secret.expose_secret();
        let t_key = t0.elapsed();
        let (path, size) = if r.encrypt_existing {
            // Rare and long: alone, under the lock, as every other change.
            let _guard = self.lock();
            self.encrypt_existing(&r, key)?
        } else {
            self.make_image(&r, key)?
        };
        drop(slot);
        drop(packet);
        let t_image = t0.elapsed();
        let entry = VolumeEntry {
            volume_id: id.clone(),
            name: r.name.to_string(),
            pool: r.pool.to_string(),
            path: path.clone(),
            secret_uuid: r.secret.hyphenated().to_string(),
        };
        self.creations
            .commit(entry, &|group| {
                self.register(group).map_err(|e| e.to_string())
            })
            .map_err(|e| {
                OpsError::Internal(format!("volume {id} was made but not registered: {e}"))
            })?;
        self.remember(&r.op_id, &path);
        tracing::debug!(
            volume = %id,
            key_ms = t_key.as_secs_f64() * 1e3,
            image_ms = (t_image - t_key).as_secs_f64() * 1e3,
            commit_ms = (t0.elapsed() - t_image).as_secs_f64() * 1e3,
            "creation stages"
        );
        tracing::info!(volume = %id, %path, encrypted_existing = r.encrypt_existing, "volume created");
        Ok((path, size))
    }

    /// Makes the image of the new volume `r` under `key`, outside the lock
    /// (the file's exclusive creation keeps two makers apart). A file of
    /// that name that `key` opens was made by an earlier try of this
    /// request that stopped before the registry (the key is random and
    /// came only here): it is taken as made.
    fn make_image(&self, r: &CreateVolume, key: &[u8]) -> Result<(String, u64), OpsError> {
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let dir = self.hv.pool_dir(pool)?;
        let path = dir.join(name).to_string_lossy().into_owned();
        match self.images.opens_with(&path, r.format, key) {
            Ok(true) => {
                // It may have stopped before its owner, mode and syncs.
                self.images.settle(&path)?;
                tracing::info!(%path, "an image an earlier try made is taken as made");
                return Ok((path, r.capacity));
            }
            Ok(false) => {
                return Err(OpsError::Precondition(format!(
                    "volume {name} already exists in pool {pool} ({path})"
                )));
            }
            // No such file (or none QEMU reads): made now, exclusively.
            Err(_) => {}
        }
        // Our own LUKS header, not libvirt's vol-create: it lets us choose
        // the iteration count (the key is random; stretching only slows
        // every guest start) and keeps the key in this process.
        self.images.create(&path, r.format, r.capacity, key)?;
        Ok((path, r.capacity))
    }

    /// Puts made volumes in the registry and the hook's managed list, and
    /// lets libvirt see them (one refresh a pool): with the lock, once for
    /// a group of creations.
    fn register(&self, group: &[VolumeEntry]) -> Result<(), OpsError> {
        let t0 = std::time::Instant::now();
        let _guard = self.lock();
        let mut vols = self.store.volumes()?;
        for v in group {
            vols.insert(v.volume_id.clone(), v.clone());
        }
        self.store.save_volumes(&vols)?;
        self.write_managed_list_of(&vols)?;
        let pools: std::collections::BTreeSet<&str> =
            group.iter().map(|v| v.pool.as_str()).collect();
        for pool in pools {
            if let Err(e) = self.hv.refresh_pool(pool) {
                tracing::warn!(%pool, error = %e, "pool refresh failed; libvirt sees the volume at its next refresh");
            }
        }
        tracing::debug!(
            volumes = group.len(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "creations registered together"
        );
        Ok(())
    }

    /// Encrypts the existing cleartext volume of `r` under `key`: offline,
    /// or online (block copy and pivot) when a guest runs on it. Repeatable:
    /// an image that `key` already opens was done before a crash.
    fn encrypt_existing(&self, r: &CreateVolume, key: &[u8]) -> Result<(String, u64), OpsError> {
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let path = self.hv.volume_path(pool, name)?.ok_or_else(|| {
            OpsError::Precondition(format!(
                "there is no volume {name} in pool {pool} on this host"
            ))
        })?;
        self.finish_interrupted_copy(&path, r.key.generation)?;
        let info = self.images.info(&path, r.format)?;
        if info.encrypted {
            if self
                .images
                .opens_with(&path, r.format, key)
                .unwrap_or(false)
            {
                return Ok((path, info.virtual_size));
            }
            return Err(OpsError::Precondition(format!(
                "volume {name} ({path}) is already encrypted: guestkey encrypts cleartext volumes only"
            )));
        }
        if info.backing {
            return Err(OpsError::Precondition(format!(
                "volume {name} ({path}) has a backing file or an external data file: make it self-contained first (qemu-img convert, or virsh blockpull while a guest runs)"
            )));
        }
        let source = DiskSource {
            path: &path,
            pool,
            volume: name,
        };
        let running = self.hv.running_domains_using(source)?;
        match running.as_slice() {
            [] => self.images.encrypt(&path, r.format, key)?,
            [guest] => {
                let v = VolumeEntry {
                    volume_id: r.volume.to_string(),
                    name: name.to_owned(),
                    pool: pool.to_owned(),
                    path: path.clone(),
                    secret_uuid: r.secret.hyphenated().to_string(),
                };
                self.copy_online(
                    guest,
                    &v,
                    r.key.generation,
                    r.format,
                    key,
                    info.virtual_size,
                    0,
                )?;
            }
            _ => {
                return Err(OpsError::Precondition(format!(
                    "{} running guests share volume {name}: stop all but one first",
                    running.len()
                )));
            }
        }
        Ok((path, info.virtual_size))
    }

    /// Turns a volume back into cleartext and forgets it. No guest of this
    /// host may hold its key.
    pub fn decrypt_volume(&self, r: DecryptVolume) -> Result<(String, u64), OpsError> {
        let (packet, split) = self.open_key_split(&r.key.sealed, r.volume, r.key.generation)?;
        let format = Format::of_packet(packet.params.format);
        let id = r.volume.to_string();
        let _claimed = self.creations.claim(&id);
        let _guard = self.lock();
        let mut vols = self.store.volumes()?;
        let Some(v) = vols.get(&id).cloned() else {
            return Err(OpsError::Precondition(format!(
                "volume {id} is not on this host"
            )));
        };
        if let Some(rec) = self.users_of(r.volume)?.first() {
            return Err(OpsError::Precondition(format!(
                "guest {} ({}) uses volume {}: undefine it first",
                rec.name.as_str(),
                rec.uuid.as_str(),
                v.name
            )));
        }
        if self.images.info(&v.path, format)?.encrypted {
            self.images
                .decrypt(&v.path, format, packet.secret.expose_secret())?;
        }
        drop(packet);
        vols.remove(&id);
        self.store.save_volumes(&vols)?;
        self.write_managed_list()?;
        tracing::warn!(volume = %id, path = %v.path, "volume decrypted on the admin's request");
        let size = self.images.virtual_size(&v.path).unwrap_or(0);
        if split {
            self.forget_halves(r.volume, 0);
        }
        Ok((v.path, size))
    }

    /// Deletes a volume (a missing one is done already).
    pub fn delete_volume(&self, r: DeleteVolume) -> Result<(), OpsError> {
        // After a creation of it that still runs.
        let claimed = self.creations.claim(&r.volume.to_string());
        let guard = self.lock();
        self.hv.delete_volume(r.pool.as_str(), r.name.as_str())?;
        let mut vols = self.store.volumes()?;
        if let Some(v) = vols.remove(&r.volume.to_string()) {
            // A copy a crash left in the staging directory goes too.
            if let Err(e) = self.images.discard_copies(&v.path) {
                tracing::warn!(path = %v.path, error = %e, "a leftover copy was not removed");
            }
        }
        self.store.save_volumes(&vols)?;
        self.write_managed_list()?;
        drop(guard);
        drop(claimed);
        // A split key's other half, if the verifier keeps one.
        self.forget_halves(r.volume, 0);
        Ok(())
    }

    /// A crash between an online copy's pivot and its swap leaves the guest
    /// running on the copy, while the volume's own file holds data from
    /// before the pivot: then the copy is the volume. It is moved into
    /// place first (the stale file wiped), so that nothing works on, or
    /// removes, the image the guest writes to. The copy is named by the key
    /// generation it is under, so a guest still showing the copy name of an
    /// earlier, finished rekey is not taken for this one, and a copy that
    /// was moved already is not moved again. Returns whether it moved one.
    pub(super) fn finish_interrupted_copy(
        &self,
        path: &str,
        generation: u64,
    ) -> Result<bool, OpsError> {
        let copy = crate::model::copy_path(path, generation);
        let on_copy = self.hv.running_domains_using(DiskSource {
            path: &copy,
            pool: "",
            volume: "",
        })?;
        if on_copy.is_empty() {
            return Ok(false);
        }
        let moved = self.images.swap_in_copy(path, generation)?;
        if moved {
            tracing::warn!(%path, guests = ?on_copy, "a guest ran on the copy of an interrupted online copy: moved it into place");
        }
        Ok(moved)
    }

    /// The disk of volume `v` of the running `guest` moves into a new LUKS
    /// image under `key` (of `generation`): see [`copy_online`].
    #[allow(clippy::too_many_arguments)] // the copy's parts, each named once
    pub(super) fn copy_online(
        &self,
        guest: &str,
        v: &VolumeEntry,
        generation: u64,
        format: Format,
        key: &[u8],
        size: u64,
        bandwidth: u64,
    ) -> Result<(), OpsError> {
        let online = Online {
            guest,
            volume: v,
            generation,
            format,
            size,
            bandwidth,
        };
        copy_online(self.hv.as_ref(), self.images.as_ref(), &online, key, &|s| {
            self.drop_secret(s)
        })
    }
}

/// What an online copy moves.
pub struct Online<'a> {
    /// The running guest.
    pub guest: &'a str,
    /// Its volume.
    pub volume: &'a VolumeEntry,
    /// The key generation the copy is under (it names the copy).
    pub generation: u64,
    /// The volume's container.
    pub format: Format,
    /// The volume's size.
    pub size: u64,
    /// Bytes per second at most (0: no limit).
    pub bandwidth: u64,
}

/// The disk of the running guest moves into a new LUKS image under `key`:
/// the volume's ephemeral libvirt secret for it, block copy and pivot (the
/// guest keeps running), then the new image takes the old one's place and
/// the old one is wiped. Serves the online deep rekey and the online
/// encryption of a cleartext volume (and the rekey benchmark). `remove`
/// removes a libvirt secret (true: gone).
pub fn copy_online(
    hv: &dyn Hypervisor,
    images: &dyn Images,
    o: &Online<'_>,
    key: &[u8],
    remove: &dyn Fn(&str) -> bool,
) -> Result<(), OpsError> {
    let v = o.volume;
    let t0 = std::time::Instant::now();
    let copy = images.new_copy(&v.path, o.generation, o.format, o.size, key)?;
    let made = t0.elapsed();
    // The copy is opened through the volume's own libvirt secret (not in
    // use: QEMU opened the running disk long ago), so the definition
    // libvirt records at the pivot already names the right secret.
    let secret = v.secret_uuid.as_str();
    let target = CopyTarget {
        path: &copy,
        format: o.format,
        secret,
        bandwidth: o.bandwidth,
    };
    let source = DiskSource {
        path: &v.path,
        pool: &v.pool,
        volume: &v.name,
    };
    let copied = hv
        .set_secret(secret, &copy, key)
        .and_then(|()| hv.copy_running_disk(o.guest, source, &target));
    remove(secret);
    if let Err(e) = copied {
        if let Err(d) = images.discard_copies(&v.path) {
            tracing::warn!(path = %v.path, error = %d, "the failed copy was not removed");
        }
        return Err(e.into());
    }
    let t_copied = t0.elapsed();
    if !images.swap_in_copy(&v.path, o.generation)? {
        return Err(OpsError::Internal(format!(
            "the copy {copy} vanished before it was moved into place"
        )));
    }
    tracing::debug!(
        path = %v.path,
        new_copy_ms = made.as_millis() as u64,
        copy_ms = (t_copied - made).as_millis() as u64,
        swap_ms = (t0.elapsed() - t_copied).as_millis() as u64,
        "online copy swapped in"
    );
    Ok(())
}
