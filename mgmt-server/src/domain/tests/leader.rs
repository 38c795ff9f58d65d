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
        url: format!("https://{id}.example:7443"),
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

#[tokio::test]
async fn a_migration_another_live_replica_drives_is_left_to_it_and_taken_over_once_it_is_gone() {
    use crate::domain::AgentErrorKind;
    use crate::domain::leader::Me;
    use crate::model::Caller;
    use crate::store::{Access, Store};

    let b = Bed::new();
    b.core.set_replica(Me {
        id: "a".into(),
        alive_within: TIMES.lease,
        exclusive: false,
        database: "test".into(),
    });
    b.host("kvm-a");
    b.host("kvm-b");
    b.volume("kvm-a", "disk").await;
    let uuid = b.guest("kvm-a", "g1", &["disk"]).await.uuid;
    // The outcome is lost: the migration stays in the journal, driven by a.
    b.agents
        .fail_next("kvm-a", "migrate_guest", AgentErrorKind::Failed);
    b.agents
        .place_guest("kvm-b", &uuid, crate::model::GuestState::Running);
    b.core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), true, false)
        .await
        .unwrap_err();
    let driver = |b: &Bed| {
        let mut tx = b.store.begin(Access::Read).unwrap();
        tx.migration(&uuid).unwrap().unwrap().driver
    };
    assert_eq!(driver(&b), "a");

    // Replica c, alive, drives it now: a leaves it alone.
    {
        let mut tx = b.store.begin(Access::Write).unwrap();
        tx.set_migration_driver(&uuid, "c").unwrap();
        tx.commit().unwrap();
    }
    b.core.lease_round(&replica("c"), TIMES, false).unwrap();
    assert!(b.core.unfinished_migrations().unwrap().is_empty());
    let e = b
        .core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), true, false)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("is driven by server replica c")
            && e.to_string().contains("which runs"),
        "{e}"
    );
    assert_eq!(driver(&b), "c");

    // c stops renewing (killed): after a lease a resumes and finishes it.
    std::thread::sleep(TIMES.lease + Duration::from_millis(100));
    assert_eq!(
        b.core.unfinished_migrations().unwrap(),
        [(uuid.clone(), "kvm-b".to_owned())]
    );
    let g = b
        .core
        .migrate_guest(
            Caller::Scheduler,
            uuid.clone(),
            "kvm-b".into(),
            false,
            false,
        )
        .await
        .unwrap();
    assert_eq!(g.host, "kvm-b");
    assert!(b.core.unfinished_migrations().unwrap().is_empty());
}

#[tokio::test]
async fn tasks_spawned_from_leader_work_stay_leader_work_and_their_writes_are_fenced() {
    let b = Bed::new();
    let f = fence("a", 1).unwrap();
    let (inherited, bare) = leader::as_leader(f.clone(), async {
        let inherited = tokio::spawn(leader::inherit(async { leader::current() }));
        let bare = tokio::spawn(async { leader::current() });
        (inherited.await.unwrap(), bare.await.unwrap())
    })
    .await;
    assert_eq!(inherited, Some(f.clone()));
    assert_eq!(bare, None, "a plain spawn loses the context");
    // Such a task's store writes check the fence: a holds no lease here.
    let core = b.core.clone();
    let admin = b.admin.clone();
    let e = leader::as_leader(f, async move {
        tokio::spawn(leader::inherit(async move {
            core.blocking(move |c| c.add_host(&admin, "kvm-9", "kvm-9:7444").map(|_| ()))
                .await
        }))
        .await
        .unwrap()
    })
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no longer leads"), "{e}");
}

#[test]
fn hosts_are_given_the_urls_of_the_replicas_that_name_one_and_none_on_sqlite() {
    use crate::domain::leader::Me;
    let b = Bed::new();
    // Before the server named itself (tools, tests): nothing to give.
    assert!(b.core.replica_urls().unwrap().is_empty());
    b.core.set_replica(Me {
        id: "a".into(),
        alive_within: TIMES.lease,
        exclusive: false,
        database: "test".into(),
    });
    let unnamed = Replica {
        url: String::new(),
        ..replica("c")
    };
    for r in [replica("a"), replica("b"), unnamed, replica("a")] {
        b.core.lease_round(&r, TIMES, false).unwrap();
    }
    assert_eq!(
        b.core.replica_urls().unwrap(),
        ["https://a.example:7443", "https://b.example:7443"],
        "oldest first, once each, only replicas that name a URL"
    );
    // A replica that stopped is left out.
    b.core.leave(&replica("b"), None).unwrap();
    assert_eq!(b.core.replica_urls().unwrap(), ["https://a.example:7443"]);

    // The only process of its database (SQLite) gives no list.
    let one = Bed::new();
    one.core.set_replica(Me {
        id: "a".into(),
        alive_within: TIMES.lease,
        exclusive: true,
        database: "test".into(),
    });
    one.core.lease_round(&replica("a"), TIMES, true).unwrap();
    assert!(one.core.replica_urls().unwrap().is_empty());
}
