//! Migration of a guest between hosts, driven by the server:
//!
//! 1. pre-flight: the destination is enrolled, is not the source, and every
//!    managed volume of the guest is ready (not in a rekey);
//! 2. the volumes are marked `migrating` (no rekey, no delete meanwhile) and
//!    the guest's keys are released for, and sealed to, the destination
//!    (audited): during the migration both hosts hold them, never more;
//! 3. the destination's `PrepareMigration` checks that it sees the same
//!    volumes at the same paths (shared storage) and stores the keys, so
//!    that the hook hands them to the incoming QEMU: this call is also the
//!    reachability check;
//! 4. the source's `MigrateGuest` has libvirt migrate the guest and then
//!    erases the keys there;
//! 5. the server records the guest and its volumes on the destination and
//!    schedules a deep rekey of the volumes (the source's QEMU held their
//!    data key) within the policy's after-migration interval, at once if
//!    none sets one.
//!
//! A failure before the guest left the source undoes steps 2 and 3 (the
//! destination erases what it got). If the server itself stops in between,
//! the guest shows `migrating_to`, and running the same `guest migrate`
//! again finishes the migration: every host step is repeatable.

use std::sync::Arc;
use std::time::Duration;

use guestkey_proto::agent::{self, host_agent_client::HostAgentClient};
use rusqlite::params;

use crate::audit;
use crate::core::{Caller, Core, CoreError, EnrolledHost, HostInfo};
use crate::guests::{GuestInfo, SealedDiskKey};
use crate::names::{InvalidInput, Name};

/// The longest a libvirt migration may take before the server gives up
/// waiting (the host goes on; a repeated `guest migrate` picks it up).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// A managed volume of the migrating guest.
#[derive(Debug, Clone)]
pub struct MovingVolume {
    /// Volume id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// Path on the hosts (shared storage).
    pub path: String,
    /// libvirt secret UUID.
    pub secret_uuid: String,
}

/// What a started migration needs from the hosts.
pub struct MigrationPlan {
    /// The guest.
    pub guest: GuestInfo,
    /// Source host.
    pub from: EnrolledHost,
    /// Destination host.
    pub to: EnrolledHost,
    /// libvirt URI of the destination, as the source reaches it.
    pub to_libvirt_uri: String,
    /// QEMU migration URI of the destination ("" for libvirt's default).
    pub to_migration_uri: String,
    /// Its managed volumes.
    pub volumes: Vec<MovingVolume>,
    /// Live migration, as asked when it began.
    pub live: bool,
    /// As `virsh migrate --unsafe`, as asked when it began.
    pub unsafe_: bool,
    /// It began before (the server stopped while driving it).
    pub resumed: bool,
    /// Their keys, sealed to the destination.
    pub keys: Vec<SealedDiskKey>,
}

/// Checks a libvirt connection URI (`qemu[+transport]://…/system|session`).
pub fn parse_libvirt_uri(value: &str) -> Result<String, InvalidInput> {
    let bad = |why: &str| InvalidInput {
        what: "libvirt URI",
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| bad("use e.g. qemu+tls://host2.example/system"))?;
    if scheme != "qemu" && !scheme.starts_with("qemu+") {
        return Err(bad(
            "guestkey migrates QEMU guests: the scheme must be qemu or qemu+TRANSPORT",
        ));
    }
    if value.len() > 1024 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("no spaces or control characters, at most 1024 bytes"));
    }
    if !(rest.contains("/system") || rest.contains("/session")) {
        return Err(bad("the path must be /system or /session"));
    }
    Ok(value.to_owned())
}

/// Checks a QEMU migration URI (`tcp://HOST[:PORT]`, `tcp:HOST:PORT`,
/// `rdma://…`), or "" for libvirt's default.
pub fn parse_migration_uri(value: &str) -> Result<String, InvalidInput> {
    if value.is_empty() {
        return Ok(String::new());
    }
    let ok = (value.starts_with("tcp:") || value.starts_with("rdma:"))
        && value.len() <= 1024
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(InvalidInput {
            what: "migration URI",
            value: value.to_owned(),
            why: "use tcp://HOST:PORT (or leave it empty for libvirt's default)".into(),
        })
    }
}

