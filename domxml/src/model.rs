//! What a domain XML says, as guestkey reads it, and the small views its
//! three readers need (the server, guestkeyd, the libvirt hook).

use crate::error::{XmlError, invalid};
use std::fmt;

/// Where a disk's (or a backing layer's) data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `<disk type='volume'><source pool='P' volume='V'/>`
    Volume {
        /// Pool.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// `<disk type='file'><source file='PATH'/>`
    File(String),
    /// `<disk type='block'><source dev='PATH'/>`
    Block(String),
    /// `<disk type='network'><source protocol='P' name='N'/>`
    Network {
        /// `protocol` (`rbd`, `iscsi`, `nbd`...).
        protocol: String,
        /// `name` (image, target), if any.
        name: Option<String>,
    },
    /// No source (an empty drive), or a `dir`, `nvme` or `vhostuser` disk.
    Other,
}

impl DiskSource {
    /// The host path of a file or block source.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::File(p) | Self::Block(p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for DiskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Volume { pool, volume } => write!(f, "volume {volume} of pool {pool}"),
            Self::File(p) => write!(f, "file {p}"),
            Self::Block(p) => write!(f, "block device {p}"),
            Self::Network { protocol, name } => match name {
                Some(n) => write!(f, "{protocol} {n}"),
                None => write!(f, "{protocol} source"),
            },
            Self::Other => f.write_str("no source"),
        }
    }
}

/// The libvirt secret an `<encryption>` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `<secret uuid='...'/>`, in canonical form.
    Uuid(String),
    /// `<secret usage='...'/>`.
    Usage(String),
}

/// A disk's (or layer's) `<encryption>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    /// `format` (`luks`, `qcow`...), if given.
    pub format: Option<String>,
    /// Its one `<secret>`, if any.
    pub secret: Option<SecretRef>,
    /// 1-based line of the element.
    pub line: usize,
}

impl Encryption {
    /// The secret's UUID, if it names one by UUID.
    pub fn secret_uuid(&self) -> Option<&str> {
        match &self.secret {
            Some(SecretRef::Uuid(u)) => Some(u),
            _ => None,
        }
    }
}

/// One image below a disk: a `<backingStore>` layer, or the destination
/// of a block job (`<mirror>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Its `type` (`file`, `block`...).
    pub kind: String,
    /// Its source.
    pub source: DiskSource,
    /// Its `<source><encryption>`, if any.
    pub encryption: Option<Encryption>,
    /// Whether it is the `<mirror>` rather than a backing layer.
    pub mirror: bool,
    /// 1-based line of the element.
    pub line: usize,
}

/// One `<disk>` of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `device` (`disk`, `cdrom`, `floppy`, `lun`; `disk` when absent, as
    /// libvirt reads it).
    pub device: String,
    /// `type` (`file`, `block`, `volume`, `network`...; `file` when absent
    /// or when the disk has no `<source>`, as libvirt reads it).
    pub kind: String,
    /// `<target dev>`, e.g. `vda`.
    pub target: String,
    /// Source.
    pub source: DiskSource,
    /// `<driver type>` (`qcow2`, `raw`...), if given.
    pub format: Option<String>,
    /// Whether it has `<readonly/>`.
    pub readonly: bool,
    /// The disk's `<encryption>`, written in `<disk>` or in its `<source>`.
    pub encryption: Option<Encryption>,
    /// Its backing chain, top first, then its `<mirror>` if it has one.
    pub layers: Vec<Layer>,
    /// 1-based line of the `<disk>` element.
    pub line: usize,
    // For the rewrite: where `</disk>` starts, the whitespace before it,
    // and the spans of the disk's own `<encryption>` element.
    pub(crate) end_tag: usize,
    pub(crate) indent: String,
    pub(crate) encryption_spans: Vec<(usize, usize)>,
}

impl Disk {
    /// The UUID of the secret of the disk's own `<encryption>`.
    pub fn secret_uuid(&self) -> Option<&str> {
        self.encryption.as_ref().and_then(Encryption::secret_uuid)
    }

    /// Whether the disk's own source is the file or block device `path`,
    /// or volume `volume` of pool `pool` (backing layers not looked at).
    pub fn is_on(&self, path: &str, pool: &str, volume: &str) -> bool {
        match &self.source {
            DiskSource::Volume { pool: p, volume: v } => p == pool && v == volume,
            s => s.path() == Some(path),
        }
    }
}

/// What the domain XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`, exactly as libvirt reads it.
    pub name: String,
    /// `<uuid>` in canonical form (lower-case, hyphenated), if present.
    pub uuid: Option<String>,
    /// Disks (every `/domain/devices/disk`) in document order.
    pub disks: Vec<Disk>,
    pub(crate) name_end: usize,
    pub(crate) source_len: usize,
}

/// A guest's identity: what guestkeyd seals its keys under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, canonical.
    pub uuid: String,
}

/// A secret some disk of the domain needs, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSecret<'a> {
    /// The disk's `<target dev>`.
    pub target: &'a str,
    /// The source of the image the secret opens (the disk's, or a layer's).
    pub source: &'a DiskSource,
    /// The secret's UUID, canonical.
    pub secret_uuid: &'a str,
    /// Whether the image is a backing layer or mirror, not the disk's own.
    pub in_layer: bool,
}

impl Domain {
    /// Name and UUID; refuses a domain without `<uuid>`.
    pub fn identity(&self) -> Result<Identity, XmlError> {
        match &self.uuid {
            Some(uuid) => Ok(Identity {
                name: self.name.clone(),
                uuid: uuid.clone(),
            }),
            None => Err(invalid(
                1,
                format!(
                    "domain {} has no <uuid>: add <uuid>xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx</uuid> after <name>",
                    self.name
                ),
            )),
        }
    }

    /// Every secret named by UUID in an `<encryption>` of a disk or of one
    /// of its layers, with the disk and image it opens, in document order.
    pub fn disk_secrets(&self) -> Vec<DiskSecret<'_>> {
        let mut out = Vec::new();
        for d in &self.disks {
            if let Some(u) = d.secret_uuid() {
                out.push(DiskSecret {
                    target: &d.target,
                    source: &d.source,
                    secret_uuid: u,
                    in_layer: false,
                });
            }
            for l in &d.layers {
                if let Some(u) = l.encryption.as_ref().and_then(Encryption::secret_uuid) {
                    out.push(DiskSecret {
                        target: &d.target,
                        source: &l.source,
                        secret_uuid: u,
                        in_layer: true,
                    });
                }
            }
        }
        out
    }

    /// The UUIDs of [`Domain::disk_secrets`], sorted, each once.
    pub fn secret_uuids(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .disk_secrets()
            .iter()
            .map(|s| s.secret_uuid.to_owned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The disk whose own source is `path` or volume `volume` of `pool`.
    pub fn disk_on(&self, path: &str, pool: &str, volume: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.is_on(path, pool, volume))
    }
}
