//! Fakes of the two traits for the operations' unit tests: an in-memory
//! libvirt ([`FakeHv`]) and in-memory images ([`FakeImages`]) over one
//! shared [`World`]. They stand in for libvirtd and qemu-img in these unit
//! tests only, to drive every branch of the orchestration (crashes between
//! steps, refusals, failures of single calls) quickly and exactly; the same
//! flows run against the real libvirtd, KVM and qemu-img in the end-to-end
//! tests (tests/tests/host.rs and others), which these do not replace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::libvirt::{
    CopyTarget, Definition, DiskSource, DomainXml, HvError, Hypervisor, PoolListing, PoolVolume,
};
use crate::model::{DomainState, Format};

/// An image: which passphrases open it, and a token for its data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Image {
    pub format: Format,
    pub size: u64,
    /// Passphrases of its keyslots (empty: cleartext).
    pub keys: Vec<Vec<u8>>,
    /// Stands for the data key: a deep rekey changes it.
    pub data_key: u64,
    /// Stands for the data: copies keep it.
    pub data: u64,
    pub backing: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Domain {
    pub xml: String,
    pub state: DomainState,
    pub autostart: bool,
    /// Paths of its disks as libvirt's live XML names them.
    pub disks: Vec<String>,
}

/// Everything the fakes know, shared.
#[derive(Default)]
pub(super) struct World {
    pub pools: BTreeMap<String, PathBuf>,
    pub images: BTreeMap<String, Image>,
    pub domains: BTreeMap<String, Domain>,
    /// Defined libvirt secrets: uuid -> (volume path, value).
    pub secrets: BTreeMap<String, (String, Vec<u8>)>,
    /// Every call, in order, e.g. "set_secret UUID".
    pub calls: Vec<String>,
    /// Calls that fail (by name), until removed.
    pub failing: BTreeSet<&'static str>,
    /// The destination libvirt's domains (migrations).
    pub remote: BTreeMap<String, DomainState>,
    /// The backing file each image with one names.
    pub backing_of: BTreeMap<String, String>,
    next_key: u64,
}

impl World {
    fn fails(&mut self, call: &'static str, what: String) -> Result<(), String> {
        self.calls.push(what.clone());
        if self.failing.contains(call) {
            Err(format!("{call} failed (injected)"))
        } else {
            Ok(())
        }
    }

    fn new_key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    /// Count of calls whose text starts with `prefix`.
    pub(super) fn count(&self, prefix: &str) -> usize {
        self.calls.iter().filter(|c| c.starts_with(prefix)).count()
    }
}

pub(super) type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) struct FakeHv(pub Shared);
pub(super) struct FakeImages(pub Shared);

fn hv_err(what: &str, message: String) -> HvError {
    HvError::Call {
        what: what.to_owned(),
        message,
    }
}

