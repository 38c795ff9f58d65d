//! libvirt, behind a trait of ours.
//!
//! [`Hypervisor`] is what the daemon's operations ([`crate::ops`]) need
//! from libvirt: pools, volumes, domains, ephemeral private secrets, block
//! copies and migrations. [`Libvirt`] is the one real implementation (the
//! `virt` crate; block jobs and lifecycle events through `virt::sys`,
//! wrapped once in [`blockjob`] and [`events`]). Every call opens its own
//! connection, so calls from the hook socket and from the host-agent API
//! never wait on each other.
//!
//! May import: [`crate::model`], [`crate::progress`]. Imported by:
//! [`crate::ops`], the binary.

pub mod blockjob;
pub mod events;
mod pools;
mod real;
mod xml;

use std::path::PathBuf;

pub use real::Libvirt;
pub use xml::secret_xml;

use crate::model::{DomainState, Format};

/// libvirt failed or refused; the message says which object and what
/// libvirt said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HvError {
    /// No connection.
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// libvirt's words.
        message: String,
    },
    /// A call failed.
    #[error("{what}: {message}")]
    Call {
        /// What was asked, naming the object.
        what: String,
        /// libvirt's words.
        message: String,
    },
    /// The domain is not defined here.
    #[error("domain {0} is not defined on this host")]
    NoDomain(String),
    /// The pool is of a kind guestkey does not create volumes in.
    #[error(
        "storage pool {0} is not a directory pool (dir, fs, netfs): guestkey creates volumes only in those so far"
    )]
    NotDirPool(String),
    /// The pool's XML has no target path.
    #[error("storage pool {0} has no target path")]
    NoPoolPath(String),
    /// The domain has no disk on that image.
    #[error("domain {uuid} has no disk on {path}")]
    NoDisk {
        /// The domain.
        uuid: String,
        /// The image.
        path: String,
    },
    /// A block job did not complete.
    #[error("{0}")]
    BlockJob(String),
    /// A string cannot go to libvirt.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
}

/// Where a running guest's disk is copied to in an online copy.
pub struct CopyTarget<'a> {
    /// The new LUKS image (already made, empty).
    pub path: &'a str,
    /// Its container format.
    pub format: Format,
    /// The libvirt secret QEMU opens it with.
    pub secret: &'a str,
    /// Bytes per second at most (0: no limit).
    pub bandwidth: u64,
}

/// A disk's source as a domain names it: a file, or a volume of a pool.
#[derive(Debug, Clone, Copy)]
pub struct DiskSource<'a> {
    /// The image's path.
    pub path: &'a str,
    /// Its pool.
    pub pool: &'a str,
    /// Its volume name.
    pub volume: &'a str,
}

/// A domain's persistent definition, as `guest adopt` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// Its UUID.
    pub uuid: String,
    /// Its state now.
    pub state: DomainState,
    /// Whether it has a persistent definition (false: transient).
    pub persistent: bool,
    /// The persistent definition without security information (the live
    /// one for a transient domain).
    pub xml: String,
    /// libvirt's definition with security information differs (a graphics
    /// or console password, which `xml` lacks).
    pub security_info_withheld: bool,
}

/// A volume of a storage pool, as libvirt lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVolume {
    /// Its name in the pool.
    pub name: String,
    /// Its path.
    pub path: String,
    /// The format libvirt found (`<target><format type>`: "qcow2", "raw",
    /// "iso"...; empty when it names none).
    pub format: String,
}

/// A domain's definitions, as `pool show` reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// Its name.
    pub name: String,
    /// It runs.
    pub running: bool,
    /// Its definitions: the live one while it runs, and the persistent
    /// one (if any), without security information.
    pub xmls: Vec<String>,
}

/// A storage pool and its volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolListing {
    /// The pool's type ("dir", "fs", "logical"...).
    pub kind: String,
    /// Its target path (empty when it has none).
    pub path: String,
    /// Whether it is active (an inactive pool lists no volumes).
    pub active: bool,
    /// How many volumes it holds.
    pub count: usize,
    /// Its volumes, by name.
    pub volumes: Vec<PoolVolume>,
}