/// The default libvirt URI of a host: TLS to the host part of its address.
fn default_libvirt_uri(address: &str) -> String {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.contains(':') {
        format!("qemu+tls://[{host}]/system")
    } else {
        format!("qemu+tls://{host}/system")
    }
}

impl Core {
    /// Sets where other hosts' libvirt reaches this host's libvirt, and the
    /// QEMU migration URI for guests coming to it.
    pub fn set_host_migration(
        &self,
        caller: &Caller,
        name: &str,
        libvirt_uri: &str,
        migration_uri: &str,
    ) -> Result<HostInfo, CoreError> {
        let libvirt_uri = if libvirt_uri.is_empty() {
            String::new()
        } else {
            parse_libvirt_uri(libvirt_uri)?
        };
        let migration_uri = parse_migration_uri(migration_uri)?;
        let h = self.get_host(name)?;
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE hosts SET libvirt_uri = ?1, migration_uri = ?2 WHERE name = ?3",
            params![libvirt_uri, migration_uri, h.name],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "host.migration-set",
            &h.name,
            &format!("libvirt {libvirt_uri:?}, migration {migration_uri:?}"),
        )?;
        tx.commit()?;
        drop(conn);
        self.get_host(&h.name)
    }

    /// Steps 1 and 2: checks, marks the volumes, releases the keys for the
    /// destination. Resumes a migration to the same destination that the
    /// server did not finish.
    pub fn begin_migration(
        &self,
        caller: &Caller,
        name_or_uuid: &str,
        to: &str,
        live: bool,
        unsafe_: bool,
    ) -> Result<MigrationPlan, CoreError> {
        let to = Name::parse("host name", to)?;
        let g = self.get_guest(name_or_uuid)?;
        if g.state == "undefined" {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is undefined",
                g.name
            )));
        }
        if !g.pending.is_empty() {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is waiting for `{}` on host {}: migrate it when that is done",
                g.name, g.pending, g.host
            )));
        }
        let resuming = match g.migrating_to.as_str() {
            "" => false,
            t if t == to.as_str() => true,
            t => {
                return Err(CoreError::FailedPrecondition(format!(
                    "guest {} is migrating to host {t}: run `guestkeyctl guest migrate {} --to {t}` to finish that first",
                    g.name, g.name
                )));
            }
        };
        if g.host == to.as_str() {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is already on host {to}",
                g.name
            )));
        }
        let from = self.enrolled_host(&g.host)?;
        let dest = self.enrolled_host(to.as_str())?;
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (libvirt_uri, migration_uri): (String, String) = tx.query_row(
            "SELECT libvirt_uri, migration_uri FROM hosts WHERE name = ?1",
            [to.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let volumes: Vec<(MovingVolume, String, i64, String)> = {
            let mut stmt = tx.prepare(
                "SELECT v.id, v.name, v.pool, v.path, v.secret_uuid, v.state, v.generation, v.format
                 FROM guest_disks d JOIN volumes v ON v.id = d.volume_id
                 WHERE d.guest_uuid = ?1 ORDER BY v.name",
            )?;
            let rows = stmt.query_map([&g.uuid], |r| {
                Ok((
                    MovingVolume {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        pool: r.get(2)?,
                        path: r.get(3)?,
                        secret_uuid: r.get(4)?,
                    },
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, String>(7)?,
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        // A resumed migration goes on as it was asked when it began.
        let (live, unsafe_) = if resuming {
            tx.query_row(
                "SELECT live, unsafe FROM guest_migrations WHERE guest_uuid = ?1",
                [&g.uuid],
                |r| Ok((r.get::<_, bool>(0)?, r.get::<_, bool>(1)?)),
            )?
        } else {
            (live, unsafe_)
        };
        let wanted = if resuming { "migrating" } else { "ready" };
        if let Some((v, state, ..)) = volumes.iter().find(|(_, s, ..)| s != wanted) {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} of guest {} is {state}: a migration needs every volume ready (see `guestkeyctl volume show {}`)",
                v.name, g.name, v.name
            )));
        }
        let mut keys = Vec::with_capacity(volumes.len());
        for (v, _, generation, format) in &volumes {
            self.take_release_slot(&dest.name)?;
            let packet = self.release_packet(
                &tx,
                &v.id,
                format,
                *generation as u64,
                &dest,
                &format!(" for the migration of guest {} from {}", g.name, from.name),
            )?;
            let sealed = crate::volumes::seal_for(&packet, &dest).map_err(CoreError::Internal)?;
            keys.push(SealedDiskKey {
                volume_id: v.id.clone(),
                generation: *generation as u64,
                sealed,
            });
        }
        if !resuming {
            for (v, ..) in &volumes {
                tx.execute(
                    "UPDATE volumes SET state = 'migrating' WHERE id = ?1",
                    [&v.id],
                )?;
            }
            tx.execute(
                "INSERT INTO guest_migrations (guest_uuid, from_host, to_host, started, live, unsafe) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![g.uuid, from.name, dest.name, crate::db::now_unix(), live, unsafe_],
            )?;
            audit::append(
                &tx,
                &caller.actor(),
                "guest.migrate-requested",
                &g.uuid,
                &format!(
                    "guest {} from host {} to host {}",
                    g.name, from.name, dest.name
                ),
            )?;
        }
        tx.commit()?;
        drop(conn);
        let to_libvirt_uri = if libvirt_uri.is_empty() {
            default_libvirt_uri(&dest.address)
        } else {
            libvirt_uri
        };
        Ok(MigrationPlan {
            guest: self.get_guest(&g.uuid)?,
            from,
            to: dest,
            to_libvirt_uri,
            to_migration_uri: migration_uri,
            volumes: volumes.into_iter().map(|(v, ..)| v).collect(),
            keys,
            live,
            unsafe_,
            resumed: resuming,
        })
    }

    /// Step 5: the guest and its volumes now belong to the destination.
    pub fn finish_migration(
        &self,
        plan: &MigrationPlan,
        state: &str,
    ) -> Result<GuestInfo, CoreError> {
        let now = crate::db::now_unix();
        let mut delays = Vec::with_capacity(plan.volumes.len());
        for v in &plan.volumes {
            let after = self
                .policy_of(&v.id, &v.pool)?
                .map_or(0, |p| p.after_migration_secs);
            delays.push(after);
        }
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE guests SET host = ?1, state = ?2, last_error = '' WHERE uuid = ?3",
            params![plan.to.name, state, plan.guest.uuid],
        )?;
        for (v, after) in plan.volumes.iter().zip(delays) {
            tx.execute(
                "UPDATE volumes SET host = ?1, state = 'ready', rekey_due = ?2 WHERE id = ?3",
                params![
                    plan.to.name,
                    now + after.min(i64::MAX as u64 / 2) as i64,
                    v.id
                ],
            )?;
        }
        tx.execute(
            "DELETE FROM guest_migrations WHERE guest_uuid = ?1",
            [&plan.guest.uuid],
        )?;
        audit::append(
            &tx,
            "server",
            "guest.migrated",
            &plan.guest.uuid,
            &format!(
                "guest {} from host {} to host {}: {state}",
                plan.guest.name, plan.from.name, plan.to.name
            ),
        )?;
        for v in &plan.volumes {
            audit::append(
                &tx,
                "server",
                "key.erased",
                &v.id,
                &format!(
                    "host {} erased the key of volume {} after the migration; deep rekey scheduled on host {}",
                    plan.from.name, v.name, plan.to.name
                ),
            )?;
        }
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_guest(&plan.guest.uuid)
    }

    /// The migration failed with the guest still on the source: the
    /// volumes are ready again and the error is shown on the guest.
    pub fn fail_migration(&self, plan: &MigrationPlan, error: &str) -> Result<(), CoreError> {
        let mut conn = self.db();
        let tx = conn.transaction()?;
        for v in &plan.volumes {
            tx.execute(
                "UPDATE volumes SET state = 'ready' WHERE id = ?1 AND state = 'migrating'",
                [&v.id],
            )?;
        }
        tx.execute(
            "DELETE FROM guest_migrations WHERE guest_uuid = ?1",
            [&plan.guest.uuid],
        )?;
        tx.execute(
            "UPDATE guests SET last_error = ?1 WHERE uuid = ?2",
            params![error, plan.guest.uuid],
        )?;
        audit::append(
            &tx,
            "server",
            "guest.migrate-failed",
            &plan.guest.uuid,
            &format!(
                "guest {} stays on host {}: {error}",
                plan.guest.name, plan.from.name
            ),
        )?;
        tx.commit()?;
        Ok(())
    }
}

