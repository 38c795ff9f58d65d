//! Leadership among server replicas on one database.
//!
//! Every replica serves the admin and host APIs; exactly one, the leader,
//! runs the work that must not run twice (the scheduler: pending pushes,
//! rotation policies, the resumption of migrations). Leadership is a lease
//! in the database ([`crate::store::LeaseStore`]): taken when the last one
//! lapsed by the database's clock, renewed well inside its lifetime, and
//! given up locally before it can lapse (a leader whose renewals fail
//! stops leading at `renewed + lease - margin` by its own clock, before
//! any other replica may take over). Each new holder gets a fence number
//! one above the last.
//!
//! Fencing: work done as leader runs inside [`as_leader`], and every write
//! transaction begun there checks, first and under the write lock, that
//! this replica still holds the lease with its fence number
//! ([`FencedStore`]). A leader that stalled past its lease (SIGSTOP, a
//! hung thread, a lost network) and wakes after another took over makes no
//! write: its transaction fails with [`StoreError::Fenced`]. The check and
//! the take-over are both write transactions, which the store runs one
//! after the other, so no write of the old leader can land after the new
//! one's take-over. On PostgreSQL a replica that stalls inside a
//! transaction loses its session (`idle_in_transaction_session_timeout`),
//! and with it the write lock.
//!
//! On SQLite one process owns the data directory (its lock file), so the
//! lease is taken at once at start (`exclusive`).

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::domain::Core;
use crate::model::{CoreError, StoreError};
use crate::store::{Access, Lease, Replica, Store, Tx};

/// A replica not heard of for this many lease lifetimes is forgotten (it
/// was killed, or its machine is gone); `status` shows it until then.
const FORGET_AFTER_LEASES: i64 = 6;

/// The lease a leader holds: who and its fence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The replica's id.
    pub holder: Arc<str>,
    /// Its fence number.
    pub number: u64,
}

tokio::task_local! {
    static AS_LEADER: Fence;
}

thread_local! {
    static ON_THREAD: RefCell<Option<Fence>> = const { RefCell::new(None) };
}

/// The fence of the work running here, if it runs as leader.
pub fn current() -> Option<Fence> {
    AS_LEADER
        .try_with(Clone::clone)
        .ok()
        .or_else(|| ON_THREAD.with(|f| f.borrow().clone()))
}

/// Runs `f` on this thread with `fence` as its leader context (a blocking
/// task started from leader work).
pub(crate) fn on_thread<T>(fence: Option<Fence>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Fence>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0.take();
            ON_THREAD.with(|f| *f.borrow_mut() = old);
        }
    }
    let old = ON_THREAD.with(|f| std::mem::replace(&mut *f.borrow_mut(), fence));
    let _restore = Restore(old);
    f()
}

/// Runs `f` as leader holding `fence`: its writes check the fence.
pub async fn as_leader<F: Future>(fence: Fence, f: F) -> F::Output {
    AS_LEADER.scope(fence, f).await
}

/// `f`, run with the leader context it is created in: for tasks spawned
/// from leader work (a spawned task does not inherit a task-local).
pub(crate) fn inherit<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let fence = current();
    async move {
        match fence {
            Some(fence) => AS_LEADER.scope(fence, f).await,
            None => f.await,
        }
    }
}

/// A store whose write transactions begun as leader check the fence first.
pub struct FencedStore(pub Arc<dyn Store>);

impl Store for FencedStore {
    fn begin(&self, access: Access) -> Result<Box<dyn Tx + '_>, StoreError> {
        let mut tx = self.0.begin(access)?;
        if access == Access::Write {
            if let Some(f) = current() {
                if !tx.holds_lease(&f.holder, f.number)? {
                    return Err(StoreError::Fenced(format!(
                        "replica {} with fence {}",
                        f.holder, f.number
                    )));
                }
            }
        }
        Ok(tx)
    }

    fn stats(&self) -> crate::store::StoreStats {
        self.0.stats()
    }
}

/// How long a lease lasts and how often it is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// Lifetime of a lease from its last renewal.
    pub lease: Duration,
    /// Time between renewals (well inside `lease`).
    pub renew: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            renew: Duration::from_secs(2),
        }
    }
}

