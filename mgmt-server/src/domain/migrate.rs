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

use crate::domain::agent::{
    AgentErrorKind, GuestCall, MigrateGuest, MigratingVolume, PrepareMigration, SealedKey,
};
use crate::domain::guests::find_in;
use crate::domain::release::seal_for;
use crate::domain::{Core, now_unix};
use crate::model::{
    Caller, CoreError, EnrolledHost, GuestInfo, GuestState, Name, ReleasePolicy, VolumeInfo,
    VolumeState,
};
use crate::store::MigrationRecord;

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
    pub volumes: Vec<VolumeInfo>,
    /// Live migration, as asked when it began.
    pub live: bool,
    /// As `virsh migrate --unsafe`, as asked when it began.
    pub unsafe_: bool,
    /// It began before (the server stopped while driving it).
    pub resumed: bool,
    /// Their keys, sealed to the destination.
    pub keys: Vec<SealedKey>,
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
        if g.state.is_undefined() {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is undefined",
                g.name
            )));
        }
        if let Some(pending) = g.pending {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is waiting for `{pending}` on host {}: migrate it when that is done",
                g.name, g.host
            )));
        }
        let resuming = match g.migrating_to.as_deref() {
            None => false,
            Some(t) if t == to.as_str() => true,
            Some(t) => {
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
        let (plan_uris, volumes, live, unsafe_, keys) = self.write(|tx| {
            let record = tx
                .host_record(to.as_str())?
                .ok_or_else(|| CoreError::Internal(format!("host {to} vanished")))?;
            let volumes = tx.guest_volumes(&g.uuid)?;
            // A resumed migration goes on as it was asked when it began.
            let (live, unsafe_) = if resuming {
                let m = tx.migration(&g.uuid)?.ok_or_else(|| {
                    CoreError::Internal(format!("the migration of guest {} has no record", g.uuid))
                })?;
                if let Some(r) = self.other_driver(tx, &m)? {
                    return Err(CoreError::FailedPrecondition(format!(
                        "the migration of guest {} to host {} is driven by server replica {} ({} on {}, pid {}), which runs: it finishes it",
                        g.name, to, r.id, r.address, r.host, r.pid
                    )));
                }
                tx.set_migration_driver(&g.uuid, self.replica_id())?;
                (m.live, m.unsafe_)
            } else {
                (live, unsafe_)
            };
            let wanted = if resuming {
                VolumeState::Migrating
            } else {
                VolumeState::Ready
            };
            if let Some(v) = volumes.iter().find(|v| v.state != wanted) {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} of guest {} is {}: a migration needs every volume ready (see `guestkeyctl volume show {}`)",
                    v.name, g.name, v.state, v.name
                )));
            }
            // The verifier binds a split key's other half to the host it
            // first gave it to, and moving that binding is not built.
            if let Some(v) = volumes.iter().find(|v| v.split) {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} of guest {} has a split key, whose other half the verifier released to host {} only: guests with split-key volumes do not migrate (copy the data to a new split volume on {} instead)",
                    v.name, g.name, from.name, dest.name
                )));
            }
            // A guest with an `attested` disk goes only to a host that can
            // be attested (its incoming QEMU asks for the key).
            if volumes.iter().any(|v| v.release.needs_attestation()) {
                crate::domain::volumes::attestable(tx, dest.name.as_str())?;
            }
            let why = format!(" for the migration of guest {} from {}", g.name, from.name);
            let mut keys = Vec::with_capacity(volumes.len());
            for v in &volumes {
                if v.release != ReleasePolicy::Auto {
                    // Not kept by the destination: its incoming QEMU's
                    // hook asks for it, through the volume's gates.
                    keys.push(SealedKey {
                        volume_id: v.id.clone(),
                        generation: v.key_generation,
                        sealed: vec![],
                    });
                    continue;
                }
                self.take_releases(&dest.name, 1)?;
                let packet =
                    self.release(tx, &v.id, v.format, v.key_generation, &dest, &why)?;
                keys.push(seal_for(&packet, &dest).map_err(CoreError::Internal)?);
            }
            if !resuming {
                for v in &volumes {
                    tx.set_volume_state(&v.id, VolumeState::Migrating)?;
                }
                tx.insert_migration(&MigrationRecord {
                    guest_uuid: g.uuid.clone(),
                    from_host: from.name.clone(),
                    to_host: dest.name.clone(),
                    started: now_unix(),
                    live,
                    unsafe_,
                    driver: self.replica_id().to_owned(),
                })?;
                self.log(tx,
                    &caller.actor(),
                    "guest.migrate-requested",
                    &g.uuid,
                    &format!(
                        "guest {} from host {} to host {}",
                        g.name, from.name, dest.name
                    ),
                )?;
            }
            Ok((
                (record.libvirt_uri, record.migration_uri),
                volumes,
                live,
                unsafe_,
                keys,
            ))
        })?;
        let (libvirt_uri, migration_uri) = plan_uris;
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
            volumes,
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
        state: Option<GuestState>,
    ) -> Result<GuestInfo, CoreError> {
        let now = now_unix();
        let state = state.unwrap_or(GuestState::Defined);
        let mut delays = Vec::with_capacity(plan.volumes.len());
        for v in &plan.volumes {
            let after = self
                .policy_of(&v.id, &v.pool)?
                .map_or(0, |p| p.after_migration_secs);
            delays.push(after);
        }
        let g = self.write(|tx| {
            tx.move_guest(&plan.guest.uuid, &plan.to.name, state)?;
            for (v, after) in plan.volumes.iter().zip(&delays) {
                let due = now + (*after).min(i64::MAX as u64 / 2) as i64;
                tx.move_volume(&v.id, &plan.to.name, due)?;
            }
            tx.delete_migration(&plan.guest.uuid)?;
            self.log(tx,
                "server",
                "guest.migrated",
                &plan.guest.uuid,
                &format!(
                    "guest {} from host {} to host {}: {state}",
                    plan.guest.name, plan.from.name, plan.to.name
                ),
            )?;
            for v in &plan.volumes {
                self.log(tx,
                    "server",
                    "key.erased",
                    &v.id,
                    &format!(
                        "host {} erased the key of volume {} after the migration; deep rekey scheduled on host {}",
                        plan.from.name, v.name, plan.to.name
                    ),
                )?;
            }
            find_in(tx, &plan.guest.uuid)
        })?;
        self.wake.notify_one();
        Ok(g)
    }

    /// The migration failed with the guest still on the source: the
    /// volumes are ready again and the error is shown on the guest.
    pub fn fail_migration(&self, plan: &MigrationPlan, error: &str) -> Result<(), CoreError> {
        self.write(|tx| {
            for v in &plan.volumes {
                if tx
                    .volume(&v.id)?
                    .is_some_and(|v| v.state == VolumeState::Migrating)
                {
                    tx.set_volume_state(&v.id, VolumeState::Ready)?;
                }
            }
            tx.delete_migration(&plan.guest.uuid)?;
            tx.set_guest_error(&plan.guest.uuid, error)?;
            self.log(
                tx,
                "server",
                "guest.migrate-failed",
                &plan.guest.uuid,
                &format!(
                    "guest {} stays on host {}: {error}",
                    plan.guest.name, plan.from.name
                ),
            )?;
            Ok(())
        })
    }

    /// Migrations left unfinished (the server stopped while driving them),
    /// as (guest UUID, destination): the scheduler resumes them.
    pub fn unfinished_migrations(&self) -> Result<Vec<(String, String)>, CoreError> {
        // Not those another live replica drives.
        let rows = self.read(|tx| {
            let mut mine = Vec::new();
            for m in tx.migrations()? {
                if self.other_driver(tx, &m)?.is_none() {
                    mine.push(m);
                }
            }
            Ok(mine)
        })?;
        let now = self.migrating_now.lock().unwrap_or_else(|p| p.into_inner());
        Ok(rows
            .into_iter()
            .filter(|m| !now.contains(&m.guest_uuid))
            .map(|m| (m.guest_uuid, m.to_host))
            .collect())
    }

    /// Migrates a guest (all five steps); returns it as recorded afterwards.
    pub async fn migrate_guest(
        self: &Arc<Self>,
        caller: Caller,
        name_or_uuid: String,
        to: String,
        live: bool,
        unsafe_: bool,
    ) -> Result<GuestInfo, CoreError> {
        let n = name_or_uuid.clone();
        let uuid = self.blocking(move |c| c.get_guest(&n)).await?.uuid;
        let _driving = Driving::take(self, &uuid)?;
        let plan = self
            .blocking(move |c| c.begin_migration(&caller, &name_or_uuid, &to, live, unsafe_))
            .await?;
        let plan = Arc::new(plan);
        let agents = &self.agents;

        // Step 3: the destination gets the keys (and is proven reachable).
        let prepare = PrepareMigration {
            op_id: format!("{uuid}:prepare-migration:{}", plan.to.name),
            domain_xml: plan.guest.domain_xml.clone(),
            keys: plan.keys.clone(),
            volumes: plan
                .volumes
                .iter()
                .map(|v| MigratingVolume {
                    volume_id: v.id.clone(),
                    pool: v.pool.clone(),
                    name: v.name.clone(),
                    path: v.path.clone(),
                    secret_uuid: v.secret_uuid.clone(),
                })
                .collect(),
        };
        if let Err(e) = agents.prepare_migration(&plan.to, prepare).await {
            let msg = format!("destination {}: {}", plan.to.name, e.message);
            return Err(self.migration_failed(&plan, msg).await);
        }

        // Step 4: the source has libvirt migrate the guest, then erases its
        // keys. A source that cannot be reached was never asked.
        if let Err(e) = agents.connect(&plan.from).await {
            self.abort_at(&plan.to, &uuid).await;
            return Err(self.migration_failed(&plan, e.message).await);
        }
        let migrate = MigrateGuest {
            op_id: format!("{uuid}:migrate:{}", plan.to.name),
            guest_uuid: uuid.clone(),
            destination_libvirt_uri: plan.to_libvirt_uri.clone(),
            migration_uri: plan.to_migration_uri.clone(),
            live: plan.live,
            unsafe_: plan.unsafe_,
        };
        let state = match agents.migrate_guest(&plan.from, migrate).await {
            Ok(state) => state,
            Err(e) => {
                // Did the guest leave anyway (e.g. the answer got lost)? The
                // destination knows; otherwise it erases what it got.
                let msg = format!("source {}: {}", plan.from.name, e.message);
                if e.kind == AgentErrorKind::Refused
                    && self.abort_at(&plan.to, &uuid).await.is_none()
                {
                    // The source refused and the guest is not at the
                    // destination: it never left.
                    let p = plan.clone();
                    let m = msg.clone();
                    if let Err(e) = self.blocking(move |c| c.fail_migration(&p, &m)).await {
                        tracing::error!(error = %e, "cannot record the failed migration");
                    }
                    return Err(CoreError::FailedPrecondition(msg));
                }
                return Err(CoreError::FailedPrecondition(format!(
                    "{msg}; the migration's outcome is not known yet: run the same `guestkeyctl guest migrate` again to finish it"
                )));
            }
        };

        // Step 5.
        self.blocking(move |c| c.finish_migration(&plan, state))
            .await
    }

    /// A failure before libvirt's migration leaves the guest on the source.
    /// A resumed migration may have moved it already: only the source's
    /// definite refusal ends it; other failures leave it to retry.
    async fn migration_failed(
        self: &Arc<Self>,
        plan: &Arc<MigrationPlan>,
        msg: String,
    ) -> CoreError {
        if plan.resumed {
            return CoreError::FailedPrecondition(format!(
                "{msg}; the migration stays pending and is retried"
            ));
        }
        let p = plan.clone();
        let m = msg.clone();
        if let Err(e) = self.blocking(move |c| c.fail_migration(&p, &m)).await {
            tracing::error!(error = %e, "cannot record the failed migration");
        }
        CoreError::FailedPrecondition(msg)
    }

    /// Asks the destination to drop a prepared migration; returns the
    /// guest's state there (None when it is not there, the expected case).
    async fn abort_at(&self, dest: &EnrolledHost, uuid: &str) -> Option<GuestState> {
        let req = GuestCall {
            op_id: format!("{uuid}:abort-migration:{}", now_unix()),
            guest_uuid: uuid.to_owned(),
        };
        match self.agents.abort_migration(dest, req).await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(guest = %uuid, error = %e, "destination did not drop the prepared migration");
                None
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_uris() {
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
