//! Key rotation: a rekey request makes the next key generation (the server
//! then holds two, old and new) and queues the rekey on the host; the old
//! generation is destroyed only when the host confirms (see
//! [`super::push`]). Rotation policies name a pool (every pool of that
//! name) or one volume, a maximum key age and a mode; a volume's own policy
//! wins over its pool's. The scheduler's round ([`Core::apply_policies`])
//! asks for the rekeys that are due.

use crate::domain::hosts::enrolled_in;
use crate::domain::volumes::find_in;
use crate::domain::{Core, now_unix};
use crate::model::{
    Caller, CoreError, InvalidInput, Name, Policy, PolicyScope, RekeyKind, RekeyOrder,
    RekeyPlacement, VolumeInfo, VolumeState,
};
use crate::store::WrappedKey;

impl Core {
    /// Starts a rotation of a volume's key: makes the next generation (the
    /// server then holds two, old and new) and queues the rekey on the host.
    /// The old generation is destroyed only after the host confirms that the
    /// new one opens the volume.
    pub fn request_rekey(
        &self,
        caller: &Caller,
        name_or_id: &str,
        kind: RekeyKind,
        placement: RekeyPlacement,
        bandwidth: u64,
    ) -> Result<VolumeInfo, CoreError> {
        if bandwidth > 0 && !(1 << 20..=1 << 40).contains(&bandwidth) {
            return Err(InvalidInput {
                what: "bandwidth",
                value: bandwidth.to_string(),
                why: "give from 1M to 1T bytes per second, or 0 for no limit".into(),
            }
            .into());
        }
        let v = self.get_volume(name_or_id)?;
        if v.state != VolumeState::Ready {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is {}: a rekey needs it ready",
                v.name, v.state
            )));
        }
        let key = self.new_key(v.split)?;
        let next = v.key_generation + 1;
        let v = self.write(|tx| {
            // The new key is for the volume's host: a revoked host gets none.
            enrolled_in(tx, &v.host)?;
            let master = self.keys.current(tx)?;
            let wrapped = WrappedKey {
                master_key_id: master.id().to_owned(),
                wrapped: master.wrap(&v.id, next, &key),
            };
            drop(master);
            tx.insert_volume_key(&v.id, next, &wrapped, now_unix())?;
            tx.queue_rekey(
                &v.id,
                &RekeyOrder {
                    kind,
                    placement,
                    bandwidth,
                },
            )?;
            self.log(
                tx,
                &caller.actor(),
                "key.created",
                &v.id,
                &format!("volume {} generation {next}", v.name),
            )?;
            self.log(
                tx,
                &caller.actor(),
                "volume.rekey-requested",
                &v.id,
                &format!(
                    "volume {} {kind}, generation {} -> {next}",
                    v.name, v.key_generation
                ),
            )?;
            find_in(tx, &v.id)
        })?;
        drop(key);
        self.wake.notify_one();
        Ok(v)
    }

    /// Sets (or replaces) a policy. A volume policy's target may be the
    /// volume's name or UUID; the UUID is stored.
    pub fn set_policy(&self, caller: &Caller, p: &Policy) -> Result<Policy, CoreError> {
        let target = match p.scope {
            PolicyScope::Pool => Name::parse("pool name", &p.target)?.to_string(),
            PolicyScope::Volume => self.get_volume(&p.target)?.id,
        };
        if p.max_key_age_secs == 0 {
            return Err(InvalidInput {
                what: "max key age",
                value: "0".into(),
                why: "must be longer than 0".into(),
            }
            .into());
        }
        let stored = Policy {
            target,
            ..p.clone()
        };
        self.write(|tx| {
            tx.upsert_policy(&stored)?;
            self.log(
                tx,
                &caller.actor(),
                "policy.set",
                &stored.target,
                &format!(
                    "{} {}: max key age {} s, {}",
                    stored.scope, stored.target, stored.max_key_age_secs, stored.mode
                ),
            )?;
            Ok(())
        })?;
        Ok(stored)
    }

    /// All policies.
    pub fn list_policies(&self) -> Result<Vec<Policy>, CoreError> {
        self.read(|tx| Ok(tx.policies()?))
    }

    /// Removes a policy.
    pub fn remove_policy(
        &self,
        caller: &Caller,
        scope: PolicyScope,
        target: &str,
    ) -> Result<Policy, CoreError> {
        let target = match scope {
            PolicyScope::Volume => self.get_volume(target)?.id,
            PolicyScope::Pool => target.to_owned(),
        };
        self.write(|tx| {
            let found = tx
                .policies()?
                .into_iter()
                .find(|p| p.scope == scope && p.target == target);
            let Some(p) = found else {
                return Err(CoreError::NotFound(format!(
                    "no {scope} policy for {target}: see `guestkeyctl policy list`"
                )));
            };
            tx.delete_policy(scope, &target)?;
            self.log(
                tx,
                &caller.actor(),
                "policy.removed",
                &target,
                scope.as_str(),
            )?;
            Ok(p)
        })
    }

    /// The scheduler's round: rekeys every ready volume whose active key is
    /// older than its policy allows, and deep-rekeys every volume whose
    /// after-migration rekey is due. Volumes of revoked hosts wait (no key
    /// goes to them). Returns the volumes rekeyed.
    pub fn apply_policies(&self) -> Result<Vec<String>, CoreError> {
        let now = now_unix();
        let (mut due, migrated) =
            self.read(|tx| Ok((tx.due_for_rotation(now)?, tx.due_after_migration(now)?)))?;
        // Deep rekeys due after a migration (the source's QEMU held the
        // data key), whatever the age of the key.
        due.retain(|(id, _)| !migrated.contains(id));
        due.extend(migrated.into_iter().map(|id| (id, RekeyKind::Deep)));
        let mut done = vec![];
        for (id, mode) in due {
            match self.request_rekey(&Caller::Scheduler, &id, mode, RekeyPlacement::Any, 0) {
                Ok(_) => done.push(id),
                Err(e) => tracing::warn!(volume = %id, error = %e, "scheduled rekey not started"),
            }
        }
        Ok(done)
    }

    /// Volumes whose rekey is overdue now (for the metrics).
    pub fn rekeys_overdue(&self) -> Result<crate::model::Overdue, CoreError> {
        let now = now_unix();
        self.read(|tx| Ok(tx.rekeys_overdue(now)?))
    }

    /// The policy that applies to a volume, if any.
    pub fn policy_of(&self, volume_id: &str, pool: &str) -> Result<Option<Policy>, CoreError> {
        self.read(|tx| Ok(tx.policy_for(volume_id, pool)?))
    }
}
