//! Delivering pending guest operations (define with the guest's keys,
//! undefine, start, stop), one at a time, with the retry rules of
//! [`super::push`].

use std::sync::Arc;

use crate::domain::agent::{DefineGuest, GuestCall, SealedKey};
use crate::domain::push::{FailureKind, PushFailure, held};
use crate::domain::release::seal_for;
use crate::domain::{Core, now_unix_ms};
use crate::model::{CoreError, EnrolledHost, GuestInfo, GuestOp, GuestState, ReleasePolicy};
use crate::store::Tx;

/// Guest operations looked at per round.
const GUEST_BATCH: u32 = 64;

impl Core {
    /// Guests whose pending operation is due.
    pub fn due_guests(&self, limit: u32) -> Result<Vec<GuestInfo>, CoreError> {
        self.read(|tx| Ok(tx.due_guests(now_unix_ms(), limit)?))
    }

    /// Delivers the due guest operations, one at a time, until `stop`
    /// says to stop.
    pub async fn push_guests(self: &Arc<Self>, stop: impl Fn() -> bool) -> Result<(), CoreError> {
        let due = self.blocking(|c| c.due_guests(GUEST_BATCH)).await?;
        for g in due {
            if stop() {
                break;
            }
            let result = self.push_guest(&g).await;
            let g2 = g.clone();
            let recorded = match result {
                Ok(state) => {
                    self.blocking(move |c| c.guest_push_succeeded(&g2, state))
                        .await
                }
                Err(e) => {
                    tracing::warn!(guest = %g.uuid, host = %g.host, error = %e.message, kind = ?e.kind, "push failed");
                    self.blocking(move |c| c.guest_push_failed(&g2, &e)).await
                }
            };
            if let Err(e) = recorded {
                tracing::error!(guest = %g.uuid, error = %e, "cannot record push outcome");
            }
        }
        Ok(())
    }

    /// Pushes one guest operation; returns the guest's state on the host.
    async fn push_guest(
        self: &Arc<Self>,
        g: &GuestInfo,
    ) -> Result<Option<GuestState>, PushFailure> {
        let name = g.host.clone();
        let host = self
            .blocking(move |c| c.enrolled_host(&name))
            .await
            .map_err(|e| held(&e))?;
        // No key is released for a host that cannot be reached.
        self.agents.connect(&host).await?;
        let (guest, h) = (g.clone(), host.clone());
        let keys = self
            .blocking(move |c| c.release_guest_keys(&guest, &h))
            .await
            .map_err(|e| held(&e))?;
        let agents = &self.agents;
        let call = |op: &str| GuestCall {
            op_id: format!("{}:{op}:{}", g.uuid, g.attempts),
            guest_uuid: g.uuid.clone(),
        };
        let r = match g.pending {
            Some(GuestOp::Define) => {
                let req = DefineGuest {
                    op_id: format!("{}:define", g.uuid),
                    domain_xml: g.domain_xml.clone(),
                    keys,
                };
                agents.define_guest(&host, req).await
            }
            Some(GuestOp::Undefine) => agents.undefine_guest(&host, call("undefine")).await,
            Some(GuestOp::Start) => agents.start_guest(&host, call("start")).await,
            Some(GuestOp::Stop) | None => agents.stop_guest(&host, call("stop")).await,
        };
        r.map_err(PushFailure::after_connect)
    }

    /// For a definition, the guest's keys, each released (audited first,
    /// fail closed) and sealed to its host; nothing for other operations.
    pub(crate) fn release_guest_keys(
        &self,
        g: &GuestInfo,
        host: &EnrolledHost,
    ) -> Result<Vec<SealedKey>, CoreError> {
        if g.pending != Some(GuestOp::Define) {
            return Ok(vec![]);
        }
        self.write(|tx| {
            let rows = tx.guest_keys(&g.uuid, &host.name)?;
            let held = rows
                .iter()
                .filter(|k| k.release == ReleasePolicy::Auto)
                .count();
            self.take_releases(&host.name, held as u32)?;
            let why = format!(" for guest {}", g.name);
            let mut keys = Vec::with_capacity(rows.len());
            for k in rows {
                if k.release != ReleasePolicy::Auto {
                    // Not kept by the host: released at each start.
                    keys.push(SealedKey {
                        volume_id: k.volume_id,
                        generation: k.generation,
                        sealed: vec![],
                    });
                    continue;
                }
                let packet = self.release(tx, &k.volume_id, k.format, k.generation, host, &why)?;
                keys.push(seal_for(&packet, host).map_err(CoreError::Internal)?);
            }
            Ok(keys)
        })
    }

