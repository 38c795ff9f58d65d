//! Guests: `guest define` turns an operator's libvirt domain XML into one
//! whose managed disks carry their `<encryption>` element, and queues it for
//! the host together with the keys of exactly those volumes; `undefine`,
//! `start` and `stop` are queued the same way. The pushes are
//! [`super::push`].

use crate::domain::{Core, now_unix};
use crate::domxml::{self, DiskSource};
use crate::model::{
    Caller, CoreError, GuestInfo, GuestOp, GuestState, InvalidInput, Name, VolumeInfo, VolumeState,
};
use crate::store::{NewGuest, Tx};

/// A managed disk of a guest being defined.
struct ManagedDisk {
    /// Index in the parsed domain's disks.
    index: usize,
    volume_id: String,
    secret_uuid: String,
    target: String,
}

fn bad_disk(disk: &domxml::Disk, why: String) -> InvalidInput {
    InvalidInput {
        what: "disk",
        value: format!("{} (line {})", disk.target, disk.line),
        why,
    }
}

fn no_such_guest(name_or_uuid: &str) -> CoreError {
    CoreError::NotFound(format!(
        "no guest named or with UUID {name_or_uuid:?}: see `guestkeyctl guest list`"
    ))
}

/// A guest by UUID, or by name if only one live guest has it.
pub(crate) fn find_in(tx: &mut dyn Tx, name_or_uuid: &str) -> Result<GuestInfo, CoreError> {
    if let Some(g) = tx.guest(&name_or_uuid.to_ascii_lowercase())? {
        return Ok(g);
    }
    let mut found = tx.live_guests_named(name_or_uuid)?;
    match found.len() {
        0 => Err(no_such_guest(name_or_uuid)),
        1 => Ok(found.remove(0)),
        _ => Err(CoreError::FailedPrecondition(format!(
            "several hosts have a guest named {name_or_uuid}: use its UUID"
        ))),
    }
}

/// Refuses two disks of one guest on the same volume, naming both disks
/// and the volume (before the database would refuse the second row).
fn refuse_shared_volumes(
    dom: &domxml::Domain,
    managed: &[ManagedDisk],
    tx: &mut dyn Tx,
) -> Result<(), CoreError> {
    for (i, a) in managed.iter().enumerate() {
        if let Some(b) = managed[i + 1..].iter().find(|b| b.volume_id == a.volume_id) {
            let (da, db) = (&dom.disks[a.index], &dom.disks[b.index]);
            let name = tx
                .volume(&a.volume_id)?
                .map_or_else(|| a.volume_id.clone(), |v| v.name);
            return Err(CoreError::Invalid(InvalidInput {
                what: "disks",
                value: format!(
                    "{} (line {}) and {} (line {})",
                    da.target, da.line, db.target, db.line
                ),
                why: format!("both use volume {name}: a volume backs at most one disk of a guest"),
            }));
        }
    }
    Ok(())
}

/// The managed volume a disk names, checked for use on `host`.
pub(crate) fn managed_volume(
    tx: &mut dyn Tx,
    disk: &domxml::Disk,
    host: &Name,
) -> Result<Option<VolumeInfo>, CoreError> {
    let found = match &disk.source {
        DiskSource::Volume { pool, volume } => match tx.volume_named(volume)? {
            Some(v) if &v.pool != pool => {
                return Err(CoreError::Invalid(bad_disk(
                    disk,
                    format!("volume {volume} is in pool {}, not {pool}", v.pool),
                )));
            }
            Some(v) => Some(v),
            None => {
                return Err(CoreError::Invalid(bad_disk(
                    disk,
                    format!(
                        "volume {volume} in pool {pool} is not managed by guestkey: create it with `guestkeyctl volume create`"
                    ),
                )));
            }
        },
        DiskSource::File(path) => tx.volume_at_path(path)?,
        DiskSource::Block(_) | DiskSource::Network { .. } | DiskSource::Other => None,
    };
    let Some(v) = found else { return Ok(None) };
    if v.host != host.as_str() {
        return Err(CoreError::Invalid(bad_disk(
            disk,
            format!(
                "its volume is on host {}, not on {host}: keys never go to another host",
                v.host
            ),
        )));
    }
    if v.state != VolumeState::Ready {
        return Err(CoreError::FailedPrecondition(format!(
            "disk {} (line {}): its volume is {}; wait until `guestkeyctl volume show` says ready",
            disk.target, disk.line, v.state
        )));
    }
    Ok(Some(v))
}

