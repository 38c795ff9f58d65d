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

impl Daemon {
    /// Pool `pool` of this host's libvirt and its volumes.
    pub fn describe_pool(&self, pool: &str) -> Result<PoolDescription, OpsError> {
        let pool = checked_pool(pool)?;
        let listing = self.hv.pool_volumes(pool)?.ok_or_else(|| {
            OpsError::Precondition(format!(
                "no storage pool named {pool} on this host (see `virsh pool-list --all`)"
            ))
        })?;
        if !listing.active {
            return Err(OpsError::Precondition(format!(
                "storage pool {pool} is not active: start it with `virsh pool-start {pool}`"
            )));
        }
        if listing.volumes.len() > MAX_POOL_VOLUMES {
            return Err(OpsError::Precondition(format!(
                "storage pool {pool} holds {} volumes, over the {MAX_POOL_VOLUMES} a description lists: split it into several pools",
                listing.volumes.len()
            )));
        }
        let domains: Vec<(String, bool, guestkey_domxml::Domain)> = self
            .hv
            .domain_definitions()?
            .into_iter()
            .filter_map(|(name, running, xml)| match guestkey_domxml::parse(&xml) {
                Ok(d) => Some((name, running, d)),
                Err(e) => {
                    tracing::debug!(domain = %name, error = %e, "definition not read");
                    None
                }
            })
            .collect();
        let volumes = listing
            .volumes
            .into_iter()
            .map(|v| {
                let used_by = domains
                    .iter()
                    .filter(|(_, _, d)| {
                        d.disks.iter().any(|disk| match &disk.source {
                            Source::File(p) | Source::Block(p) => *p == v.path,
                            Source::Volume { pool: p, volume } => p == pool && *volume == v.name,
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
                }
            })
            .collect();
        Ok(PoolDescription {
            kind: listing.kind,
            path: listing.path,
            volumes,
        })
    }
}
