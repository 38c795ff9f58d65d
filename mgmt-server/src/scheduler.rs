//! The scheduler: the server's own loop. It delivers pending volume and
//! guest operations to hosts ([`crate::domain::push`]), applies rotation
//! policies every second ([`Core::apply_policies`]), resumes migrations a
//! stopped server left unfinished every five seconds, writes audit
//! checkpoints while the log grows, and records the refusals it only
//! counted ([`crate::domain::refusals`]); when it stops, a last checkpoint
//! and the refusals counted so far. With several server replicas
//! (PostgreSQL) only the leader does this work, each write of it checking
//! the leader's fence (see `domain::leader`); the others keep only their
//! own audit housekeeping.
//!
//! May import: `domain` and `model`. Started by `transport::server`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::domain::Core;
use crate::domain::leader::{Fence, as_leader};
use crate::model::Caller;

/// How long the loop sleeps when nothing is due (an operation queued
/// meanwhile wakes it at once).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How often the rotation scheduler looks for keys past their policy's age.
const POLICY_ROUND: Duration = Duration::from_secs(1);
/// How often unfinished migrations (left by a stopped server) are resumed.
const MIGRATION_ROUND: Duration = Duration::from_secs(5);

/// Runs until `shutdown` fires; does the leader's work while `leading`
/// holds this replica's fence, and only its own audit housekeeping while
/// another replica leads.
pub async fn run(
    core: Arc<Core>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    leading: tokio::sync::watch::Receiver<Option<Fence>>,
) {
    rounds(&core, shutdown, leading).await;
    let last = core
        .blocking(|c| {
            c.flush_refusals(true)?;
            c.checkpoint_audit(true)
        })
        .await;
    if let Err(e) = last {
        tracing::error!(error = %e, "cannot write the last audit checkpoint");
    }
}

/// Housekeeping of the audit log: a checkpoint if due, counted refusals of
/// a window that ended.
async fn audit_round(core: &Arc<Core>) {
    let r = core
        .blocking(|c| {
            c.flush_refusals(false)?;
            c.checkpoint_audit(false)
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "audit checkpoint not written");
    }
}

/// What a leader's round leaves to do.
enum Step {
    /// Shut down.
    Stop,
    /// More may be due right away: no idle wait between full batches.
    Again,
    /// Nothing more now: wait for work, a round's time, or a change.
    Idle,
}

/// When the leader's periodic work last ran (reset when leadership is lost,
/// so a new leader does it at once).
#[derive(Default)]
struct Rounds {
    policy: Option<Instant>,
    migration: Option<Instant>,
}

async fn rounds(
    core: &Arc<Core>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut leading: tokio::sync::watch::Receiver<Option<Fence>>,
) {
    let mut last = Rounds::default();
    loop {
        let fence = leading.borrow().clone();
        let Some(fence) = fence else {
            // Another replica leads: only this one's audit housekeeping.
            last = Rounds::default();
            audit_round(core).await;
            tokio::select! {
                r = leading.changed() => {
                    if r.is_err() {
                        tokio::time::sleep(POLICY_ROUND).await;
                    }
                }
                _ = tokio::time::sleep(POLICY_ROUND) => {}
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let step = as_leader(
            fence.clone(),
            leader_round(core, &shutdown, &mut last, fence),
        )
        .await;
        match step {
            Step::Stop => return,
            Step::Again => {}
            Step::Idle => {
                tokio::select! {
                    _ = core.queued().notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = leading.changed() => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// One round of the leader's work (run as leader: its writes check the
/// fence).
async fn leader_round(
    core: &Arc<Core>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
    last: &mut Rounds,
    fence: Fence,
) -> Step {
    let due = |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
    if due(last.migration, MIGRATION_ROUND) {
        last.migration = Some(Instant::now());
        resume_migrations(core, fence).await;
    }
    if due(last.policy, POLICY_ROUND) {
        last.policy = Some(Instant::now());
        audit_round(core).await;
        match core.blocking(|c| c.apply_policies()).await {
            Ok(v) if !v.is_empty() => {
                tracing::info!(volumes = v.len(), "scheduled rekeys started")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "rotation policies not applied"),
        }
    }
    let busy = match core.push_volumes().await {
        Ok(n) => n > 0,
        Err(e) => {
            tracing::error!(error = %e, "cannot process pending volume operations");
            false
        }
    };
    if *shutdown.borrow() {
        return Step::Stop;
    }
    let stop = shutdown.clone();
    if let Err(e) = core.push_guests(move || *stop.borrow()).await {
        tracing::error!(error = %e, "cannot process pending guest operations");
    }
    if *shutdown.borrow() {
        return Step::Stop;
    }
    if busy { Step::Again } else { Step::Idle }
}

/// Resumes the migrations a stopped server left unfinished, each in its
/// own task (a migration may take hours).
async fn resume_migrations(core: &Arc<Core>, fence: Fence) {
    let left = match core.blocking(|c| c.unfinished_migrations()).await {
        Ok(left) => left,
        Err(e) => {
            tracing::error!(error = %e, "cannot read unfinished migrations");
            return;
        }
    };
    for (guest, to) in left {
        tracing::info!(%guest, %to, "resuming an unfinished migration");
        let c = core.clone();
        tokio::spawn(as_leader(fence.clone(), async move {
            let r = c
                .migrate_guest(Caller::Scheduler, guest.clone(), to, false, false)
                .await;
            if let Err(e) = r {
                tracing::warn!(%guest, error = %e, "resumed migration not finished; will retry");
            }
        }));
    }
}