impl Hypervisor for FakeHv {
    fn pool_dir(&self, pool: &str) -> Result<PathBuf, HvError> {
        lock(&self.0)
            .pools
            .get(pool)
            .cloned()
            .ok_or_else(|| hv_err(&format!("storage pool {pool}"), "no such pool".into()))
    }
    fn refresh_pool(&self, _pool: &str) -> Result<(), HvError> {
        Ok(())
    }
    fn volume_path(&self, pool: &str, name: &str) -> Result<Option<String>, HvError> {
        let w = lock(&self.0);
        let dir = w
            .pools
            .get(pool)
            .ok_or_else(|| hv_err(&format!("storage pool {pool}"), "no such pool".into()))?;
        let path = dir.join(name).to_string_lossy().into_owned();
        Ok(w.images.contains_key(&path).then_some(path))
    }
    fn delete_volume(&self, pool: &str, name: &str) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails("delete_volume", format!("delete_volume {pool}/{name}"))
            .map_err(|m| hv_err("delete", m))?;
        if let Some(dir) = w.pools.get(pool).cloned() {
            w.images
                .remove(&dir.join(name).to_string_lossy().into_owned());
        }
        Ok(())
    }
    fn define_domain(&self, xml: &str) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails("define_domain", "define_domain".into())
            .map_err(|m| hv_err("libvirt refused the domain XML", m))?;
        let uuid = xml
            .split("<uuid>")
            .nth(1)
            .and_then(|r| r.split("</uuid>").next())
            .unwrap_or_default()
            .to_owned();
        w.domains.insert(
            uuid,
            Domain {
                xml: xml.to_owned(),
                state: DomainState::ShutOff,
                autostart: false,
                disks: vec![],
            },
        );
        Ok(())
    }
    fn undefine_domain(&self, uuid: &str) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails("undefine_domain", format!("undefine_domain {uuid}"))
            .map_err(|m| hv_err("undefine", m))?;
        w.domains.remove(uuid);
        Ok(())
    }
    fn start_domain(&self, uuid: &str) -> Result<DomainState, HvError> {
        let mut w = lock(&self.0);
        w.fails("start_domain", format!("start_domain {uuid}"))
            .map_err(|m| hv_err("start", m))?;
        let d = w
            .domains
            .get_mut(uuid)
            .ok_or_else(|| HvError::NoDomain(uuid.to_owned()))?;
        d.state = DomainState::Running;
        Ok(d.state)
    }
    fn stop_domain(&self, uuid: &str) -> Result<DomainState, HvError> {
        let mut w = lock(&self.0);
        let d = w
            .domains
            .get_mut(uuid)
            .ok_or_else(|| HvError::NoDomain(uuid.to_owned()))?;
        d.state = DomainState::ShutOff;
        Ok(d.state)
    }
    fn domain_state(&self, uuid: &str) -> Result<Option<DomainState>, HvError> {
        Ok(lock(&self.0).domains.get(uuid).map(|d| d.state))
    }
    fn domain_autostart(&self, uuid: &str) -> Result<Option<bool>, HvError> {
        Ok(lock(&self.0).domains.get(uuid).map(|d| d.autostart))
    }
    fn ping(&self) -> bool {
        true
    }
    fn definition(&self, name_or_uuid: &str) -> Result<Option<Definition>, HvError> {
        let w = lock(&self.0);
        let found = w.domains.iter().find(|(u, d)| {
            u.as_str() == name_or_uuid
                || guestkey_domxml::identity(&d.xml).is_ok_and(|i| i.name == name_or_uuid)
        });
        Ok(found.map(|(u, d)| Definition {
            uuid: u.clone(),
            state: d.state,
            persistent: true,
            xml: d.xml.clone(),
            security_info_withheld: d.xml.contains("passwd="),
        }))
    }
    fn volume_of_path(&self, path: &str) -> Result<Option<(String, String)>, HvError> {
        let w = lock(&self.0);
        if !w.images.contains_key(path) {
            return Ok(None);
        }
        let p = std::path::Path::new(path);
        Ok(w.pools
            .iter()
            .find(|(_, dir)| p.parent() == Some(dir.as_path()))
            .and_then(|(pool, _)| {
                let name = p.file_name()?.to_str()?;
                Some((pool.clone(), name.to_owned()))
            }))
    }
    fn pool_volumes(&self, pool: &str, _max: usize) -> Result<Option<PoolListing>, HvError> {
        let w = lock(&self.0);
        let Some(dir) = w.pools.get(pool) else {
            return Ok(None);
        };
        let volumes: Vec<PoolVolume> = w
            .images
            .iter()
            .filter(|(p, _)| std::path::Path::new(p).parent() == Some(dir.as_path()))
            .map(|(p, i)| PoolVolume {
                name: p.rsplit('/').next().unwrap_or_default().to_owned(),
                path: p.clone(),
                format: i.format.as_str().to_owned(),
            })
            .collect();
        Ok(Some(PoolListing {
            kind: "dir".into(),
            path: dir.to_string_lossy().into_owned(),
            active: true,
            count: volumes.len(),
            volumes,
        }))
    }
    fn domain_definitions(&self) -> Result<Vec<DomainXml>, HvError> {
        let w = lock(&self.0);
        Ok(w.domains
            .values()
            .map(|d| DomainXml {
                name: guestkey_domxml::identity(&d.xml)
                    .map(|i| i.name)
                    .unwrap_or_default(),
                running: d.state == DomainState::Running,
                xmls: vec![d.xml.clone()],
            })
            .collect())
    }
    fn fix_definition(&self, uuid: &str, from: &str, to: &str) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.calls
            .push(format!("fix_definition {uuid} {from} -> {to}"));
        if let Some(d) = w.domains.get_mut(uuid) {
            d.xml = d.xml.replace(from, to);
        }
        Ok(())
    }
    fn copy_running_disk(
        &self,
        uuid: &str,
        source: DiskSource<'_>,
        target: &CopyTarget<'_>,
    ) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails(
            "copy_running_disk",
            format!(
                "copy_running_disk {uuid} {} -> {}",
                source.path, target.path
            ),
        )
        .map_err(|m| hv_err("block copy", m))?;
        // QEMU opens the target through the secret the definition names.
        let (path, value) = w
            .secrets
            .get(target.secret)
            .cloned()
            .ok_or_else(|| hv_err("block copy", format!("no secret {}", target.secret)))?;
        if path != target.path {
            return Err(hv_err(
                "block copy",
                "the secret is for another volume".into(),
            ));
        }
        let data = w.images.get(source.path).map(|i| i.data).unwrap_or(0);
        let t = w
            .images
            .get_mut(target.path)
            .ok_or_else(|| hv_err("block copy", "no target image".into()))?;
        if !t.keys.contains(&value) {
            return Err(hv_err(
                "block copy",
                "Invalid password, cannot unlock any keyslot".into(),
            ));
        }
        t.data = data;
        let d = w
            .domains
            .get_mut(uuid)
            .ok_or_else(|| HvError::NoDomain(uuid.to_owned()))?;
        d.disks = vec![target.path.to_owned()];
        let fixed = d.xml.replace(target.path, source.path);
        d.xml = fixed;
        Ok(())
    }
    fn migrate_domain(
        &self,
        uuid: &str,
        dest_uri: &str,
        _m: Option<&str>,
        _live: bool,
        _u: bool,
    ) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails(
            "migrate_domain",
            format!("migrate_domain {uuid} {dest_uri}"),
        )
        .map_err(|m| hv_err("migration", m))?;
        let d = w
            .domains
            .remove(uuid)
            .ok_or_else(|| HvError::NoDomain(uuid.to_owned()))?;
        w.remote.insert(uuid.to_owned(), d.state);
        Ok(())
    }
    fn running_domains_using(&self, source: DiskSource<'_>) -> Result<Vec<String>, HvError> {
        let w = lock(&self.0);
        Ok(w.domains
            .iter()
            .filter(|(_, d)| d.state.holds_disks() && d.disks.iter().any(|p| p == source.path))
            .map(|(u, _)| u.clone())
            .collect())
    }
    fn remote_domain_state(&self, uri: &str, uuid: &str) -> Result<Option<DomainState>, HvError> {
        let mut w = lock(&self.0);
        w.fails("remote_domain_state", format!("remote_domain_state {uri}"))
            .map_err(|m| HvError::Connect {
                uri: uri.to_owned(),
                message: m,
            })?;
        Ok(w.remote.get(uuid).copied())
    }
    fn set_secret(&self, uuid: &str, volume_path: &str, value: &[u8]) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails("set_secret", format!("set_secret {uuid}"))
            .map_err(|m| hv_err("define of libvirt secret", m))?;
        w.secrets
            .insert(uuid.to_owned(), (volume_path.to_owned(), value.to_vec()));
        Ok(())
    }
    fn secret_defined(&self, uuid: &str) -> Result<bool, HvError> {
        Ok(lock(&self.0).secrets.contains_key(uuid))
    }
    fn remove_secret(&self, uuid: &str) -> Result<(), HvError> {
        let mut w = lock(&self.0);
        w.fails("remove_secret", format!("remove_secret {uuid}"))
            .map_err(|m| hv_err("undefine of libvirt secret", m))?;
        w.secrets.remove(uuid);
        Ok(())
    }
}

mod images;