impl Core {
    /// Defines a guest on `host` from domain XML.
    pub fn define_guest(
        &self,
        caller: &Caller,
        host: &str,
        xml: &str,
    ) -> Result<GuestInfo, CoreError> {
        let host = Name::parse("host name", host)?;
        self.enrolled_host(host.as_str())?;
        let dom = domxml::parse(xml).map_err(|e| CoreError::Xml(e.to_string()))?;
        let g = self.write(|tx| {
            // Which disks are managed volumes, and may they be used here?
            let mut managed: Vec<ManagedDisk> = vec![];
            for (index, disk) in dom.disks.iter().enumerate() {
                if !matches!(disk.device.as_str(), "disk" | "lun") {
                    continue;
                }
                if let Some(v) = managed_volume(tx, disk, &host)? {
                    managed.push(ManagedDisk {
                        index,
                        volume_id: v.id,
                        secret_uuid: v.secret_uuid,
                        target: disk.target.clone(),
                    });
                }
            }
            refuse_shared_volumes(&dom, &managed, tx)?;
            let uuid = match &dom.uuid {
                Some(u) => u.to_ascii_lowercase(),
                None => uuid::Uuid::new_v4().to_string(),
            };
            if tx.live_guest_conflicts(&uuid, host.as_str(), &dom.name)? {
                return Err(CoreError::AlreadyExists(format!(
                    "a guest with UUID {uuid} or named {} on host {host} is already defined: undefine it first",
                    dom.name
                )));
            }
            let secrets: Vec<(usize, String)> = managed
                .iter()
                .map(|d| (d.index, d.secret_uuid.clone()))
                .collect();
            let new_xml = domxml::rewrite(
                xml,
                &dom,
                &secrets,
                dom.uuid.is_none().then_some(uuid.as_str()),
            );
            // A guest once undefined, or whose definition was given up, may
            // come back with the same UUID or name.
            tx.forget_gone_guests(&uuid, host.as_str(), &dom.name)?;
            tx.insert_guest(&NewGuest {
                uuid: uuid.clone(),
                name: dom.name.clone(),
                host: host.to_string(),
                xml: new_xml,
                created: now_unix(),
            })?;
            for d in &managed {
                tx.insert_guest_disk(&uuid, &d.volume_id, &d.target)?;
            }
            self.log(tx,
                &caller.actor(),
                "guest.define-requested",
                &uuid,
                &format!(
                    "guest {} on host {host}, {} encrypted disks",
                    dom.name,
                    managed.len()
                ),
            )?;
            find_in(tx, &uuid)
        })?;
        self.wake.notify_one();
        Ok(g)
    }

    /// Guests, optionally of one host; undefined ones left out.
    pub fn list_guests(&self, host: Option<&str>) -> Result<Vec<GuestInfo>, CoreError> {
        self.read(|tx| Ok(tx.guests(host)?))
    }

    /// A guest by UUID, or by name if only one live guest has it.
    pub fn get_guest(&self, name_or_uuid: &str) -> Result<GuestInfo, CoreError> {
        self.read(|tx| find_in(tx, name_or_uuid))
    }

    /// Queues `undefine`, `start` or `stop`.
    pub fn guest_action(
        &self,
        caller: &Caller,
        name_or_uuid: &str,
        action: GuestOp,
    ) -> Result<GuestInfo, CoreError> {
        let g = self.get_guest(name_or_uuid)?;
        if g.state.is_undefined() {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is undefined",
                g.name
            )));
        }
        if g.state == GuestState::Failed {
            return self.drop_failed_guest(caller, &g, action);
        }
        // Only an enrolled host is told anything (a revoked one would leave
        // the action pending for good).
        self.enrolled_host(&g.host)?;
        if let Some(to) = &g.migrating_to {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is migrating to host {to}: finish the migration first (`guestkeyctl guest migrate {} --to {to}`)",
                g.name, g.name
            )));
        }
        if let Some(pending) = g.pending.filter(|p| *p != action) {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is waiting for `{pending}` on host {} ({}): try again when it is done",
                g.name,
                g.host,
                if g.last_error.is_empty() {
                    "in progress"
                } else {
                    &g.last_error
                }
            )));
        }
        let g = self.write(|tx| {
            tx.queue_guest_op(&g.uuid, action)?;
            self.log(
                tx,
                &caller.actor(),
                &format!("guest.{action}-requested"),
                &g.uuid,
                &format!("guest {}", g.name),
            )?;
            find_in(tx, &g.uuid)
        })?;
        self.wake.notify_one();
        Ok(g)
    }
}

impl Core {
    /// A guest whose definition was given up: the host has nothing of it,
    /// so undefining it needs no host; starting or stopping it is refused.
    fn drop_failed_guest(
        &self,
        caller: &Caller,
        g: &GuestInfo,
        action: GuestOp,
    ) -> Result<GuestInfo, CoreError> {
        if action != GuestOp::Undefine {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} was never defined on host {} ({}): define it again with `guestkeyctl guest define`, or undefine it",
                g.name, g.host, g.last_error
            )));
        }
        self.write(|tx| {
            tx.settle_guest(&g.uuid, Some(GuestState::Undefined), "")?;
            self.log(
                tx,
                &caller.actor(),
                "guest.undefined",
                &g.uuid,
                &format!("guest {}: never defined on host {}", g.name, g.host),
            )?;
            find_in(tx, &g.uuid)
        })
    }
}

/// After volume `v` (at `path`) was encrypted from cleartext: every guest
/// of its host defined through guestkey with a disk on it gets the disk's
/// `<encryption>` element and is queued for a new definition, which brings
/// the host the volume's key. Returns their UUIDs.
pub(crate) fn adopt_volume(
    tx: &mut dyn Tx,
    v: &VolumeInfo,
    path: &str,
) -> Result<Vec<String>, CoreError> {
    let mut adopted = vec![];
    for (uuid, xml) in tx.guests_to_adopt(&v.host)? {
        let Ok(dom) = domxml::parse(&xml) else {
            continue;
        };
        let Some(i) = dom.disks.iter().position(|d| match &d.source {
            DiskSource::Volume { pool, volume } => pool == &v.pool && volume == &v.name,
            DiskSource::File(p) => p == path,
            DiskSource::Block(_) | DiskSource::Network { .. } | DiskSource::Other => false,
        }) else {
            continue;
        };
        let new_xml = domxml::rewrite(&xml, &dom, &[(i, v.secret_uuid.clone())], None);
        tx.add_guest_disk(&uuid, &v.id, &dom.disks[i].target)?;
        tx.redefine_guest(&uuid, &new_xml)?;
        adopted.push(uuid);
    }
    Ok(adopted)
}
