//! Leadership among replicas on one store: one leads, a stalled leader's
//! writes are fenced off once another took over, a clean stop hands over
//! at once. (Two replica processes on PostgreSQL, killed and stopped, are
//! in `tests/tests/replicas.rs`.)

use std::sync::Arc;
use std::time::Duration;

use super::Bed;
use crate::domain::leader::{self, Fence, LeaseTimes, Round};
use crate::store::Replica;

fn replica(id: &str) -> Replica {
    Replica {
        id: id.into(),
        address: format!("{id}:7443"),
        host: "test".into(),
        pid: 1,
        version: "test".into(),
        started_ms: 0,
        seen_ms: 0,
    }
}

const TIMES: LeaseTimes = LeaseTimes {
    lease: Duration::from_millis(400),
    renew: Duration::from_millis(100),
};

fn fence(holder: &str, number: u64) -> Option<Fence> {
    Some(Fence {
        holder: Arc::from(holder),
        number,
    })
}

#[test]
fn one_replica_leads_and_a_stalled_leader_writes_nothing_once_another_took_over() {
    let b = Bed::new();
    let (ra, rb) = (replica("a"), replica("b"));
    assert_eq!(
        b.core.lease_round(&ra, TIMES, false).unwrap(),
        Round::Leads {
            fence: 1,
            taken: true
        }
    );
    match b.core.lease_round(&rb, TIMES, false).unwrap() {
        Round::Follows(l) => assert_eq!((l.holder.as_str(), l.fence), ("a", 1)),
        r => panic!("b should follow: {r:?}"),
    }
    // A renewal keeps the fence.
    assert_eq!(
        b.core.lease_round(&ra, TIMES, false).unwrap(),
        Round::Leads {
            fence: 1,
            taken: false
        }
    );
    // Writes as leader a pass while it holds the lease.
    leader::on_thread(fence("a", 1), || {
        b.core.add_host(&b.admin, "kvm-1", "kvm-1:7444").unwrap()
    });

    // a stalls past its lease; b takes over with the next fence.
    std::thread::sleep(TIMES.lease + Duration::from_millis(100));
    assert_eq!(
        b.core.lease_round(&rb, TIMES, false).unwrap(),
        Round::Leads {
            fence: 2,
            taken: true
        }
    );
    let before = b.snapshot();
    let e = leader::on_thread(fence("a", 1), || {
        b.core.add_host(&b.admin, "kvm-2", "kvm-2:7444")
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("this replica no longer leads") && e.to_string().contains("fence 1"),
        "{e}"
    );
    assert_eq!(b.snapshot(), before, "the fenced write changed nothing");
    // a learns it follows; b's writes pass.
    assert!(matches!(
        b.core.lease_round(&ra, TIMES, false).unwrap(),
        Round::Follows(_)
    ));
    leader::on_thread(fence("b", 2), || {
        b.core.add_host(&b.admin, "kvm-2", "kvm-2:7444").unwrap()
    });
    // Writes outside leader work (API requests) pass on any replica.
    b.core.add_host(&b.admin, "kvm-3", "kvm-3:7444").unwrap();

    // A clean stop hands over at once, and the replica is forgotten.
    b.core.leave(&rb, Some(2)).unwrap();
    assert_eq!(
        b.core.lease_round(&ra, TIMES, false).unwrap(),
        Round::Leads {
            fence: 3,
            taken: true
        }
    );
    let (lease, replicas, _) = b.core.replicas().unwrap();
    assert_eq!(lease.map(|l| (l.holder, l.fence)), Some(("a".into(), 3)));
    assert_eq!(
        replicas.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    let leads = b.actions().iter().filter(|a| *a == "replica.leads").count();
    assert_eq!(leads, 3, "every take-over is audited");
}

#[test]
fn the_only_process_of_a_data_directory_takes_the_lease_at_once() {
    let b = Bed::new();
    b.core
        .lease_round(&replica("old"), LeaseTimes::default(), false)
        .unwrap();
    // The old process was killed; its lease has not lapsed. On SQLite the
    // data directory's lock says no other process runs: taken at once.
    assert_eq!(
        b.core
            .lease_round(&replica("new"), LeaseTimes::default(), true)
            .unwrap(),
        Round::Leads {
            fence: 2,
            taken: true
        }
    );
}
