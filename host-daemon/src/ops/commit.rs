//! Volume creations in parallel. The server pushes a batch of new volumes
//! at once; each one's image (LUKS header, QEMU's open with the key, sync)
//! is made outside the daemon's lock, a few at a time, and the volumes
//! made meanwhile enter the registry together (group commit): one registry
//! write, one managed-list write and one refresh of each pool for all of
//! them, instead of one each (each of which reads or scans everything the
//! host holds).
//!
//! A volume id is worked on by one operation at a time ([`Creations::claim`]):
//! a repeated request waits for the first, and a delete or decrypt of a
//! volume whose creation runs waits until it is in the registry.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::model::VolumeEntry;

/// Images made at once: enough to keep the cores and the disk busy while
/// one waits for a sync, few enough that a batch of hundreds does not
/// start hundreds of qemu-img processes.
fn image_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 4)
}

/// The coordination of parallel creations (see the module's text).
pub(super) struct Creations {
    state: Mutex<State>,
    changed: Condvar,
    slots: usize,
}

#[derive(Default)]
struct State {
    /// Volume ids an operation works on.
    busy: HashSet<String>,
    /// Images being made.
    making: usize,
    /// Volumes made, waiting for the registry, by ticket.
    queue: Vec<(u64, VolumeEntry)>,
    next_ticket: u64,
    /// Whether a waiter is writing a group now.
    committing: bool,
    /// Outcomes of tickets whose group was written (or failed), taken by
    /// their waiters.
    outcomes: HashMap<u64, Result<(), String>>,
}

/// A volume id claimed: released on drop.
pub(super) struct Claimed<'a> {
    of: &'a Creations,
    id: String,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.of.state().busy.remove(&self.id);
        self.of.changed.notify_all();
    }
}

/// An image slot: released on drop.
pub(super) struct Slot<'a>(&'a Creations);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.state().making -= 1;
        self.0.changed.notify_all();
    }
}

impl Creations {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            slots: image_slots(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no other operation works on volume `id`, and claims it.
    pub(super) fn claim(&self, id: &str) -> Claimed<'_> {
        let mut g = self.state();
        while g.busy.contains(id) {
            g = self.wait(g);
        }
        g.busy.insert(id.to_owned());
        Claimed {
            of: self,
            id: id.to_owned(),
        }
    }

    /// Waits for a free image slot.
    pub(super) fn slot(&self) -> Slot<'_> {
        let mut g = self.state();
        while g.making >= self.slots {
            g = self.wait(g);
        }
        g.making += 1;
        Slot(self)
    }

    /// Puts `entry` in the registry with the others made meanwhile: the
    /// first waiter finding no group being written writes all that wait
    /// (`write` is its registry update, run with the daemon's lock taken
    /// by it); the others wait for the outcome of the group that holds
    /// theirs.
    pub(super) fn commit(
        &self,
        entry: VolumeEntry,
        write: &dyn Fn(&[VolumeEntry]) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut g = self.state();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.queue.push((ticket, entry));
        loop {
            if let Some(outcome) = g.outcomes.remove(&ticket) {
                return outcome;
            }
            if g.committing {
                g = self.wait(g);
                continue;
            }
            g.committing = true;
            let (tickets, entries): (Vec<u64>, Vec<VolumeEntry>) =
                std::mem::take(&mut g.queue).into_iter().unzip();
            drop(g);
            // A panic in `write` must not leave the others waiting forever.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&entries)))
                    .unwrap_or_else(|_| Err("the registry write panicked".to_owned()));
            g = self.state();
            g.committing = false;
            for t in tickets {
                g.outcomes.insert(t, outcome.clone());
            }
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn entry(i: usize) -> VolumeEntry {
        VolumeEntry {
            volume_id: format!("v{i}"),
            name: format!("n{i}"),
            pool: "p".into(),
            path: format!("/p/n{i}"),
            secret_uuid: format!("s{i}"),
        }
    }

    #[test]
    fn concurrent_commits_are_grouped_and_each_written_once() {
        let c = Arc::new(Creations::new());
        let written = Arc::new(Mutex::new(Vec::<String>::new()));
        let writes = Arc::new(AtomicUsize::new(0));
        let n = 64;
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (c, written, writes) = (c.clone(), written.clone(), writes.clone());
                std::thread::spawn(move || {
                    c.commit(entry(i), &|group| {
                        writes.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that others queue behind it.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        written
                            .lock()
                            .unwrap()
                            .extend(group.iter().map(|e| e.volume_id.clone()));
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let mut got = written.lock().unwrap().clone();
        got.sort();
        let mut want: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
        want.sort();
        assert_eq!(got, want, "every entry written exactly once");
        assert!(writes.load(Ordering::SeqCst) < n, "no grouping happened");
        assert!(c.state().outcomes.is_empty() && c.state().queue.is_empty());
    }

    #[test]
    fn a_failed_group_fails_each_of_its_waiters_and_the_next_group_goes_on() {
        let c = Creations::new();
        let e = c
            .commit(entry(1), &|_| Err("disk full".into()))
            .unwrap_err();
        assert_eq!(e, "disk full");
        c.commit(entry(2), &|g| {
            assert_eq!(g.len(), 1, "the failed entry is not written again");
            Ok(())
        })
        .unwrap();
        let e = c.commit(entry(3), &|_| panic!("boom")).unwrap_err();
        assert!(e.contains("panicked"), "{e}");
        assert!(!c.state().committing);
    }

    #[test]
    fn a_claimed_volume_waits_for_its_release_and_slots_are_bounded() {
        let c = Arc::new(Creations::new());
        let first = c.claim("v");
        let (c2, order) = (c.clone(), Arc::new(Mutex::new(vec![])));
        let o2 = order.clone();
        let t = std::thread::spawn(move || {
            let _second = c2.claim("v");
            o2.lock().unwrap().push("second");
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        order.lock().unwrap().push("first done");
        drop(first);
        t.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["first done", "second"]);
        let slots: Vec<_> = (0..c.slots).map(|_| c.slot()).collect();
        assert_eq!(c.state().making, c.slots);
        drop(slots);
        assert_eq!(c.state().making, 0);
    }
}
