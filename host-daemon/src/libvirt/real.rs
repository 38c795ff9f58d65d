//! [`Libvirt`]: the [`Hypervisor`] on the `virt` crate.

use std::path::PathBuf;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;

use super::pools::{pool_path, pool_type};
use super::xml::{copy_disk_xml, escape, target_of};
use super::{CopyTarget, Definition, DiskSource, HvError, Hypervisor, PoolListing};
use crate::model::{DomainState, is_copy_of};

/// The real libvirt.
pub struct Libvirt {
    uri: String,
}

fn call(what: impl std::fmt::Display) -> impl FnOnce(virt::error::Error) -> HvError {
    let what = what.to_string();
    move |e| HvError::Call {
        what,
        message: e.message().to_owned(),
    }
}

/// libvirt's "no such domain".
fn no_domain(e: &virt::error::Error) -> bool {
    matches!(
        e.code(),
        virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
    )
}

fn state_of(s: virt::enumutil::Enum<virt::domain::DomainState, u32>) -> DomainState {
    use virt::domain::DomainState as S;
    let virt::enumutil::Enum::Known(s) = s else {
        return DomainState::NoState;
    };
    match s {
        S::Running => DomainState::Running,
        S::Blocked => DomainState::Idle,
        S::Paused => DomainState::Paused,
        S::Shutdown => DomainState::InShutdown,
        S::Shutoff => DomainState::ShutOff,
        S::Crashed => DomainState::Crashed,
        S::PMSuspended => DomainState::PmSuspended,
        _ => DomainState::NoState,
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
        Connect::open(Some(&self.uri)).map_err(|e| HvError::Connect {
            uri: self.uri.clone(),
            message: e.message().to_owned(),
        })
    }

    fn pool(&self, conn: &Connect, pool: &str) -> Result<StoragePool, HvError> {
        conn.lookup_storage_pool_by_name(pool)
            .map_err(call(format!("storage pool {pool}")))
    }

    fn domain(&self, conn: &Connect, uuid: &str) -> Result<Option<Domain>, HvError> {
        match conn.lookup_domain_by_uuid_string(uuid) {
            Ok(d) => Ok(Some(d)),
            Err(e) if no_domain(&e) => Ok(None),
            Err(e) => Err(call(format!("domain {uuid}"))(e)),
        }
    }

    fn defined(&self, conn: &Connect, uuid: &str) -> Result<Domain, HvError> {
        self.domain(conn, uuid)?
            .ok_or_else(|| HvError::NoDomain(uuid.to_owned()))
    }
}

impl Hypervisor for Libvirt {
    fn pool_dir(&self, pool: &str) -> Result<PathBuf, HvError> {
        let conn = self.conn()?;
        let p = self.pool(&conn, pool)?;
        let xml = p
            .xml_desc(0)
            .map_err(call(format!("storage pool {pool}")))?;
        if !matches!(pool_type(&xml).as_deref(), Some("dir" | "fs" | "netfs")) {
            return Err(HvError::NotDirPool(pool.to_owned()));
        }
        pool_path(&xml)
            .filter(|p| p.starts_with('/'))
            .map(PathBuf::from)
            .ok_or_else(|| HvError::NoPoolPath(pool.to_owned()))
    }

    fn refresh_pool(&self, pool: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        self.pool(&conn, pool)?
            .refresh(0)
            .map_err(call(format!("refresh of pool {pool}")))
    }

    fn volume_path(&self, pool: &str, name: &str) -> Result<Option<String>, HvError> {
        let conn = self.conn()?;
        let p = self.pool(&conn, pool)?;
        // A volume made by another program since libvirt last looked.
        if let Err(e) = p.refresh(0) {
            tracing::debug!(%pool, error = %e.message(), "pool refresh failed; using libvirt's last view");
        }
        match p.lookup_storage_vol_by_name(name) {
            Ok(v) => Ok(Some(v.path().map_err(call(format!("volume {name}")))?)),
            Err(_) => Ok(None),
        }
    }

    fn delete_volume(&self, pool: &str, name: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let p = self.pool(&conn, pool)?;
        if let Err(e) = p.refresh(0) {
            tracing::debug!(%pool, error = %e.message(), "pool refresh failed; using libvirt's last view");
        }
        match p.lookup_storage_vol_by_name(name) {
            Ok(v) => v
                .delete(0)
                .map_err(call(format!("delete of volume {name} in pool {pool}"))),
            Err(_) => Ok(()),
        }
    }

    fn define_domain(&self, xml: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        conn.define_domain_xml(xml)
            .map(|_| ())
            .map_err(call("libvirt refused the domain XML"))
    }