impl LeaseTimes {
    /// How long before the lease lapses a leader stops leading by its own
    /// clock (clocks of replicas run at nearly the same rate; this covers
    /// the time a renewal takes to reach the database).
    pub fn margin(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(200))
    }
}

/// This process as a replica, set by the server at start
/// ([`Core::set_replica`]).
#[derive(Debug, Clone)]
pub struct Me {
    /// Its replica id.
    pub id: String,
    /// A replica not seen for this long is dead (the lease's lifetime).
    pub alive_within: Duration,
    /// The only process of its database (SQLite): any other is dead.
    pub exclusive: bool,
    /// Its database as shown to people (no password).
    pub database: String,
}

/// What a lease round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// This replica leads with this fence (taken now, or renewed).
    Leads {
        /// The fence.
        fence: u64,
        /// Taken in this round (a new leader).
        taken: bool,
    },
    /// Another replica leads.
    Follows(Lease),
}

impl Core {
    /// Names this process as a replica (once, at start).
    pub fn set_replica(&self, me: Me) {
        let _ = self.me.set(me);
    }

    /// This replica's id ("" when none was set: tests, tools).
    pub(crate) fn replica_id(&self) -> &str {
        self.me.get().map_or("", |m| m.id.as_str())
    }

    /// The live replica other than this one that drives migration `m`, if
    /// one does: the others leave that migration alone.
    pub(crate) fn other_driver(
        &self,
        tx: &mut dyn Tx,
        m: &crate::store::MigrationRecord,
    ) -> Result<Option<Replica>, CoreError> {
        let Some(me) = self.me.get() else {
            return Ok(None);
        };
        if m.driver.is_empty() || m.driver == me.id || me.exclusive {
            return Ok(None);
        }
        let now = tx.db_now_ms()?;
        let alive = i64::try_from(me.alive_within.as_millis()).unwrap_or(i64::MAX);
        Ok(tx
            .replicas()?
            .into_iter()
            .find(|r| r.id == m.driver && r.seen_ms > now.saturating_sub(alive)))
    }

    /// One lease round of replica `me`: takes the lease if it lapsed (or
    /// `exclusive`), renews it if this replica holds it, and records the
    /// replica as alive. A take-over is audited (unless `exclusive`).
    pub fn lease_round(
        &self,
        me: &Replica,
        times: LeaseTimes,
        exclusive: bool,
    ) -> Result<Round, CoreError> {
        self.write(|tx| {
            let now = tx.db_now_ms()?;
            let lease_ms = i64::try_from(times.lease.as_millis()).unwrap_or(i64::MAX);
            let round = match tx.lease()? {
                Some(l) if l.holder == me.id && l.expires_ms > now => {
                    // The leader forgets replicas silent for many leases.
                    tx.prune_replicas(
                        now.saturating_sub(lease_ms.saturating_mul(FORGET_AFTER_LEASES)),
                    )?;
                    tx.put_lease(&Lease {
                        expires_ms: now.saturating_add(lease_ms),
                        ..l.clone()
                    })?;
                    Round::Leads {
                        fence: l.fence,
                        taken: false,
                    }
                }
                Some(l) if l.expires_ms > now && !exclusive => Round::Follows(l),
                old => {
                    let fence = old.as_ref().map_or(1, |l| l.fence + 1);
                    tx.put_lease(&Lease {
                        holder: me.id.clone(),
                        fence,
                        since_ms: now,
                        expires_ms: now.saturating_add(lease_ms),
                    })?;
                    let from = old.map_or_else(
                        || "no leader before".to_owned(),
                        |l| format!("after replica {} (fence {})", l.holder, l.fence),
                    );
                    // Among replicas a take-over is audited; the only
                    // process of a SQLite data directory just started.
                    if !exclusive {
                        self.log(
                            tx,
                            &format!("replica:{}", me.id),
                            "replica.leads",
                            &me.id,
                            &format!(
                                "fence {fence}, lease {} ms, {from}; on {} ({}, pid {})",
                                lease_ms, me.host, me.address, me.pid
                            ),
                        )?;
                    }
                    Round::Leads { fence, taken: true }
                }
            };
            tx.put_replica(&Replica {
                seen_ms: now,
                started_ms: if me.started_ms == 0 {
                    now
                } else {
                    me.started_ms
                },
                ..me.clone()
            })?;
            Ok(round)
        })
    }