/// What the daemon needs from the hypervisor.
pub trait Hypervisor: Send + Sync {
    /// The target directory of a directory pool (dir, fs, netfs).
    fn pool_dir(&self, pool: &str) -> Result<PathBuf, HvError>;
    /// Makes libvirt see the pool's volumes as they are now.
    fn refresh_pool(&self, pool: &str) -> Result<(), HvError>;
    /// The path of an existing volume, if it exists.
    fn volume_path(&self, pool: &str, name: &str) -> Result<Option<String>, HvError>;
    /// Deletes a volume (a missing one is not an error).
    fn delete_volume(&self, pool: &str, name: &str) -> Result<(), HvError>;
    /// Defines (persistently) a domain.
    fn define_domain(&self, xml: &str) -> Result<(), HvError>;
    /// Undefines a domain, destroying it first if it runs (a missing one
    /// is not an error).
    fn undefine_domain(&self, uuid: &str) -> Result<(), HvError>;
    /// Starts a domain; returns its state.
    fn start_domain(&self, uuid: &str) -> Result<DomainState, HvError>;
    /// Stops (destroys) a domain; returns its state.
    fn stop_domain(&self, uuid: &str) -> Result<DomainState, HvError>;
    /// A domain's state, or None if it is not defined.
    fn domain_state(&self, uuid: &str) -> Result<Option<DomainState>, HvError>;
    /// Whether libvirt marks the domain to start at boot (None: not defined).
    fn domain_autostart(&self, uuid: &str) -> Result<Option<bool>, HvError>;
    /// The definition of the domain named `name_or_uuid` (None: not
    /// defined).
    fn definition(&self, name_or_uuid: &str) -> Result<Option<Definition>, HvError>;
    /// The pool and volume name of the image at `path`, if an active pool
    /// holds it.
    fn volume_of_path(&self, path: &str) -> Result<Option<(String, String)>, HvError>;
    /// Pool `pool` and its volumes, after a refresh (None: no such pool);
    /// none are read when it holds more than `max`.
    fn pool_volumes(&self, pool: &str, max: usize) -> Result<Option<PoolListing>, HvError>;
    /// Every defined or running domain and its definitions without
    /// security information (a running domain's live one and its
    /// persistent one).
    fn domain_definitions(&self) -> Result<Vec<DomainXml>, HvError>;
    /// Whether libvirt answers at all.
    fn ping(&self) -> bool;
    /// Replaces `from` by `to` in the persistent definition of `uuid` if it
    /// names `from` (a copy's path libvirt recorded at a pivot).
    fn fix_definition(&self, uuid: &str, from: &str, to: &str) -> Result<(), HvError>;
    /// Copies the disk of running domain `uuid` whose source is `source`
    /// into `target`, then pivots the guest onto it (same QEMU process).
    fn copy_running_disk(
        &self,
        uuid: &str,
        source: DiskSource<'_>,
        target: &CopyTarget<'_>,
    ) -> Result<(), HvError>;
    /// Migrates domain `uuid` to the libvirt at `dest_uri` (QEMU's stream
    /// over `migration_uri`, or libvirt's default), persistently there and
    /// undefined here. A stopped domain moves its definition only.
    fn migrate_domain(
        &self,
        uuid: &str,
        dest_uri: &str,
        migration_uri: Option<&str>,
        live: bool,
        unsafe_: bool,
    ) -> Result<(), HvError>;
    /// UUIDs of the running domains with a disk on `source`.
    fn running_domains_using(&self, source: DiskSource<'_>) -> Result<Vec<String>, HvError>;
    /// The state of domain `uuid` at the libvirt at `uri` (None: not there).
    fn remote_domain_state(&self, uri: &str, uuid: &str) -> Result<Option<DomainState>, HvError>;
    /// Defines an ephemeral, private volume secret and sets its value.
    fn set_secret(&self, uuid: &str, volume_path: &str, value: &[u8]) -> Result<(), HvError>;
    /// Undefines a secret (a missing one is not an error).
    fn remove_secret(&self, uuid: &str) -> Result<(), HvError>;
    /// Whether libvirt has a secret with this UUID (anyone's).
    fn secret_defined(&self, uuid: &str) -> Result<bool, HvError>;
}
