//! The daemon's logic ([`Daemon`]) and the host-agent gRPC service, a thin
//! adapter over it that only the management server's certificate may call.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use guestkey_proto::agent::{self as pb, host_agent_server::HostAgent};
use tonic::{Request, Response, Status};
use xdr_wipe::packet::VolumeId;
use xdr_wipe::{BoundedVec, Opaque, XdrString};

use crate::hypervisor::{Format, Hypervisor};
use crate::keys::HostKeys;
use crate::store::{GuestRecord, Store, StoredKey, VolumeEntry};

/// The host daemon's state.
pub struct Daemon {
    /// libvirt.
    pub hv: Box<dyn Hypervisor>,
    /// Sealed guest store and volume registry.
    pub store: Store,
    /// Host name and sealing key.
    pub keys: HostKeys,
    /// Outcomes of operations already done, by operation id.
    done: Mutex<HashMap<String, String>>,
    /// Serialises changes to the store and the registry.
    changes: Mutex<()>,
    /// Where the list of managed secret UUIDs goes (for the hook).
    managed_list: std::path::PathBuf,
    /// The user libvirtd and so the hook run as (0 for the system daemon).
    hook_uid: u32,
}

fn valid_name(what: &str, s: &str) -> Result<(), Status> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && !s.contains('/')
        && !s.contains("..")
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("invalid {what} {s:?}")))
    }
}

fn volume_id(s: &str) -> Result<VolumeId, Status> {
    uuid::Uuid::parse_str(s)
        .map(VolumeId)
        .map_err(|_| Status::invalid_argument(format!("{s:?} is not a volume UUID")))
}

/// Name and UUID from domain XML (the server already validated the rest).
fn domain_identity(xml: &str) -> Result<(String, String), Status> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let (mut depth, mut current, mut name, mut uuid) =
        (0usize, String::new(), String::new(), String::new());
    loop {
        match r.read_event() {
            Ok(Event::Start(e)) => {
                depth += 1;
                current = if depth == 2 {
                    e.name().0.to_owned()
                } else {
                    String::new()
                };
            }
            Ok(Event::End(_)) => {
                depth = depth.saturating_sub(1);
                current.clear();
            }
            Ok(Event::Text(t)) if depth == 2 => match current.as_str() {
                "name" => name = t.xml10_content().trim().to_owned(),
                "uuid" => uuid = t.xml10_content().trim().to_ascii_lowercase(),
                _ => {}
            },
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(Status::invalid_argument(format!("domain XML: {e}"))),
        }
    }
    if name.is_empty() || uuid::Uuid::parse_str(&uuid).is_err() {
        return Err(Status::invalid_argument(
            "domain XML needs <name> and <uuid>",
        ));
    }
    Ok((name, uuid))
}

impl Daemon {
    /// A daemon over these parts.
    pub fn new(
        hv: Box<dyn Hypervisor>,
        store: Store,
        keys: HostKeys,
        managed_list: std::path::PathBuf,
        hook_uid: u32,
    ) -> Self {
        Self {
            hv,
            store,
            keys,
            done: Mutex::new(HashMap::new()),
            changes: Mutex::new(()),
            managed_list,
            hook_uid,
        }
    }

