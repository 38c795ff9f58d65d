//! libvirt, behind a trait the daemon's logic is written against.
//!
//! [`Libvirt`] is the real implementation (the `virt` crate); every call
//! opens its own connection, so calls from the hook socket and from the
//! host-agent API never wait on each other.

use std::path::PathBuf;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::storage_pool::StoragePool;

/// libvirt failed; the message says which object and what libvirt said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HvError(pub String);

/// Container format of a new volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 with LUKS inside.
    Qcow2,
    /// raw LUKS.
    Raw,
}

/// What the daemon needs from the hypervisor.
pub trait Hypervisor: Send + Sync {
    /// Creates an encrypted volume in a pool; returns its path.
    fn create_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        format: Format,
        passphrase: &[u8],
    ) -> Result<String, HvError>;
    /// The path of an existing volume, if it exists.
    fn volume_path(&self, pool: &str, name: &str) -> Result<Option<String>, HvError>;
    /// Deletes a volume (a missing one is not an error).
    fn delete_volume(&self, pool: &str, name: &str) -> Result<(), HvError>;
    /// Defines (persistently) a domain.
    fn define_domain(&self, xml: &str) -> Result<(), HvError>;
    /// Undefines a domain, destroying it first if it runs (a missing one is not an error).
    fn undefine_domain(&self, uuid: &str) -> Result<(), HvError>;
    /// Starts a domain; returns its state.
    fn start_domain(&self, uuid: &str) -> Result<String, HvError>;
    /// Stops (destroys) a domain; returns its state.
    fn stop_domain(&self, uuid: &str) -> Result<String, HvError>;
    /// A domain's state in virsh's words, or None if it is not defined.
    fn domain_state(&self, uuid: &str) -> Result<Option<String>, HvError>;
    /// Whether libvirt marks the domain to start at boot (None: not defined).
    fn domain_autostart(&self, uuid: &str) -> Result<Option<bool>, HvError>;
    /// Whether libvirt answers at all.
    fn ping(&self) -> bool;
    /// Replaces `from` by `to` in the persistent definition of `uuid` if it
    /// names `from` (a copy's path libvirt recorded at a pivot).
    fn fix_definition(&self, uuid: &str, from: &str, to: &str) -> Result<(), HvError>;
    /// Copies the disk of running domain `uuid` whose source is `source`
    /// (path, pool, volume name: a file disk or a volume disk) into the existing LUKS image `dest_path` (opened with
    /// libvirt secret `dest_secret`), then pivots the guest onto it; at
    /// most `bandwidth` bytes/s (0: no limit).
    fn copy_running_disk(
        &self,
        uuid: &str,
        source: (&str, &str, &str),
        dest_path: &str,
        format: Format,
        dest_secret: &str,
        bandwidth: u64,
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
    /// UUIDs of the running domains with a disk on `path` (or on volume
    /// `volume` of pool `pool`).
    fn running_domains_using(
        &self,
        path: &str,
        pool: &str,
        volume: &str,
    ) -> Result<Vec<String>, HvError>;
    /// The state of domain `uuid` at the libvirt at `uri` (None: not there).
    fn remote_domain_state(&self, uri: &str, uuid: &str) -> Result<Option<String>, HvError>;
    /// Defines an ephemeral, private volume secret and sets its value.
    fn set_secret(&self, uuid: &str, volume_path: &str, value: &[u8]) -> Result<(), HvError>;
    /// Undefines a secret (a missing one is not an error).
    fn remove_secret(&self, uuid: &str) -> Result<(), HvError>;
}

/// The real libvirt.
pub struct Libvirt {
    uri: String,
}

fn err(what: impl std::fmt::Display) -> impl FnOnce(virt::error::Error) -> HvError {
    let what = what.to_string();
    move |e| HvError(format!("{what}: {}", e.message()))
}

fn state_name(s: virt::enumutil::Enum<DomainState, u32>) -> &'static str {
    let virt::enumutil::Enum::Known(s) = s else {
        return "no state";
    };
    match s {
        DomainState::Running => "running",
        DomainState::Blocked => "idle",
        DomainState::Paused => "paused",
        DomainState::Shutdown => "in shutdown",
        DomainState::Shutoff => "shut off",
        DomainState::Crashed => "crashed",
        DomainState::PMSuspended => "pmsuspended",
        _ => "no state",
    }
}