    /// Gives the lease up (a clean stop: another replica may take over at
    /// once) and forgets the replica.
    pub fn leave(&self, me: &Replica, fence: Option<u64>) -> Result<(), CoreError> {
        self.write(|tx| {
            if let Some(fence) = fence {
                if let Some(l) = tx.lease()? {
                    if l.holder == me.id && l.fence == fence {
                        let now = tx.db_now_ms()?;
                        tx.put_lease(&Lease {
                            expires_ms: now,
                            ..l
                        })?;
                    }
                }
            }
            tx.remove_replica(&me.id)?;
            Ok(())
        })
    }

    /// The URLs hosts reach the replicas at (`url` of each replica's
    /// config), oldest replica first, for the hosts' lists of replicas:
    /// none on SQLite, where one server process serves at the URL each host
    /// enrolled with.
    pub fn replica_urls(&self) -> Result<Vec<String>, CoreError> {
        if self.me.get().is_none_or(|m| m.exclusive) {
            return Ok(vec![]);
        }
        let mut urls: Vec<String> = Vec::new();
        for r in self.read(|tx| Ok(tx.replicas()?))? {
            if !r.url.is_empty() && !urls.contains(&r.url) {
                urls.push(r.url);
            }
        }
        Ok(urls)
    }

    /// This replica's database as shown to people (no password).
    pub fn database_shown(&self) -> String {
        self.me
            .get()
            .map_or_else(|| "(not named)".to_owned(), |m| m.database.clone())
    }

    /// The lease and the replicas (for `status`).
    pub fn replicas(&self) -> Result<(Option<Lease>, Vec<Replica>, i64), CoreError> {
        self.read(|tx| Ok((tx.lease()?, tx.replicas()?, tx.db_now_ms()?)))
    }
}

/// Keeps replica `me`'s lease until `shutdown`: publishes this replica's
/// fence on `leading` while it leads, `None` while it does not. On
/// shutdown the lease is given up.
pub async fn keep_lease(
    core: Arc<Core>,
    me: Replica,
    times: LeaseTimes,
    exclusive: bool,
    leading: tokio::sync::watch::Sender<Option<Fence>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let holder: Arc<str> = Arc::from(me.id.as_str());
    // Until when this replica may act as leader by its own clock.
    let mut valid_until: Option<Instant> = None;
    let mut exclusive = exclusive;
    loop {
        let started = Instant::now();
        let who = me.clone();
        let r = core
            .blocking(move |c| c.lease_round(&who, times, exclusive))
            .await;
        match r {
            Ok(Round::Leads { fence, taken }) => {
                valid_until = Some(started + times.lease.saturating_sub(times.margin()));
                if taken {
                    tracing::info!(fence, replica = %me.id, "this replica leads");
                }
                let f = Fence {
                    holder: holder.clone(),
                    number: fence,
                };
                leading.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&f);
                    *cur = Some(f.clone());
                    changed
                });
            }
            Ok(Round::Follows(l)) => {
                valid_until = None;
                if leading.borrow().is_some() {
                    tracing::warn!(leader = %l.holder, fence = l.fence, "another replica leads now");
                }
                leading.send_if_modified(|cur| cur.take().is_some());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew or take the lease");
            }
        }
        // Exclusive only counts at start (a restart of the same data
        // directory); afterwards the lease is kept like any other.
        exclusive = false;
        let next = started + times.renew;
        let wake = match valid_until {
            Some(v) if v < next => v,
            _ => next,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown.changed() => break,
        }
        if let Some(v) = valid_until {
            if Instant::now() >= v {
                // Not renewed in time: stop before the lease can lapse.
                tracing::warn!("the lease was not renewed in time: this replica stops leading");
                valid_until = None;
                leading.send_if_modified(|cur| cur.take().is_some());
            }
        }
    }
    let fence = leading.borrow().as_ref().map(|f| f.number);
    leading.send_if_modified(|cur| cur.take().is_some());
    let who = me.clone();
    if let Err(e) = core.blocking(move |c| c.leave(&who, fence)).await {
        tracing::warn!(error = %e, "cannot give up the lease");
    }
}