    /// Records a confirmed guest push and the state the host reported.
    pub(crate) fn guest_push_succeeded(
        &self,
        g: &GuestInfo,
        host_state: Option<GuestState>,
    ) -> Result<(), CoreError> {
        let Some(op) = g.pending else { return Ok(()) };
        let state = match (op, host_state) {
            (GuestOp::Undefine, _) => GuestState::Undefined,
            (_, None) => GuestState::Defined,
            (_, Some(s)) => s,
        };
        let action = match op {
            GuestOp::Define => "key.pushed",
            GuestOp::Undefine => "guest.undefined",
            GuestOp::Start => "guest.started",
            GuestOp::Stop => "guest.stopped",
        };
        self.write(|tx| {
            if changed_meanwhile(tx, g)? {
                return Ok(());
            }
            tx.guest_op_done(&g.uuid, op, state)?;
            self.log(
                tx,
                "server",
                action,
                &g.uuid,
                &format!("guest {} on host {}: {state}", g.name, g.host),
            )?;
            Ok(())
        })
    }

    /// Records a failed guest push: retried with backoff, or given up
    /// after `retry.max_attempts` lasting failures.
    pub(crate) fn guest_push_failed(
        &self,
        g: &GuestInfo,
        e: &PushFailure,
    ) -> Result<(), CoreError> {
        let next = now_unix_ms() + self.retry_delay_ms(g.attempts) as i64;
        let failures = g.failures + 1;
        self.write(|tx| {
            if changed_meanwhile(tx, g)? {
                return Ok(());
            }
            let counts = matches!(e.kind, FailureKind::Declined | FailureKind::Lasting);
            let (Some(op), true) = (g.pending, counts && failures >= self.retry.max_attempts)
            else {
                tx.guest_attempt_failed(&g.uuid, &e.message, next, counts)?;
                return Ok(());
            };
            let why = format!(
                "{op} gave up after {failures} failed attempts: {}",
                e.message
            );
            // A guest whose definition never succeeded: the host has
            // nothing of it.
            let never_defined = op == GuestOp::Define && g.state == GuestState::PendingDefine;
            tx.guest_attempt_failed(&g.uuid, &e.message, next, true)?;
            tx.settle_guest(&g.uuid, never_defined.then_some(GuestState::Failed), &why)?;
            self.log(
                tx,
                "server",
                "guest.failed",
                &g.uuid,
                &format!("guest {} on host {}: {why}", g.name, g.host),
            )?;
            Ok(())
        })
    }
}

/// Whether the guest's request changed while its push was under way (the
/// admin asked for something else): the old push's outcome is then not
/// recorded, and the next push works from the new request.
fn changed_meanwhile(tx: &mut dyn Tx, g: &GuestInfo) -> Result<bool, CoreError> {
    let now = tx.guest(&g.uuid)?;
    // Its state is not compared: the host reports it (a started guest
    // runs) while the push is under way.
    let changed = now.as_ref().is_none_or(|n| {
        (
            n.pending,
            n.attempts,
            n.host.as_str(),
            n.domain_xml.as_str(),
        ) != (
            g.pending,
            g.attempts,
            g.host.as_str(),
            g.domain_xml.as_str(),
        )
    });
    if changed {
        tracing::info!(guest = %g.uuid, "a push outcome is stale: the guest changed meanwhile");
    }
    Ok(changed)
}