impl Libvirt {
    /// libvirt at `uri`, e.g. `qemu:///system`.
    pub fn new(uri: &str) -> Self {
        // Errors come back as Results; do not also print them to stderr.
        virt::error::clear_error_callback();
        Self {
            uri: uri.to_owned(),
        }
    }

    fn conn(&self) -> Result<Connect, HvError> {
        Connect::open(Some(&self.uri))
            .map_err(err(format!("cannot connect to libvirt at {}", self.uri)))
    }

    fn pool(&self, conn: &Connect, pool: &str) -> Result<StoragePool, HvError> {
        conn.lookup_storage_pool_by_name(pool)
            .map_err(err(format!("storage pool {pool}")))
    }

    fn pool_dir(&self, p: &StoragePool, pool: &str) -> Result<PathBuf, HvError> {
        let xml = p.xml_desc(0).map_err(err(format!("storage pool {pool}")))?;
        if !(xml.starts_with("<pool type='dir'")
            || xml.starts_with("<pool type='fs'")
            || xml.starts_with("<pool type='netfs'"))
        {
            return Err(HvError(format!(
                "storage pool {pool} is not a directory pool (dir, fs, netfs): guestkey creates volumes only in those so far"
            )));
        }
        let start = xml.find("<path>").map(|i| i + 6);
        let end = xml.find("</path>");
        match (start, end) {
            (Some(s), Some(e)) if s < e => Ok(PathBuf::from(&xml[s..e])),
            _ => Err(HvError(format!("storage pool {pool} has no target path"))),
        }
    }

    fn domain(&self, conn: &Connect, uuid: &str) -> Result<Option<Domain>, HvError> {
        match conn.lookup_domain_by_uuid_string(uuid) {
            Ok(d) => Ok(Some(d)),
            Err(e)
                if matches!(
                    e.code(),
                    virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(HvError(format!("domain {uuid}: {}", e.message()))),
        }
    }
}

impl Hypervisor for Libvirt {
    fn create_volume(
        &self,
        pool: &str,
        name: &str,
        capacity: u64,
        format: Format,
        passphrase: &[u8],
    ) -> Result<String, HvError> {
        let conn = self.conn()?;
        let p = self.pool(&conn, pool)?;
        let dir = self.pool_dir(&p, pool)?;
        let path = dir.join(name);
        if path.exists() {
            return Err(HvError(format!(
                "volume {name} already exists in pool {pool} ({})",
                path.display()
            )));
        }
        // qemu-img, not libvirt's vol-create: it lets us choose the LUKS
        // iteration count (the key is random; stretching only slows every
        // guest start). The passphrase goes through a pipe, never through
        // argv or a file.
        crate::luks::create_image(&path.to_string_lossy(), format, capacity, passphrase)?;
        if let Err(e) = crate::luks::adopt_directory_ownership(&dir, &path.to_string_lossy()) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        p.refresh(0)
            .map_err(err(format!("refresh of pool {pool}")))?;
        Ok(path.to_string_lossy().into_owned())
    }

    fn volume_path(&self, pool: &str, name: &str) -> Result<Option<String>, HvError> {
        let conn = self.conn()?;
        let p = self.pool(&conn, pool)?;
        let _ = p.refresh(0);
        match p.lookup_storage_vol_by_name(name) {
            Ok(v) => Ok(Some(v.path().map_err(err(format!("volume {name}")))?)),
            Err(_) => Ok(None),
        }
    }

    fn delete_volume(&self, pool: &str, name: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let p = self.pool(&conn, pool)?;
        let _ = p.refresh(0);
        match p.lookup_storage_vol_by_name(name) {
            Ok(v) => v
                .delete(0)
                .map_err(err(format!("delete of volume {name} in pool {pool}"))),
            Err(_) => Ok(()),
        }
    }

    fn define_domain(&self, xml: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        conn.define_domain_xml(xml)
            .map(|_| ())
            .map_err(err("libvirt refused the domain XML"))
    }

    fn undefine_domain(&self, uuid: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(());
        };
        if d.is_active().unwrap_or(false) {
            d.destroy().map_err(err(format!("stop of domain {uuid}")))?;
        }
        d.undefine()
            .map_err(err(format!("undefine of domain {uuid}")))
    }

