//! `guest adopt`'s look at a domain this host's libvirt already has (made
//! by virt-manager, virt-install or `virsh define`): its persistent
//! definition and where each disk's image is. Changes nothing; the server
//! decides what to encrypt and redefines the guest through the usual calls.

use guestkey_domxml::DiskSource as Source;

use super::{Daemon, OpsError};
use crate::image::ImageInfo;
use crate::model::{DomainState, Format, InvalidInput};

/// Where a disk's image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlace {
    /// Volume `volume` of the active libvirt pool `pool`.
    InPool {
        /// The pool.
        pool: String,
        /// The volume's name.
        volume: String,
    },
    /// The image exists; no active pool holds it.
    NotInPool,
    /// Nothing at the disk's source.
    Missing,
    /// The disk's `<driver type>` is neither qcow2 nor raw.
    OtherFormat,
}

/// One disk of a described domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlace {
    /// `<target dev>`.
    pub target: String,
    /// The image's path (empty when a volume's pool does not know it).
    pub path: String,
    /// Where it is.
    pub place: ImagePlace,
    /// What the image says of itself (images in a pool only).
    pub info: Option<ImageInfo>,
}

/// A domain as `guest adopt` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDescription {
    /// Its UUID.
    pub uuid: String,
    /// Its state.
    pub state: DomainState,
    /// Its persistent definition, without security information.
    pub xml: String,
    /// libvirt keeps something secret in it (a graphics password) that
    /// `xml` lacks.
    pub security_info_withheld: bool,
    /// Its disks (device disk or lun, with a file, block or volume source).
    pub disks: Vec<DiskPlace>,
}

fn checked_name(name_or_uuid: &str) -> Result<&str, OpsError> {
    let bad = |why: &str| {
        OpsError::Invalid(InvalidInput(format!(
            "domain {name_or_uuid:?}: {why}: give the name or UUID `virsh list --all` shows"
        )))
    };
    if name_or_uuid.is_empty() {
        return Err(bad("empty"));
    }
    if name_or_uuid.len() > 255 {
        return Err(bad("over 255 bytes"));
    }
    if name_or_uuid.chars().any(char::is_control) {
        return Err(bad("holds a control character"));
    }
    Ok(name_or_uuid)
}

impl Daemon {
    /// The domain `name_or_uuid` of this host's libvirt and its disks.
    pub fn describe_domain(&self, name_or_uuid: &str) -> Result<DomainDescription, OpsError> {
        let name = checked_name(name_or_uuid)?;
        let def = self.hv.definition(name)?.ok_or_else(|| {
            OpsError::Precondition(format!(
                "no domain named or with UUID {name:?} is defined in this host's libvirt (see `virsh list --all`)"
            ))
        })?;
        if !def.persistent {
            return Err(OpsError::Precondition(format!(
                "domain {name} is transient (started with `virsh create`): define it persistently first (`virsh dumpxml {name} > {name}.xml; virsh define {name}.xml`)"
            )));
        }
        let dom = guestkey_domxml::parse(&def.xml).map_err(|e| {
            OpsError::Precondition(format!("libvirt's definition of domain {name}: {e}"))
        })?;
        let mut disks = Vec::new();
        for d in &dom.disks {
            if !matches!(d.device.as_str(), "disk" | "lun") {
                continue;
            }
            let (path, in_pool) = match &d.source {
                Source::File(p) | Source::Block(p) => (p.clone(), None),
                Source::Volume { pool, volume } => {
                    let path = self.hv.volume_path(pool, volume).ok().flatten();
                    (
                        path.unwrap_or_default(),
                        Some((pool.clone(), volume.clone())),
                    )
                }
                Source::Network { .. } | Source::Other => continue,
            };
            let format = match d.format.as_deref() {
                Some("qcow2") => Some(Format::Qcow2),
                None | Some("raw") => Some(Format::Raw),
                Some(_) => None,
            };
            let exists = !path.is_empty() && std::fs::metadata(&path).is_ok();
            let place = if !exists {
                ImagePlace::Missing
            } else if format.is_none() {
                ImagePlace::OtherFormat
            } else {
                match in_pool.map_or_else(|| self.hv.volume_of_path(&path), |p| Ok(Some(p)))? {
                    Some((pool, volume)) => ImagePlace::InPool { pool, volume },
                    None => ImagePlace::NotInPool,
                }
            };
            // Only images of pools are looked into: a path outside them is
            // refused by the server anyway, and may be in a directory that
            // someone other than root can write.
            let info = match (&place, format) {
                (ImagePlace::InPool { .. }, Some(f)) => {
                    Some(self.images.info(&path, f).map_err(|e| {
                        OpsError::Precondition(format!("disk {} ({path}): {e}", d.target))
                    })?)
                }
                _ => None,
            };
            disks.push(DiskPlace {
                target: d.target.clone(),
                path,
                place,
                info,
            });
        }
        Ok(DomainDescription {
            uuid: def.uuid,
            state: def.state,
            xml: def.xml,
            security_info_withheld: def.security_info_withheld,
            disks,
        })
    }
}
