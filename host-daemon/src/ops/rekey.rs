//! Rekeys: shallow (a new passphrase in a new keyslot, the old keyslots
//! erased) or deep (the data copied under a new data key); online when a
//! guest runs on the volume (a block copy to a new image, then a pivot).
//!
//! Safe to repeat after a crash at any point: the server keeps both
//! generations until this returns, and a volume that the new key already
//! opens (and the old one no longer does) only gets its records updated.

use xdr_wipe::{BoundedVec, Opaque};

use super::requests::Rekey;
use super::{Daemon, OpsError, internal};
use crate::model::{Format, InvalidInput, Placement, RekeyKind, copy_path, legacy_copy_path};

impl Daemon {
    /// Rekeys a volume; guests' sealed records move to the new generation.
    /// Returns the generation now active.
    pub fn rekey(&self, r: Rekey) -> Result<u64, OpsError> {
        if r.old_key.generation != r.from_generation
            || r.new_key.generation != r.from_generation + 1
        {
            return Err(OpsError::Invalid(InvalidInput(
                "key generations do not match the rekey".into(),
            )));
        }
        let vid = r.volume;
        let old = self.open_key(&r.old_key.sealed, vid, r.old_key.generation)?;
        let (new, split) = self.open_key_split(&r.new_key.sealed, vid, r.new_key.generation)?;
        let format = Format::of_packet(new.params.format);
        let _guard = self.lock();
        let vols = self.store.volumes()?;
        let v = vols.get(&vid.to_string()).ok_or_else(|| {
            OpsError::Precondition(format!("volume {vid} was not created on this host"))
        })?;
        // Guests using it, and the one that runs (then: online).
        let users = self.users_of(vid)?;
        let mut running = None;
        for rec in &users {
            if self
                .hv
                .domain_state(rec.uuid.as_str())?
                .is_some_and(|s| s.holds_disks())
            {
                running = Some(rec.uuid.to_string());
                break;
            }
        }
        let (o, n) = (old.secret.expose_secret(), new.secret.expose_secret());
        self.finish_interrupted_copy(&v.path, r.new_key.generation)?;
        let new_opens = self.images.opens_with(&v.path, format, n)?;
        let old_opens = self.images.opens_with(&v.path, format, o)?;
        // Already done (a repeat after a crash) when only the new key opens.
        let done = new_opens && !old_opens;
        match (r.placement, &running) {
            (Placement::Offline, Some(guest)) if !done => {
                return Err(OpsError::Aborted(format!(
                    "guest {guest} runs on volume {}: stop it for an offline rekey, or leave out --offline",
                    v.name
                )));
            }
            (Placement::Online, None) if !done => {
                return Err(OpsError::Aborted(format!(
                    "no running guest uses volume {}: leave out --online (it is then rekeyed offline)",
                    v.name
                )));
            }
            _ => {}
        }
        if !done {
            if !old_opens && !new_opens {
                return Err(OpsError::Precondition(format!(
                    "neither the current nor the new key opens volume {} ({})",
                    v.name, v.path
                )));
            }
            match (&running, r.kind) {
                // A running guest: always an online deep rekey (block copy
                // to a new image, pivot). A shallow rekey would need QEMU's
                // blockdev-amend, which libvirt 9.0 does not offer; the deep
                // one also replaces the data key, which is stronger.
                (Some(guest), _) => {
                    let size = self.images.virtual_size(&v.path)?;
                    self.copy_online(guest, v, r.new_key.generation, format, n, size, r.bandwidth)?;
                }
                (None, RekeyKind::Deep) => {
                    self.images.deep_rekey(&v.path, format, o, n, r.bandwidth)?
                }
                (None, RekeyKind::Shallow) => {
                    self.images.replace_passphrase(&v.path, format, o, n)?
                }
            }
        }
        drop((old, new));
        // Whatever a crash interrupted (even a pivot whose QEMU died), a
        // guest's definition must name the volume's own path again.
        for rec in &users {
            for copy in [
                copy_path(&v.path, r.new_key.generation),
                legacy_copy_path(&v.path),
            ] {
                self.hv.fix_definition(rec.uuid.as_str(), &copy, &v.path)?;
            }
        }
        if running.is_none() {
            // A copy left by an interrupted online rekey is not needed.
            if let Err(e) = self.images.discard_copies(&v.path) {
                tracing::warn!(path = %v.path, error = %e, "a leftover copy was not removed");
            }
        }
        for mut rec in users {
            let mut keys =
                std::mem::replace(&mut rec.keys, BoundedVec::new(vec![]).map_err(internal)?)
                    .into_inner();
            for k in keys.iter_mut().filter(|k| k.volume_id == vid) {
                k.generation = r.new_key.generation;
                // A key this host keeps no copy of stays so.
                if !k.sealed.is_empty() {
                    k.sealed = Opaque::new(r.new_key.sealed.clone()).map_err(internal)?;
                }
            }
            rec.keys = BoundedVec::new(keys).map_err(internal)?;
            self.store.save(&rec)?;
        }
        tracing::info!(volume = %vid, generation = r.new_key.generation, deep = r.kind == RekeyKind::Deep, "volume rekeyed");
        if split {
            // The old generation's half opens nothing any more.
            self.forget_halves(vid, r.new_key.generation);
        }
        Ok(r.new_key.generation)
    }
}
