//! A storage pool of this host's libvirt as `guestkeyctl pool manage|show`
//! sees it: each volume with the format libvirt found, what the image says
//! of itself (encrypted, backing file, size) and which domains have a disk
//! on it. Changes nothing; the server decides what it offers for
//! encryption, and encrypts through the usual call.

use guestkey_domxml::DiskSource as Source;

use super::{Daemon, OpsError};
use crate::image::ImageInfo;
use crate::model::{Format, InvalidInput};

/// A domain with a disk on a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeUser {
    /// The domain's name.
    pub domain: String,
    /// It runs.
    pub running: bool,
}

/// One volume of a described pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEntry {
    /// Its name in the pool.
    pub name: String,
    /// Its path.
    pub path: String,
    /// The format libvirt found ("qcow2", "raw", "iso"...; may be empty).
    pub format: String,
    /// What the image says of itself, for qcow2 and raw volumes: or why
    /// qemu-img could not tell.
    pub info: Option<Result<ImageInfo, String>>,
    /// Domains with a disk on it.
    pub used_by: Vec<VolumeUser>,
    /// Names of the pool's images whose backing file it is.
    pub base_of: Vec<String>,
}

/// A pool and its volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDescription {
    /// The pool's type ("dir", "fs", "logical"...).
    pub kind: String,
    /// Its target path.
    pub path: String,
    /// Its volumes, by name.
    pub volumes: Vec<PoolEntry>,
    /// Domains whose definition could not be read: whether they use a
    /// volume is not known.
    pub unreadable_domains: Vec<String>,
}

/// Most volumes a description lists (each costs a `qemu-img info`).
pub const MAX_POOL_VOLUMES: usize = 2_000;

fn checked_pool(pool: &str) -> Result<&str, OpsError> {
    let bad = |why: &str| {
        OpsError::Invalid(InvalidInput(format!(
            "storage pool {pool:?}: {why}: give a name `virsh pool-list --all` shows"
        )))
    };
    if pool.is_empty() {
        return Err(bad("empty"));
    }
    if pool.len() > 255 {
        return Err(bad("over 255 bytes"));
    }
    if pool.chars().any(|c| c.is_control() || c == '/') {
        return Err(bad("holds a control character or a slash"));
    }
    Ok(pool)
}

/// A path as the file system resolves it (symbolic links and `..`), to
/// compare two names of one file; the name itself when it does not resolve.
fn resolved(path: &str) -> String {
    std::fs::canonicalize(path)
        .map_or_else(|_| path.to_owned(), |p| p.to_string_lossy().into_owned())
}

impl Daemon {
    /// Pool `pool` of this host's libvirt and its volumes.
    pub fn describe_pool(&self, pool: &str) -> Result<PoolDescription, OpsError> {
        let pool = checked_pool(pool)?;
        // One description at a time (each runs `qemu-img info` per
        // volume): a second caller is told to come back.
        let _one = match self.describing.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(OpsError::Precondition(
                    "another storage pool is being described on this host: try again in a moment"
                        .into(),
                ));
            }
        };
        let listing = self
            .hv
            .pool_volumes(pool, MAX_POOL_VOLUMES)?
            .ok_or_else(|| {
                OpsError::Precondition(format!(
                    "no storage pool named {pool} on this host (see `virsh pool-list --all`)"
                ))
            })?;
        if !listing.active {
            return Err(OpsError::Precondition(format!(
                "storage pool {pool} is not active: start it with `virsh pool-start {pool}`"
            )));
        }
        if listing.count > MAX_POOL_VOLUMES {
            return Err(OpsError::Precondition(format!(
                "storage pool {pool} holds {} volumes, over the {MAX_POOL_VOLUMES} a description lists: split it into several pools",
                listing.count
            )));
        }
        // Every definition of every domain: a disk may be in the live one
        // or the persistent one. One that cannot be read is named, so that
        // nothing is offered as unused on a guess.
        let mut unreadable_domains = vec![];
        let mut domains: Vec<(String, bool, Vec<guestkey_domxml::Domain>)> = vec![];
        for d in self.hv.domain_definitions()? {
            let mut parsed = vec![];
            for xml in &d.xmls {
                match guestkey_domxml::parse(xml) {
                    Ok(x) => parsed.push(x),
                    Err(e) => {
                        tracing::warn!(domain = %d.name, error = %e, "a domain definition was not read");
                        unreadable_domains.push(d.name.clone());
                        break;
                    }
                }
            }
            domains.push((d.name, d.running, parsed));
        }
        unreadable_domains.dedup();
        let mut volumes: Vec<PoolEntry> = listing
            .volumes
            .into_iter()
            .map(|v| {
                let here = resolved(&v.path);
                let used_by = domains
                    .iter()
                    .filter(|(_, _, defs)| {
                        defs.iter()
                            .flat_map(|d| &d.disks)
                            .any(|disk| match &disk.source {
                                Source::File(p) | Source::Block(p) => {
                                    *p == v.path || resolved(p) == here
                                }
                                Source::Volume { pool: p, volume } => {
                                    p == pool && *volume == v.name
                                }
                                Source::Network { .. } | Source::Other => false,
                            })
                    })
                    .map(|(name, running, _)| VolumeUser {
                        domain: name.clone(),
                        running: *running,
                    })
                    .collect();
                let format = match v.format.as_str() {
                    "qcow2" => Some(Format::Qcow2),
                    "raw" => Some(Format::Raw),
                    _ => None,
                };
                let info = format.map(|f| self.images.info(&v.path, f).map_err(|e| e.to_string()));
                PoolEntry {
                    name: v.name,
                    path: v.path,
                    format: v.format,
                    info,
                    used_by,
                    base_of: vec![],
                }
            })
            .collect();
        // The images other images of the pool are built on: encrypting one
        // would break those.
        let mut bases: Vec<(String, String)> = vec![];
        for e in &volumes {
            let built_on = matches!(&e.info, Some(Ok(i)) if i.backing);
            let format = if e.format == "qcow2" {
                Format::Qcow2
            } else {
                Format::Raw
            };
            if built_on {
                if let Ok(Some(base)) = self.images.backing_path(&e.path, format) {
                    bases.push((resolved(&base), e.name.clone()));
                }
            }
        }
        for e in &mut volumes {
            let here = resolved(&e.path);
            e.base_of = bases
                .iter()
                .filter(|(base, _)| *base == here)
                .map(|(_, child)| child.clone())
                .collect();
        }
        Ok(PoolDescription {
            kind: listing.kind,
            path: listing.path,
            volumes,
            unreadable_domains,
        })
    }
}