    fn start_domain(&self, uuid: &str) -> Result<String, HvError> {
        let conn = self.conn()?;
        let d = self
            .domain(&conn, uuid)?
            .ok_or_else(|| HvError(format!("domain {uuid} is not defined on this host")))?;
        if !d.is_active().unwrap_or(false) {
            d.create().map_err(err(format!("start of domain {uuid}")))?;
        }
        Ok(self.domain_state(uuid)?.unwrap_or_default())
    }

    fn stop_domain(&self, uuid: &str) -> Result<String, HvError> {
        let conn = self.conn()?;
        let d = self
            .domain(&conn, uuid)?
            .ok_or_else(|| HvError(format!("domain {uuid} is not defined on this host")))?;
        if d.is_active().unwrap_or(false) {
            d.destroy().map_err(err(format!("stop of domain {uuid}")))?;
        }
        Ok(self.domain_state(uuid)?.unwrap_or_default())
    }

    fn domain_state(&self, uuid: &str) -> Result<Option<String>, HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(None);
        };
        let (state, _) = d.state().map_err(err(format!("state of domain {uuid}")))?;
        Ok(Some(state_name(state).to_owned()))
    }

    fn domain_autostart(&self, uuid: &str) -> Result<Option<bool>, HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(None);
        };
        d.autostart()
            .map(Some)
            .map_err(err(format!("autostart flag of domain {uuid}")))
    }

    fn ping(&self) -> bool {
        self.conn().is_ok()
    }

    fn copy_running_disk(
        &self,
        uuid: &str,
        source: (&str, &str, &str),
        dest_path: &str,
        format: Format,
        dest_secret: &str,
        bandwidth: u64,
    ) -> Result<(), HvError> {
        let (source_path, pool, volume) = source;
        let conn = self.conn()?;
        let d = self
            .domain(&conn, uuid)?
            .ok_or_else(|| HvError(format!("domain {uuid} is not defined on this host")))?;
        let live = d
            .xml_desc(0)
            .map_err(err(format!("XML of domain {uuid}")))?;
        // After an earlier online rekey the running guest's disk still
        // carries the copy's name (same file, renamed).
        let disk = target_of(&live, source_path, pool, volume)
            .or_else(|| target_of(&live, &format!("{source_path}.gk-rekey"), pool, volume))
            .ok_or_else(|| HvError(format!("domain {uuid} has no disk on {source_path}")))?;
        let driver = match format {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        };
        let dest = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{driver}'/><source file='{}'><encryption format='luks'><secret type='passphrase' uuid='{dest_secret}'/></encryption></source></disk>",
            xml_escape(dest_path)
        );
        // A copy left running by a crash of guestkeyd: start afresh.
        if matches!(crate::blockjob::progress(&d, &disk), Ok(Some(_))) {
            crate::blockjob::cancel(&d, &disk);
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let progress = crate::progress::Tracker::start(source_path, "copying online", 0);
        crate::blockjob::copy_and_pivot(
            &d,
            &disk,
            &dest,
            std::time::Duration::from_secs(3600),
            bandwidth,
            &|done, total| progress.set(done, total),
        )?;
        drop(progress);
        // At the pivot libvirt writes the copy's path into the persistent
        // definition; guestkey renames the copy to the volume's own path, so
        // put that back.
        self.fix_definition(uuid, dest_path, source_path)
    }

    fn fix_definition(&self, uuid: &str, from: &str, to: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(());
        };
        let inactive = d
            .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(err(format!("persistent XML of domain {uuid}")))?;
        let fixed = inactive.replace(&xml_escape(from), &xml_escape(to));
        if fixed != inactive {
            conn.define_domain_xml(&fixed)
                .map_err(err(format!("restoring the definition of domain {uuid}")))?;
        }
        Ok(())
    }

    fn migrate_domain(
        &self,
        uuid: &str,
        dest_uri: &str,
        migration_uri: Option<&str>,
        live: bool,
        unsafe_: bool,
    ) -> Result<(), HvError> {
        use virt::sys;
        let conn = self.conn()?;
        let d = self
            .domain(&conn, uuid)?
            .ok_or_else(|| HvError(format!("domain {uuid} is not defined on this host")))?;
        let dest = Connect::open(Some(dest_uri)).map_err(err(format!(
            "cannot connect to the destination's libvirt at {dest_uri}"
        )))?;
        let mut flags = sys::VIR_MIGRATE_PERSIST_DEST | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        if d.is_active().unwrap_or(false) {
            if live {
                flags |= sys::VIR_MIGRATE_LIVE;
            }
        } else {
            flags |= sys::VIR_MIGRATE_OFFLINE;
        }
        if unsafe_ {
            flags |= sys::VIR_MIGRATE_UNSAFE;
        }
        let result = d
            .migrate(&dest, flags, None, migration_uri, 0)
            .map(|_| ())
            .map_err(err(format!(
                "libvirt's migration of domain {uuid} to {dest_uri}"
            )));
        drop(d);
        drop(dest);
        result
    }

    fn running_domains_using(
        &self,
        path: &str,
        pool: &str,
        volume: &str,
    ) -> Result<Vec<String>, HvError> {
        let conn = self.conn()?;
        let domains = conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(err("list of running domains"))?;
        let mut out = vec![];
        for d in domains {
            let Ok(xml) = d.xml_desc(0) else { continue };
            if target_of(&xml, path, pool, volume).is_some() {
                out.push(d.uuid_string().map_err(err("domain UUID"))?);
            }
        }
        Ok(out)
    }

    fn remote_domain_state(&self, uri: &str, uuid: &str) -> Result<Option<String>, HvError> {
        let conn =
            Connect::open(Some(uri)).map_err(err(format!("cannot connect to libvirt at {uri}")))?;
        let state = match self.domain(&conn, uuid)? {
            Some(d) => Some(
                state_name(d.state().map_err(err(format!("state of domain {uuid}")))?.0).to_owned(),
            ),
            None => None,
        };
        Ok(state)
    }

    fn set_secret(&self, uuid: &str, volume_path: &str, value: &[u8]) -> Result<(), HvError> {
        let conn = self.conn()?;
        // A leftover secret with this UUID (from a crash) is replaced.
        let _ = self.remove_secret(uuid);
        let xml = secret_xml(uuid, volume_path);
        let s = conn
            .define_secret_xml(&xml, 0)
            .map_err(err(format!("define of libvirt secret {uuid}")))?;
        s.set_value(value, 0)
            .map_err(err(format!("value of libvirt secret {uuid}")))
    }

    fn remove_secret(&self, uuid: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        match conn.lookup_secret_by_uuid_string(uuid) {
            Ok(s) => s
                .undefine()
                .map_err(err(format!("undefine of libvirt secret {uuid}"))),
            Err(_) => Ok(()),
        }
    }
}