/// Marks a guest's migration as driven by this process while it lives.
struct Driving {
    core: Arc<Core>,
    uuid: String,
}

impl Driving {
    fn take(core: &Arc<Core>, uuid: &str) -> Result<Self, CoreError> {
        let mut set = core.migrating_now.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(uuid.to_owned()) {
            return Err(CoreError::FailedPrecondition(format!(
                "the migration of guest {uuid} is under way: wait for it (`guestkeyctl guest show`)"
            )));
        }
        Ok(Self {
            core: core.clone(),
            uuid: uuid.to_owned(),
        })
    }
}

impl Drop for Driving {
    fn drop(&mut self) {
        self.core
            .migrating_now
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.uuid);
    }
}

/// Migrations left unfinished (the server stopped while driving them), by
/// (guest UUID, destination): the pusher resumes them.
pub fn unfinished(core: &Core) -> Result<Vec<(String, String)>, CoreError> {
    let rows: Vec<(String, String)> = {
        let conn = core.db();
        let mut stmt = conn.prepare("SELECT guest_uuid, to_host FROM guest_migrations")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let now = core.migrating_now.lock().unwrap_or_else(|p| p.into_inner());
    Ok(rows.into_iter().filter(|(g, _)| !now.contains(g)).collect())
}

/// Migrates a guest (all five steps); returns it as recorded afterwards.
pub async fn migrate_guest(
    core: Arc<Core>,
    caller: Caller,
    name_or_uuid: String,
    to: String,
    live: bool,
    unsafe_: bool,
) -> Result<GuestInfo, CoreError> {
    let uuid = core.get_guest(&name_or_uuid)?.uuid;
    let _driving = Driving::take(&core, &uuid)?;
    let c = core.clone();
    let plan = tokio::task::spawn_blocking(move || {
        c.begin_migration(&caller, &name_or_uuid, &to, live, unsafe_)
    })
    .await
    .map_err(|e| CoreError::Internal(e.to_string()))??;
    let (live, unsafe_) = (plan.live, plan.unsafe_);
    // A failure before libvirt's migration leaves the guest on the source.
    // A resumed migration may have moved it already: only the source's
    // definite refusal (below) ends it; other failures leave it to retry.
    let failed = |core: &Core, plan: &MigrationPlan, msg: String| -> CoreError {
        if plan.resumed {
            return CoreError::FailedPrecondition(format!(
                "{msg}; the migration stays pending and is retried"
            ));
        }
        if let Err(e) = core.fail_migration(plan, &msg) {
            tracing::error!(error = %e, "cannot record the failed migration");
        }
        CoreError::FailedPrecondition(msg)
    };

    // Step 3: the destination gets the keys (and is proven reachable).
    let mut dest = match crate::push::agent_client(&core, &plan.to, None).await {
        Ok(c) => c,
        Err(e) => return Err(failed(&core, &plan, e)),
    };
    let prepare = agent::PrepareMigrationRequest {
        op_id: format!("{uuid}:prepare-migration:{}", plan.to.name),
        domain_xml: plan.guest.domain_xml.clone(),
        keys: plan
            .keys
            .iter()
            .map(|k| agent::SealedKey {
                volume_id: k.volume_id.clone(),
                generation: k.generation,
                sealed_packet: k.sealed.clone(),
            })
            .collect(),
        volumes: plan
            .volumes
            .iter()
            .map(|v| agent::MigratingVolume {
                volume_id: v.id.clone(),
                pool: v.pool.clone(),
                name: v.name.clone(),
                path: v.path.clone(),
                secret_uuid: v.secret_uuid.clone(),
            })
            .collect(),
    };
    if let Err(s) = dest.prepare_migration(prepare).await {
        let msg = format!(
            "destination {}: {}",
            plan.to.name,
            crate::push::describe_status(&plan.to, &s)
        );
        return Err(failed(&core, &plan, msg));
    }

    // Step 4: the source has libvirt migrate the guest, then erases its keys.
    let mut source =
        match crate::push::agent_client(&core, &plan.from, Some(MIGRATION_TIMEOUT)).await {
            Ok(c) => c,
            Err(e) => {
                abort_at(&mut dest, &uuid).await;
                return Err(failed(&core, &plan, e));
            }
        };
    let migrate = agent::MigrateGuestRequest {
        op_id: format!("{uuid}:migrate:{}", plan.to.name),
        guest_uuid: uuid.clone(),
        destination_libvirt_uri: plan.to_libvirt_uri.clone(),
        migration_uri: plan.to_migration_uri.clone(),
        live,
        r#unsafe: unsafe_,
    };
    let state = match source.migrate_guest(migrate).await {
        Ok(r) => r.into_inner().state,
        Err(s) => {
            // Did the guest leave anyway (e.g. the answer got lost)? The
            // destination knows; otherwise it erases what it got.
            let msg = format!(
                "source {}: {}",
                plan.from.name,
                crate::push::describe_status(&plan.from, &s)
            );
            if s.code() == tonic::Code::FailedPrecondition
                || s.code() == tonic::Code::InvalidArgument
            {
                let here = abort_at(&mut dest, &uuid).await;
                if here.is_empty() {
                    // The source refused and the guest is not at the
                    // destination: it never left.
                    if let Err(e) = core.fail_migration(&plan, &msg) {
                        tracing::error!(error = %e, "cannot record the failed migration");
                    }
                    return Err(CoreError::FailedPrecondition(msg));
                }
            }
            return Err(CoreError::FailedPrecondition(format!(
                "{msg}; the migration's outcome is not known yet: run the same `guestkeyctl guest migrate` again to finish it"
            )));
        }
    };

    // Step 5.
    let c = core.clone();
    tokio::task::spawn_blocking(move || c.finish_migration(&plan, &state))
        .await
        .map_err(|e| CoreError::Internal(e.to_string()))?
}

/// Asks the destination to drop a prepared migration; returns the guest's
/// state there ("" when it is not there, which is the expected case).
async fn abort_at(dest: &mut HostAgentClient<tonic::transport::Channel>, uuid: &str) -> String {
    let req = agent::GuestRequest {
        op_id: format!("{uuid}:abort-migration:{}", crate::db::now_unix()),
        guest_uuid: uuid.to_owned(),
    };
    match dest.abort_migration(req).await {
        Ok(r) => r.into_inner().state,
        Err(e) => {
            tracing::warn!(guest = %uuid, error = %e, "destination did not drop the prepared migration");
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert!(parse_libvirt_uri("qemu+tls://h2.example/system").is_ok());
        assert!(
            parse_libvirt_uri("qemu+unix:///session?socket=/home/u/.cache/libvirt/libvirt-sock")
                .is_ok()
        );
        for bad in [
            "",
            "h2",
            "xen://h/system",
            "qemu+tls://h2/",
            "qemu://h /system",
        ] {
            assert!(parse_libvirt_uri(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_migration_uri("").unwrap(), "");
        assert!(parse_migration_uri("tcp://127.0.0.1:49152").is_ok());
        assert!(parse_migration_uri("http://x").is_err());
        assert_eq!(
            default_libvirt_uri("10.0.0.2:7444"),
            "qemu+tls://10.0.0.2/system"
        );
        assert_eq!(
            default_libvirt_uri("[fd00::2]:7444"),
            "qemu+tls://[fd00::2]/system"
        );
    }
}