    /// Rewrites the list of secret UUIDs of volumes created here, which the
    /// hook reads when guestkeyd does not answer (no keys in it).
    pub fn write_managed_list(&self) -> Result<(), String> {
        let vols = self.store.volumes().map_err(|e| e.to_string())?;
        let text: String = vols
            .values()
            .map(|v| format!("{}\n", v.secret_uuid))
            .collect();
        if let Some(dir) = self.managed_list.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        crate::state::write_atomic(&self.managed_list, text.as_bytes())
            .and_then(|()| match self.hook_uid {
                0 => Ok(()),
                uid => std::os::unix::fs::chown(&self.managed_list, Some(uid), None),
            })
            .map_err(|e| format!("{}: {e}", self.managed_list.display()))
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

    /// Creates a volume from a pushed key (or encrypts an existing
    /// cleartext one, [`pb::CreateVolumeRequest::encrypt_existing`]); keeps
    /// no key afterwards. Returns its path and virtual size.
    pub fn create_volume(&self, r: pb::CreateVolumeRequest) -> Result<(String, u64), Status> {
        if let Some(path) = self.recall(&r.op_id) {
            let size = crate::luks::virtual_size(&path).unwrap_or(r.capacity_bytes);
            return Ok((path, size));
        }
        valid_name("pool name", &r.pool)?;
        valid_name("volume name", &r.name)?;
        uuid::Uuid::parse_str(&r.secret_uuid)
            .map_err(|_| Status::invalid_argument("secret_uuid is not a UUID"))?;
        let key = r
            .key
            .clone()
            .ok_or_else(|| Status::invalid_argument("no key packet"))?;
        let vid = volume_id(&r.volume_id)?;
        if key.volume_id != r.volume_id {
            return Err(Status::invalid_argument(
                "the key packet is for another volume",
            ));
        }
        let _guard = self.lock();
        let mut vols = self.store.volumes().map_err(internal)?;
        if let Some(v) = vols.get(&r.volume_id) {
            if self
                .hv
                .volume_path(&v.pool, &v.name)
                .map_err(internal)?
                .is_some()
            {
                let size = crate::luks::virtual_size(&v.path).unwrap_or(r.capacity_bytes);
                return Ok((v.path.clone(), size));
            }
        }
        let packet = self
            .keys
            .open(&key.sealed_packet, vid, key.generation)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let format = match pb::VolumeFormat::try_from(r.format) {
            Ok(pb::VolumeFormat::Raw) => Format::Raw,
            _ => Format::Qcow2,
        };
        let (path, size) = if r.encrypt_existing {
            self.encrypt_existing(&r, format, packet.secret.expose_secret())?
        } else {
            let path = self
                .hv
                .create_volume(
                    &r.pool,
                    &r.name,
                    r.capacity_bytes,
                    format,
                    packet.secret.expose_secret(),
                )
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            (path, r.capacity_bytes)
        };
        drop(packet);
        vols.insert(
            r.volume_id.clone(),
            VolumeEntry {
                volume_id: r.volume_id.clone(),
                name: r.name,
                pool: r.pool,
                path: path.clone(),
                secret_uuid: r.secret_uuid.to_ascii_lowercase(),
            },
        );
        self.store.save_volumes(&vols).map_err(internal)?;
        self.write_managed_list().map_err(internal)?;
        self.remember(&r.op_id, &path);
        tracing::info!(volume = %r.volume_id, %path, encrypted_existing = r.encrypt_existing, "volume created");
        Ok((path, size))
    }

    /// Encrypts the existing cleartext volume of `r` under `key`: offline,
    /// or online (block copy and pivot) when a guest runs on it. Repeatable:
    /// an image that `key` already opens was done before a crash.
    fn encrypt_existing(
        &self,
        r: &pb::CreateVolumeRequest,
        format: Format,
        key: &[u8],
    ) -> Result<(String, u64), Status> {
        let path = self
            .hv
            .volume_path(&r.pool, &r.name)
            .map_err(|e| Status::failed_precondition(e.to_string()))?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "there is no volume {} in pool {} on this host",
                    r.name, r.pool
                ))
            })?;
        let fail = |e: crate::hypervisor::HvError| Status::failed_precondition(e.to_string());
        let info = crate::luks::image_info(&path, format).map_err(fail)?;
        if info.encrypted {
            if crate::luks::opens_with(&path, format, key).unwrap_or(false) {
                return Ok((path, info.virtual_size));
            }
            return Err(Status::failed_precondition(format!(
                "volume {} ({path}) is already encrypted: guestkey encrypts cleartext volumes only",
                r.name
            )));
        }
        if info.backing {
            return Err(Status::failed_precondition(format!(
                "volume {} ({path}) has a backing file: flatten it first (qemu-img convert or virsh blockpull)",
                r.name
            )));
        }
        let running = self
            .hv
            .running_domains_using(&path, &r.pool, &r.name)
            .map_err(fail)?;
        match running.as_slice() {
            [] => crate::luks::encrypt_offline(&path, format, key).map_err(fail)?,
            [guest] => {
                let v = VolumeEntry {
                    volume_id: r.volume_id.clone(),
                    name: r.name.clone(),
                    pool: r.pool.clone(),
                    path: path.clone(),
                    secret_uuid: r.secret_uuid.to_ascii_lowercase(),
                };
                copy_online(
                    self.hv.as_ref(),
                    guest,
                    &v,
                    format,
                    key,
                    info.virtual_size,
                    0,
                )
                .map_err(fail)?;
            }
            _ => {
                return Err(Status::failed_precondition(format!(
                    "{} running guests share volume {}: stop all but one first",
                    running.len(),
                    r.name
                )));
            }
        }
        Ok((path, info.virtual_size))
    }

    /// Turns a volume back into cleartext and forgets it. No guest of this
    /// host may hold its key.
    pub fn decrypt_volume(&self, r: pb::DecryptVolumeRequest) -> Result<(String, u64), Status> {
        let vid = volume_id(&r.volume_id)?;
        let key = r
            .key
            .ok_or_else(|| Status::invalid_argument("no key packet"))?;
        let packet = self
            .keys
            .open(&key.sealed_packet, vid, key.generation)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let format = match packet.params.format {
            xdr_wipe::packet::VolumeFormat::Raw => Format::Raw,
            xdr_wipe::packet::VolumeFormat::Qcow2 => Format::Qcow2,
        };
        let _guard = self.lock();
        let mut vols = self.store.volumes().map_err(internal)?;
        let Some(v) = vols.get(&r.volume_id).cloned() else {
            return Err(Status::failed_precondition(format!(
                "volume {} is not on this host",
                r.volume_id
            )));
        };
        if let Some(rec) = self.users_of(vid)?.first() {
            return Err(Status::failed_precondition(format!(
                "guest {} ({}) uses volume {}: undefine it first",
                rec.name.as_str(),
                rec.uuid.as_str(),
                v.name
            )));
        }
        let fail = |e: crate::hypervisor::HvError| Status::failed_precondition(e.to_string());
        let info = crate::luks::image_info(&v.path, format).map_err(fail)?;
        if info.encrypted {
            crate::luks::decrypt_offline(&v.path, format, packet.secret.expose_secret())
                .map_err(fail)?;
        }
        drop(packet);
        vols.remove(&r.volume_id);
        self.store.save_volumes(&vols).map_err(internal)?;
        self.write_managed_list().map_err(internal)?;
        tracing::warn!(volume = %r.volume_id, path = %v.path, "volume decrypted on the admin's request");
        let size = crate::luks::virtual_size(&v.path).unwrap_or(0);
        Ok((v.path, size))
    }

    /// Deletes a volume.
    pub fn delete_volume(&self, r: pb::DeleteVolumeRequest) -> Result<(), Status> {
        valid_name("pool name", &r.pool)?;
        valid_name("volume name", &r.name)?;
        let _guard = self.lock();
        self.hv
            .delete_volume(&r.pool, &r.name)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let mut vols = self.store.volumes().map_err(internal)?;
        vols.remove(&r.volume_id);
        self.store.save_volumes(&vols).map_err(internal)?;
        self.write_managed_list().map_err(internal)?;
        Ok(())
    }

    /// Stores a guest's sealed keys and defines it in libvirt.
    pub fn define_guest(&self, r: pb::DefineGuestRequest) -> Result<String, Status> {
        let _guard = self.lock();
        let vols = self.store.volumes().map_err(internal)?;
        let (uuid, record) = self.guest_record(&r.domain_xml, r.keys, |id| {
            vols.get(id).ok_or_else(|| {
                Status::failed_precondition(format!("volume {id} was not created on this host"))
            })
        })?;
        self.store.save(&record).map_err(internal)?;
        if let Err(e) = self.hv.define_domain(&r.domain_xml) {
            // No half-defined guest: the record goes with the failure.
            let _ = self.store.erase(&uuid);
            return Err(Status::failed_precondition(e.to_string()));
        }
        tracing::info!(guest = %uuid, "guest defined");
        Ok(uuid)
    }

    /// The sealed record of the guest `domain_xml` with `keys`, each key
    /// checked to open now (refused here rather than at start time) and
    /// bound to its volume's secret and path, found by `volume`. Returns the
    /// guest's UUID and the record.
    fn guest_record<'v>(
        &self,
        domain_xml: &str,
        keys: Vec<pb::SealedKey>,
        volume: impl Fn(&str) -> Result<&'v VolumeEntry, Status>,
    ) -> Result<(String, GuestRecord), Status> {
        let (name, uuid) = domain_identity(domain_xml)?;
        let mut stored = Vec::with_capacity(keys.len());
        for k in keys {
            let vid = volume_id(&k.volume_id)?;
            let v = volume(&k.volume_id)?;
            drop(
                self.keys
                    .open(&k.sealed_packet, vid, k.generation)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            );
            stored.push(StoredKey {
                volume_id: vid,
                generation: k.generation,
                secret_uuid: XdrString::new(v.secret_uuid.clone()).map_err(internal)?,
                path: XdrString::new(v.path.clone()).map_err(internal)?,
                sealed: Opaque::new(k.sealed_packet).map_err(internal)?,
            });
        }
        let record = GuestRecord {
            uuid: XdrString::new(uuid.clone()).map_err(internal)?,
            name: XdrString::new(name)
                .map_err(|_| Status::invalid_argument("domain name too long"))?,
            domain_xml: XdrString::new(domain_xml.to_owned())
                .map_err(|_| Status::invalid_argument("domain XML over 1 MiB"))?,
            keys: BoundedVec::new(stored)
                .map_err(|_| Status::invalid_argument("more than 256 encrypted disks"))?,
        };
        Ok((uuid, record))
    }

    /// Undefines a guest and erases its keys.
    pub fn undefine_guest(&self, uuid: &str) -> Result<(), Status> {
        let _guard = self.lock();
        self.hv
            .undefine_domain(uuid)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.forget_guest(uuid);
        Ok(())
    }

    /// Erases a guest's keys (sealed record and any libvirt secret).
    pub fn forget_guest(&self, uuid: &str) {
        if let Ok(Some(rec)) = self.store.load(uuid) {
            for k in rec.keys.iter() {
                let _ = self.hv.remove_secret(k.secret_uuid.as_str());
            }
        }
        match self.store.erase(uuid) {
            Ok(true) => tracing::info!(guest = %uuid, "guest keys erased"),
            Ok(false) => {}
            Err(e) => tracing::error!(guest = %uuid, error = %e, "cannot erase guest keys"),
        }
    }

    /// For the hook's `prepare`: defines the guest's volume secrets.
    pub fn prepare_secrets(&self, domain: &str, wanted: &BTreeSet<String>) -> Result<(), String> {
        let rec = self.store.load(domain).map_err(|e| e.to_string())?;
        let vols = self.store.volumes().map_err(|e| e.to_string())?;
        let held: BTreeSet<String> = rec
            .as_ref()
            .map(|r| r.keys.iter().map(|k| k.secret_uuid.to_string()).collect())
            .unwrap_or_default();
        // A disk naming one of our volumes whose key this guest does not hold.
        for s in wanted.difference(&held) {
            if let Some(v) = vols.values().find(|v| &v.secret_uuid == s) {
                return Err(format!(
                    "this host holds no key of volume {} ({}) for domain {domain}: define the guest with `guestkeyctl guest define`",
                    v.name, v.path
                ));
            }
        }
        let Some(rec) = rec else { return Ok(()) };
        for k in rec.keys.iter() {
            let packet = self
                .keys
                .open_stored(k)
                .map_err(|e| format!("key of volume {}: {e}", k.volume_id))?;
            self.hv
                .set_secret(
                    k.secret_uuid.as_str(),
                    k.path.as_str(),
                    packet.secret.expose_secret(),
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// For the hook's `release`: removes the guest's volume secrets.
    pub fn release_secrets(&self, domain: &str, wanted: &BTreeSet<String>) -> Result<(), String> {
        let mut all: BTreeSet<String> = wanted.clone();
        if let Ok(Some(rec)) = self.store.load(domain) {
            all.extend(rec.keys.iter().map(|k| k.secret_uuid.to_string()));
        }
        let ours: BTreeSet<String> = self
            .store
            .volumes()
            .map_err(|e| e.to_string())?
            .values()
            .map(|v| v.secret_uuid.clone())
            .collect();
        for s in all.intersection(&ours) {
            self.hv.remove_secret(s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// At start-up, once libvirt answers: erases the keys of stored guests
    /// that libvirt no longer knows, and starts the stored guests that
    /// libvirt marks for autostart but that do not run, because libvirt's own
    /// autostart came before guestkeyd (see docs/host-daemon.md, "Boot").
    /// Needs no management server. Returns the guests started.
    pub fn catch_up_autostart(&self) -> Vec<String> {
        let mut started = vec![];
        let Ok(guests) = self.store.guests() else {
            return started;
        };
        for uuid in guests {
            match (self.hv.domain_autostart(&uuid), self.hv.domain_state(&uuid)) {
                (Ok(Some(true)), Ok(Some(state))) if state != "running" && state != "paused" => {
                    match self.hv.start_domain(&uuid) {
                        Ok(_) => {
                            tracing::info!(guest = %uuid, "autostarted");
                            started.push(uuid);
                        }
                        Err(e) => tracing::error!(guest = %uuid, error = %e, "autostart failed"),
                    }
                }
                (Ok(None), _) => {
                    // Undefined while guestkeyd was not running: its keys go.
                    tracing::info!(guest = %uuid, "guest no longer defined in libvirt");
                    self.forget_guest(&uuid);
                }
                _ => {}
            }
        }
        started
    }

    /// Rekey of a stopped volume: shallow (new passphrase in a new keyslot,
    /// old keyslots erased) or deep (data copied under a new data key, see
    /// [`crate::luks::deep_rekey`]); guests' sealed records move to the new
    /// generation.
    /// Safe to repeat after a crash at any point: the server keeps both
    /// generations until this returns, and a volume that the new key
    /// already opens (and the old one no longer does) only gets its records
    /// updated. Returns the generation now active.
    pub fn rekey(&self, r: pb::RekeyRequest) -> Result<u64, Status> {
        let deep = match pb::RekeyKind::try_from(r.kind) {
            Ok(pb::RekeyKind::Shallow) => false,
            Ok(pb::RekeyKind::Deep) => true,
            _ => {
                return Err(Status::invalid_argument(
                    "rekey kind must be shallow or deep",
                ));
            }
        };
        let vid = volume_id(&r.volume_id)?;
        let old_key = r
            .old_key
            .ok_or_else(|| Status::invalid_argument("no old key packet"))?;
        let new_key = r
            .new_key
            .ok_or_else(|| Status::invalid_argument("no new key packet"))?;
        if old_key.generation != r.from_generation || new_key.generation != r.from_generation + 1 {
            return Err(Status::invalid_argument(
                "key generations do not match the rekey",
            ));
        }
        let old = self
            .keys
            .open(&old_key.sealed_packet, vid, old_key.generation)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let new = self
            .keys
            .open(&new_key.sealed_packet, vid, new_key.generation)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let format = match new.params.format {
            xdr_wipe::packet::VolumeFormat::Raw => Format::Raw,
            xdr_wipe::packet::VolumeFormat::Qcow2 => Format::Qcow2,
        };
        let _guard = self.lock();
        let vols = self.store.volumes().map_err(internal)?;
        let v = vols.get(&r.volume_id).ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {} was not created on this host",
                r.volume_id
            ))
        })?;
        // Guests using it, and the one that runs (then: online).
        let users = self.users_of(vid)?;
        let running = users
            .iter()
            .map(|rec| rec.uuid.as_str())
            .find(|uuid| {
                matches!(self.hv.domain_state(uuid), Ok(Some(s)) if s == "running" || s == "paused")
            })
            .map(str::to_owned);
        let new_opens = crate::luks::opens_with(&v.path, format, new.secret.expose_secret())
            .map_err(internal)?;
        let old_opens = crate::luks::opens_with(&v.path, format, old.secret.expose_secret())
            .map_err(internal)?;
        // Already done (a repeat after a crash) when only the new key opens.
        let done = new_opens && !old_opens;
        match (r.placement.as_str(), &running) {
            ("offline", Some(guest)) if !done => {
                return Err(Status::aborted(format!(
                    "guest {guest} runs on volume {}: stop it for an offline rekey, or leave out --offline",
                    v.name
                )));
            }
            ("online", None) if !done => {
                return Err(Status::aborted(format!(
                    "no running guest uses volume {}: leave out --online (it is then rekeyed offline)",
                    v.name
                )));
            }
            _ => {}
        }
        if !done {
            if !old_opens && !new_opens {
                return Err(Status::failed_precondition(format!(
                    "neither the current nor the new key opens volume {} ({})",
                    v.name, v.path
                )));
            }
            let (o, n) = (old.secret.expose_secret(), new.secret.expose_secret());
            let result = match (&running, deep) {
                // A running guest: always an online deep rekey (block copy to
                // a new image, pivot). A shallow rekey would need QEMU's
                // blockdev-amend, which libvirt 9.0 does not offer; the deep
                // one also replaces the data key, which is stronger.
                (Some(guest), _) => {
                    self.online_rekey(guest, v, format, n, r.bandwidth_bytes_per_sec)
                }
                (None, true) => {
                    crate::luks::deep_rekey(&v.path, format, o, n, r.bandwidth_bytes_per_sec)
                }
                (None, false) => crate::luks::replace_passphrase(&v.path, format, o, n),
            };
            result.map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        drop((old, new));
        // Whatever a crash interrupted (even a pivot whose QEMU died), a
        // guest's definition must name the volume's own path again.
        let tmp = format!("{}.gk-rekey", v.path);
        for rec in &users {
            self.hv
                .fix_definition(rec.uuid.as_str(), &tmp, &v.path)
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        for mut rec in users {
            let mut keys =
                std::mem::replace(&mut rec.keys, BoundedVec::new(vec![]).map_err(internal)?)
                    .into_inner();
            for k in keys.iter_mut().filter(|k| k.volume_id == vid) {
                k.generation = new_key.generation;
                k.sealed = Opaque::new(new_key.sealed_packet.clone()).map_err(internal)?;
            }
            rec.keys = BoundedVec::new(keys).map_err(internal)?;
            self.store.save(&rec).map_err(internal)?;
        }
        tracing::info!(volume = %r.volume_id, generation = new_key.generation, deep, "volume rekeyed");
        Ok(new_key.generation)
    }

    /// Online deep rekey of the disk on `path` of the running `guest`:
    /// see [`Daemon::copy_online`].
    fn online_rekey(
        &self,
        guest: &str,
        v: &VolumeEntry,
        format: Format,
        new: &[u8],
        bandwidth: u64,
    ) -> Result<(), crate::hypervisor::HvError> {
        let size = crate::luks::virtual_size(&v.path)?;
        copy_online(self.hv.as_ref(), guest, v, format, new, size, bandwidth)
    }

    /// Destination of a migration: the guest's volumes must be visible here
    /// (shared storage, same pool and path); they join this host's registry
    /// and the guest's sealed keys are stored, so that the hook can hand
    /// them to the incoming QEMU. Nothing is defined in libvirt (the
    /// migration does that). Repeatable.
    pub fn prepare_migration(&self, r: pb::PrepareMigrationRequest) -> Result<String, Status> {
        let (_, uuid) = domain_identity(&r.domain_xml)?;
        let mut entries = Vec::with_capacity(r.volumes.len());
        for v in &r.volumes {
            volume_id(&v.volume_id)?;
            valid_name("pool name", &v.pool)?;
            valid_name("volume name", &v.name)?;
            uuid::Uuid::parse_str(&v.secret_uuid)
                .map_err(|_| Status::invalid_argument("secret_uuid is not a UUID"))?;
            match self.hv.volume_path(&v.pool, &v.name) {
                Ok(Some(p)) if p == v.path => {}
                Ok(Some(p)) => {
                    return Err(Status::failed_precondition(format!(
                        "volume {} of pool {} is at {p} on this host, not at {} as on the source: the guest's storage must be shared at the same path",
                        v.name, v.pool, v.path
                    )));
                }
                Ok(None) => {
                    return Err(Status::failed_precondition(format!(
                        "this host sees no volume {} in pool {} ({}): define the shared storage pool {} here first",
                        v.name, v.pool, v.path, v.pool
                    )));
                }
                Err(e) => {
                    return Err(Status::failed_precondition(format!(
                        "this host sees no volume {} ({}): {e}; define the shared storage pool {} here first",
                        v.name, v.path, v.pool
                    )));
                }
            }
            entries.push(VolumeEntry {
                volume_id: v.volume_id.clone(),
                name: v.name.clone(),
                pool: v.pool.clone(),
                path: v.path.clone(),
                secret_uuid: v.secret_uuid.to_ascii_lowercase(),
            });
        }
        let _guard = self.lock();
        let (_, record) = self.guest_record(&r.domain_xml, r.keys, |id| {
            entries.iter().find(|e| e.volume_id == id).ok_or_else(|| {
                Status::invalid_argument(format!("key for volume {id} without its volume"))
            })
        })?;
        let mut vols = self.store.volumes().map_err(internal)?;
        for e in entries {
            vols.insert(e.volume_id.clone(), e);
        }
        self.store.save_volumes(&vols).map_err(internal)?;
        self.write_managed_list().map_err(internal)?;
        self.store.save(&record).map_err(internal)?;
        tracing::info!(guest = %uuid, "incoming migration prepared");
        Ok(uuid)
    }

    /// Destination, after a failed migration: erases the prepared keys and
    /// volume entries, unless libvirt has the guest here after all.
    pub fn abort_migration(&self, uuid: &str) -> Result<String, Status> {
        if let Some(state) = self.hv.domain_state(uuid).map_err(internal)? {
            return Ok(state);
        }
        let _guard = self.lock();
        let rec = self.store.load(uuid).map_err(internal)?;
        self.forget_guest_here(uuid, rec)?;
        tracing::info!(guest = %uuid, "incoming migration abandoned; its keys are erased");
        Ok(String::new())
    }

    /// Source: libvirt migrates the guest to `destination_libvirt_uri`;
    /// then its keys and volume entries are erased here. Repeatable: a
    /// guest already gone from here but present at the destination counts
    /// as migrated. Returns its state at the destination.
    pub fn migrate_guest(&self, r: pb::MigrateGuestRequest) -> Result<String, Status> {
        let uuid = r.guest_uuid.to_ascii_lowercase();
        uuid::Uuid::parse_str(&uuid)
            .map_err(|_| Status::invalid_argument("guest_uuid is not a UUID"))?;
        if r.destination_libvirt_uri.is_empty() {
            return Err(Status::invalid_argument("no destination libvirt URI"));
        }
        let dest = r.destination_libvirt_uri.as_str();
        // Read before libvirt migrates: its undefine event erases the record.
        let rec = self.store.load(&uuid).map_err(internal)?;
        let here = self.hv.domain_state(&uuid).map_err(internal)?;
        if here.is_some() {
            let migration_uri = (!r.migration_uri.is_empty()).then_some(r.migration_uri.as_str());
            self.hv
                .migrate_domain(&uuid, dest, migration_uri, r.live, r.r#unsafe)
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        let there = self
            .hv
            .remote_domain_state(dest, &uuid)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let Some(state) = there else {
            return Err(Status::failed_precondition(format!(
                "domain {uuid} is neither on this host nor at {dest}"
            )));
        };
        let _guard = self.lock();
        self.forget_guest_here(&uuid, rec)?;
        tracing::info!(guest = %uuid, %dest, "guest migrated; its keys are erased here");
        Ok(state)
    }

    /// The guest is not this host's any more (it left, or never came):
    /// its keys go, and so do the volumes of its record `gone` (read before
    /// the erasure) that no remaining guest uses.
    fn forget_guest_here(&self, uuid: &str, gone: Option<GuestRecord>) -> Result<(), Status> {
        self.forget_guest(uuid);
        let Some(gone) = gone else { return Ok(()) };
        let used: BTreeSet<String> = self
            .records()?
            .iter()
            .flat_map(|rec| rec.keys.iter().map(|k| k.volume_id.to_string()))
            .collect();
        let mut vols = self.store.volumes().map_err(internal)?;
        for k in gone.keys.iter() {
            let id = k.volume_id.to_string();
            if !used.contains(&id) {
                vols.remove(&id);
            }
        }
        self.store.save_volumes(&vols).map_err(internal)?;
        self.write_managed_list().map_err(internal)
    }

    /// What this host holds keys for.
    pub fn inventory(&self) -> Result<Vec<pb::HeldKeyInfo>, Status> {
        let mut out = vec![];
        for rec in self.records()? {
            for k in rec.keys.iter() {
                out.push(pb::HeldKeyInfo {
                    volume_id: k.volume_id.to_string(),
                    generation: k.generation,
                    guest_uuid: rec.uuid.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Every stored guest record (unsealed).
    fn records(&self) -> Result<Vec<GuestRecord>, Status> {
        let mut out = vec![];
        for uuid in self.store.guests().map_err(internal)? {
            if let Some(rec) = self.store.load(&uuid).map_err(internal)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The stored guests that hold a key of volume `vid`.
    fn users_of(&self, vid: VolumeId) -> Result<Vec<GuestRecord>, Status> {
        let mut users = self.records()?;
        users.retain(|rec| rec.keys.iter().any(|k| k.volume_id == vid));
        Ok(users)
    }
}

/// The disk of volume `v` of the running `guest` moves into a new LUKS
/// image under `key`: the volume's ephemeral libvirt secret for it,
/// block copy and pivot (the guest keeps running), then the new image
/// takes the old one's name and the old one is wiped. Serves the
/// online deep rekey and the online encryption of a cleartext volume.
pub fn copy_online(
    hv: &dyn Hypervisor,
    guest: &str,
    v: &VolumeEntry,
    format: Format,
    key: &[u8],
    size: u64,
    bandwidth: u64,
) -> Result<(), crate::hypervisor::HvError> {
    let path = v.path.as_str();
    let tmp = format!("{path}.gk-rekey");
    let _ = std::fs::remove_file(&tmp);
    crate::luks::create_image(&tmp, format, size, key)?;
    // QEMU (whichever user it runs as) opens the copy like the original.
    if let Err(e) = crate::luks::copy_ownership(path, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The copy is opened through the volume's own libvirt secret (not in
    // use: QEMU opened the running disk long ago), so the definition
    // libvirt records at the pivot already names the right secret.
    let secret = v.secret_uuid.as_str();
    let copied = hv.set_secret(secret, &tmp, key).and_then(|()| {
        hv.copy_running_disk(
            guest,
            (path, &v.pool, &v.name),
            &tmp,
            format,
            secret,
            bandwidth,
        )
    });
    let _ = hv.remove_secret(secret);
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    crate::luks::swap_and_wipe(&tmp, path)
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// The host-agent service; only the pinned server certificate may call.
pub struct AgentService {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    /// SHA-256 (hex) of the management server's certificate.
    pub server_sha256: String,
}

impl AgentService {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let fp = req.peer_certs().and_then(|c| {
            c.first()
                .map(|c| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c.as_ref())))
        });
        match fp {
            Some(f) if f == self.server_sha256 => Ok(()),
            _ => Err(Status::permission_denied(
                "only this host's management server may call the host-agent API",
            )),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Daemon) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let d = self.daemon.clone();
        tokio::task::spawn_blocking(move || f(&d))
            .await
            .map_err(internal)?
    }
}

type R<T> = Result<Response<T>, Status>;

fn volume_result(
    op_id: String,
    volume_id: String,
    path: String,
    capacity_bytes: u64,
) -> R<pb::VolumeResult> {
    Ok(Response::new(pb::VolumeResult {
        op_id,
        volume_id,
        path,
        capacity_bytes,
    }))
}

fn guest_result(op_id: String, guest_uuid: String, state: String) -> R<pb::GuestResult> {
    Ok(Response::new(pb::GuestResult {
        op_id,
        guest_uuid,
        state,
    }))
}

#[tonic::async_trait]
impl HostAgent for AgentService {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> R<pb::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let (path, capacity_bytes) = self.blocking(move |d| d.create_volume(r)).await?;
        volume_result(op_id, volume_id, path, capacity_bytes)
    }

    async fn decrypt_volume(&self, req: Request<pb::DecryptVolumeRequest>) -> R<pb::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let (path, capacity_bytes) = self.blocking(move |d| d.decrypt_volume(r)).await?;
        volume_result(op_id, volume_id, path, capacity_bytes)
    }

    async fn delete_volume(&self, req: Request<pb::DeleteVolumeRequest>) -> R<pb::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        self.blocking(move |d| d.delete_volume(r)).await?;
        volume_result(op_id, volume_id, String::new(), 0)
    }

    async fn define_guest(&self, req: Request<pb::DefineGuestRequest>) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let op_id = r.op_id.clone();
        let (uuid, state) = self
            .blocking(move |d| {
                let uuid = d.define_guest(r)?;
                let state =
                    d.hv.domain_state(&uuid)
                        .map_err(internal)?
                        .unwrap_or_default();
                Ok((uuid, state))
            })
            .await?;
        guest_result(op_id, uuid, state)
    }

    async fn undefine_guest(&self, req: Request<pb::GuestRequest>) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = r.guest_uuid.clone();
        self.blocking(move |d| d.undefine_guest(&uuid)).await?;
        guest_result(r.op_id, r.guest_uuid, "undefined".into())
    }

    async fn start_guest(&self, req: Request<pb::GuestRequest>) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = r.guest_uuid.clone();
        let state = self
            .blocking(move |d| {
                d.hv.start_domain(&uuid)
                    .map_err(|e| Status::failed_precondition(e.to_string()))
            })
            .await?;
        guest_result(r.op_id, r.guest_uuid, state)
    }

    async fn stop_guest(&self, req: Request<pb::GuestRequest>) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = r.guest_uuid.clone();
        let state = self
            .blocking(move |d| {
                d.hv.stop_domain(&uuid)
                    .map_err(|e| Status::failed_precondition(e.to_string()))
            })
            .await?;
        guest_result(r.op_id, r.guest_uuid, state)
    }

    async fn prepare_migration(
        &self,
        req: Request<pb::PrepareMigrationRequest>,
    ) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let op_id = r.op_id.clone();
        let uuid = self.blocking(move |d| d.prepare_migration(r)).await?;
        guest_result(op_id, uuid, "prepared".into())
    }

    async fn abort_migration(&self, req: Request<pb::GuestRequest>) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = r.guest_uuid.clone();
        let state = self.blocking(move |d| d.abort_migration(&uuid)).await?;
        guest_result(r.op_id, r.guest_uuid, state)
    }

    async fn migrate_guest(&self, req: Request<pb::MigrateGuestRequest>) -> R<pb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, uuid) = (r.op_id.clone(), r.guest_uuid.clone());
        let state = self.blocking(move |d| d.migrate_guest(r)).await?;
        guest_result(op_id, uuid, state)
    }

    async fn rekey(&self, req: Request<pb::RekeyRequest>) -> R<pb::RekeyResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let active_generation = self.blocking(move |d| d.rekey(r)).await?;
        Ok(Response::new(pb::RekeyResult {
            op_id,
            volume_id,
            active_generation,
            state: "done".into(),
        }))
    }

    async fn get_inventory(&self, req: Request<pb::InventoryRequest>) -> R<pb::InventoryResult> {
        self.check(&req)?;
        let held = self.blocking(|d| d.inventory()).await?;
        Ok(Response::new(pb::InventoryResult {
            held,
            host_uuid: String::new(),
        }))
    }
}