/// The target dev (e.g. `vda`) of the disk whose source is file `path` or
/// volume `volume` of pool `pool`.
fn target_of(xml: &str, path: &str, pool: &str, volume: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let (mut in_disk, mut matched, mut target) = (false, false, None);
    loop {
        match r.read_event().ok()? {
            Event::Start(e) | Event::Empty(e) => match e.name().0 {
                "disk" => (in_disk, matched, target) = (true, false, None),
                "source" if in_disk => {
                    let attrs: Vec<_> = e.attributes().flatten().collect();
                    let has = |k: &str, v: &str| attrs.iter().any(|a| a.key.0 == k && a.value == v);
                    matched |= has("file", path) || (has("pool", pool) && has("volume", volume));
                }
                "target" if in_disk => {
                    target = e
                        .attributes()
                        .flatten()
                        .find(|a| a.key.0 == "dev")
                        .map(|a| a.value.into_owned());
                }
                _ => {}
            },
            Event::End(e) if e.name().0 == "disk" => {
                if matched {
                    return target;
                }
                in_disk = false;
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The only secret definition guestkeyd makes: ephemeral (never written to
/// disk by libvirt) and private (its value cannot be read back).
pub fn secret_xml(uuid: &str, volume_path: &str) -> String {
    format!(
        "<secret ephemeral='yes' private='yes'><uuid>{uuid}</uuid><usage type='volume'><volume>{}</volume></usage></secret>",
        xml_escape(volume_path)
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_ephemeral_and_private() {
        let x = super::secret_xml("0f0e0d0c-0000-0000-0000-000000000001", "/p/a'b<c>&d");
        assert!(
            x.starts_with("<secret ephemeral='yes' private='yes'>"),
            "{x}"
        );
        assert!(
            x.contains("<usage type='volume'><volume>/p/a&apos;b&lt;c&gt;&amp;d</volume></usage>"),
            "{x}"
        );
    }
}