    fn undefine_domain(&self, uuid: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(());
        };
        if d.is_active().unwrap_or(false) {
            d.destroy()
                .map_err(call(format!("stop of domain {uuid}")))?;
        }
        d.undefine()
            .map_err(call(format!("undefine of domain {uuid}")))
    }

    fn start_domain(&self, uuid: &str) -> Result<DomainState, HvError> {
        let conn = self.conn()?;
        let d = self.defined(&conn, uuid)?;
        if !d.is_active().unwrap_or(false) {
            d.create()
                .map_err(call(format!("start of domain {uuid}")))?;
        }
        Ok(self.domain_state(uuid)?.unwrap_or(DomainState::NoState))
    }

    fn stop_domain(&self, uuid: &str) -> Result<DomainState, HvError> {
        let conn = self.conn()?;
        let d = self.defined(&conn, uuid)?;
        if d.is_active().unwrap_or(false) {
            d.destroy()
                .map_err(call(format!("stop of domain {uuid}")))?;
        }
        Ok(self.domain_state(uuid)?.unwrap_or(DomainState::NoState))
    }

    fn domain_state(&self, uuid: &str) -> Result<Option<DomainState>, HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(None);
        };
        let (state, _) = d.state().map_err(call(format!("state of domain {uuid}")))?;
        Ok(Some(state_of(state)))
    }

    fn domain_autostart(&self, uuid: &str) -> Result<Option<bool>, HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(None);
        };
        d.autostart()
            .map(Some)
            .map_err(call(format!("autostart flag of domain {uuid}")))
    }

    fn ping(&self) -> bool {
        self.conn().is_ok()
    }

    fn definition(&self, name_or_uuid: &str) -> Result<Option<Definition>, HvError> {
        let conn = self.conn()?;
        let found = if uuid::Uuid::try_parse(name_or_uuid).is_ok() {
            self.domain(&conn, name_or_uuid)?
        } else {
            match conn.lookup_domain_by_name(name_or_uuid) {
                Ok(d) => Some(d),
                Err(e) if no_domain(&e) => None,
                Err(e) => return Err(call(format!("domain {name_or_uuid}"))(e)),
            }
        };
        let Some(d) = found else { return Ok(None) };
        let what = format!("domain {name_or_uuid}");
        let uuid = d.uuid_string().map_err(call(&what))?;
        let persistent = d.is_persistent().map_err(call(&what))?;
        let inactive = if persistent {
            virt::sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        // Never sent anywhere: only compared, to tell whether `xml` lacks
        // something libvirt keeps secret.
        let secure = zeroize::Zeroizing::new(
            d.xml_desc(inactive | virt::sys::VIR_DOMAIN_XML_SECURE)
                .map_err(call(format!("definition of {what}")))?,
        );
        let xml = d
            .xml_desc(inactive)
            .map_err(call(format!("definition of {what}")))?;
        let (state, _) = d.state().map_err(call(format!("state of {what}")))?;
        Ok(Some(Definition {
            uuid,
            state: state_of(state),
            persistent,
            security_info_withheld: *secure != xml,
            xml,
        }))
    }

    fn volume_of_path(&self, path: &str) -> Result<Option<(String, String)>, HvError> {
        let conn = self.conn()?;
        let look = || -> Option<(String, String)> {
            let v = conn.lookup_storage_vol_by_path(path).ok()?;
            let pool = v.lookup_storage_pool().ok()?;
            Some((pool.name().ok()?, v.name().ok()?))
        };
        if let Some(found) = look() {
            return Ok(Some(found));
        }
        // A file made by another program since libvirt last looked: refresh
        // the active pools once and look again.
        let pools = conn
            .list_all_storage_pools(virt::sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(call("list of storage pools"))?;
        for p in pools {
            if let Err(e) = p.refresh(0) {
                tracing::debug!(error = %e.message(), "pool refresh failed; using libvirt's last view");
            }
        }
        Ok(look())
    }

    fn pool_volumes(&self, pool: &str, max: usize) -> Result<Option<PoolListing>, HvError> {
        super::pools::list(&self.conn()?, pool, max)
    }

    fn domain_definitions(&self) -> Result<Vec<super::DomainXml>, HvError> {
        super::pools::domains(&self.conn()?)
    }

    fn copy_running_disk(
        &self,
        uuid: &str,
        source: DiskSource<'_>,
        target: &CopyTarget<'_>,
    ) -> Result<(), HvError> {
        let conn = self.conn()?;
        let d = self.defined(&conn, uuid)?;
        let live = d
            .xml_desc(0)
            .map_err(call(format!("XML of domain {uuid}")))?;
        // After an earlier online rekey the running guest's disk still
        // carries the name of the copy it pivoted to (the same file, moved
        // into place since).
        let disk = super::xml::target_where(
            &live,
            |file| file == source.path || is_copy_of(file, source.path),
            source,
        )
        .ok_or_else(|| HvError::NoDisk {
            uuid: uuid.to_owned(),
            path: source.path.to_owned(),
        })?;
        let dest = copy_disk_xml(target.path, target.format.as_str(), target.secret);
        // A copy left running by a crash of guestkeyd: start afresh.
        if matches!(super::blockjob::progress(&d, &disk), Ok(Some(_))) {
            super::blockjob::cancel(&d, &disk);
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let progress = crate::progress::Tracker::start(source.path, "copying online", 0);
        super::blockjob::copy_and_pivot(
            &d,
            &disk,
            &dest,
            std::time::Duration::from_secs(3600),
            target.bandwidth,
            &|done, total| progress.set(done, total),
        )?;
        drop(progress);
        // At the pivot libvirt writes the copy's path into the persistent
        // definition; guestkey moves the copy to the volume's own path, so
        // put that back.
        self.fix_definition(uuid, target.path, source.path)
    }

    fn fix_definition(&self, uuid: &str, from: &str, to: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let Some(d) = self.domain(&conn, uuid)? else {
            return Ok(());
        };
        // A transient domain has no persistent definition: defining its
        // live XML would make it persistent (and leave it behind).
        if !d.is_persistent().map_err(call(format!("domain {uuid}")))? {
            return Ok(());
        }
        let inactive = d
            .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(call(format!("persistent XML of domain {uuid}")))?;
        let fixed = inactive.replace(&escape(from), &escape(to));
        if fixed != inactive {
            conn.define_domain_xml(&fixed)
                .map_err(call(format!("restoring the definition of domain {uuid}")))?;
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
        let d = self.defined(&conn, uuid)?;
        let dest = Connect::open(Some(dest_uri)).map_err(|e| HvError::Connect {
            uri: dest_uri.to_owned(),
            message: e.message().to_owned(),
        })?;
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
            .map_err(call(format!(
                "libvirt's migration of domain {uuid} to {dest_uri}"
            )));
        drop(d);
        drop(dest);
        result
    }

    fn running_domains_using(&self, source: DiskSource<'_>) -> Result<Vec<String>, HvError> {
        let conn = self.conn()?;
        let domains = conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(call("list of running domains"))?;
        let mut out = vec![];
        for d in domains {
            let Ok(xml) = d.xml_desc(0) else { continue };
            if target_of(&xml, source).is_some() {
                out.push(d.uuid_string().map_err(call("domain UUID"))?);
            }
        }
        Ok(out)
    }

    fn remote_domain_state(&self, uri: &str, uuid: &str) -> Result<Option<DomainState>, HvError> {
        let conn = Connect::open(Some(uri)).map_err(|e| HvError::Connect {
            uri: uri.to_owned(),
            message: e.message().to_owned(),
        })?;
        let state = match self.domain(&conn, uuid)? {
            Some(d) => Some(state_of(
                d.state()
                    .map_err(call(format!("state of domain {uuid}")))?
                    .0,
            )),
            None => None,
        };
        Ok(state)
    }

    fn set_secret(&self, uuid: &str, volume_path: &str, value: &[u8]) -> Result<(), HvError> {
        let conn = self.conn()?;
        // A leftover secret with this UUID (from a crash) is replaced.
        self.remove_secret(uuid)?;
        let s = conn
            .define_secret_xml(&super::secret_xml(uuid, volume_path), 0)
            .map_err(call(format!("define of libvirt secret {uuid}")))?;
        s.set_value(value, 0)
            .map_err(call(format!("value of libvirt secret {uuid}")))
    }

    fn secret_defined(&self, uuid: &str) -> Result<bool, HvError> {
        let conn = self.conn()?;
        match conn.lookup_secret_by_uuid_string(uuid) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.code(),
                    virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoSecret)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(call(format!("look-up of libvirt secret {uuid}"))(e)),
        }
    }

    fn remove_secret(&self, uuid: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        match conn.lookup_secret_by_uuid_string(uuid) {
            Ok(s) => s
                .undefine()
                .map_err(call(format!("undefine of libvirt secret {uuid}"))),
            Err(e)
                if matches!(
                    e.code(),
                    virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoSecret)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(call(format!("look-up of libvirt secret {uuid}"))(e)),
        }
    }
}
