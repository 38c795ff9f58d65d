//! Migration: success, an unreachable destination, a refusing source, an
//! unknown outcome finished by the resumption.

use super::Bed;
use crate::domain::AgentErrorKind;
use crate::domain::fake_agent::Call;
use crate::model::{Caller, GuestState, VolumeState};

async fn two_hosts_and_a_guest() -> (Bed, String, String) {
    let b = Bed::new();
    b.host("kvm-a");
    b.host("kvm-b");
    let v = b.volume("kvm-a", "disk").await;
    let g = b.guest("kvm-a", "g1", &["disk"]).await;
    (b, g.uuid, v.id)
}

#[tokio::test]
async fn a_guest_moves_with_its_keys_and_its_volumes_get_a_deep_rekey() {
    let (b, uuid, vol) = two_hosts_and_a_guest().await;
    let g = b
        .core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), true, false)
        .await
        .unwrap();
    assert_eq!((g.host.as_str(), g.state), ("kvm-b", GuestState::ShutOff));
    assert_eq!(g.migrating_to, None);
    // The destination got the key sealed to itself, the source lost it.
    assert!(b.agents.calls("kvm-b").contains(&Call::Prepare {
        uuid: uuid.clone(),
        keys: vec![(vol.clone(), 1)]
    }));
    assert_eq!(b.agents.guests("kvm-b"), std::slice::from_ref(&uuid));
    assert!(b.agents.keys("kvm-a").is_empty());
    let v = b.core.get_volume("disk").unwrap();
    assert_eq!((v.host.as_str(), v.state), ("kvm-b", VolumeState::Ready));
    assert!(v.rekey_due_unix > 0);
    for a in ["guest.migrate-requested", "guest.migrated", "key.erased"] {
        assert!(b.actions().iter().any(|x| x == a), "{a}");
    }
    // The scheduler starts the deep rekey on the destination at once.
    assert_eq!(b.core.apply_policies().unwrap(), std::slice::from_ref(&vol));
    let v = b.core.get_volume("disk").unwrap();
    assert_eq!(v.state, VolumeState::Rekeying);
    assert_eq!(v.rekey.unwrap().kind, crate::model::RekeyKind::Deep);
    b.push().await;
    assert!(
        b.agents
            .calls("kvm-b")
            .iter()
            .any(|c| matches!(c, Call::Rekey { .. }))
    );
    assert_eq!(b.core.get_volume("disk").unwrap().rekey_due_unix, 0);
}

#[tokio::test]
async fn an_unreachable_destination_undoes_the_migration() {
    let (b, _, _) = two_hosts_and_a_guest().await;
    b.agents.set_down("kvm-b", true);
    let e = b
        .core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), false, false)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("kvm-b") && e.to_string().contains("unreachable"),
        "{e}"
    );
    let g = b.core.get_guest("g1").unwrap();
    assert_eq!(
        (g.host.as_str(), g.migrating_to.as_deref()),
        ("kvm-a", None)
    );
    assert!(g.last_error.contains("kvm-b"), "{g:?}");
    assert_eq!(b.core.get_volume("disk").unwrap().state, VolumeState::Ready);
    assert!(b.core.unfinished_migrations().unwrap().is_empty());
    assert!(b.actions().iter().any(|a| a == "guest.migrate-failed"));
}

#[tokio::test]
async fn a_source_that_refuses_ends_the_migration_and_the_destination_drops_the_keys() {
    let (b, uuid, _) = two_hosts_and_a_guest().await;
    b.agents
        .fail_next("kvm-a", "migrate_guest", AgentErrorKind::Refused);
    let e = b
        .core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), false, false)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("source kvm-a: "), "{e}");
    assert!(b.agents.calls("kvm-b").contains(&Call::Abort { uuid }));
    assert!(
        b.agents.keys("kvm-b").is_empty(),
        "the destination erased what it got"
    );
    let g = b.core.get_guest("g1").unwrap();
    assert_eq!(
        (g.host.as_str(), g.migrating_to.as_deref()),
        ("kvm-a", None)
    );
    assert_eq!(b.core.get_volume("disk").unwrap().state, VolumeState::Ready);
}

#[tokio::test]
async fn an_unknown_outcome_stays_pending_and_the_resumption_finishes_it() {
    let (b, uuid, _) = two_hosts_and_a_guest().await;
    // libvirt moved the guest, but the answer got lost.
    b.agents
        .fail_next("kvm-a", "migrate_guest", AgentErrorKind::Failed);
    b.agents.place_guest("kvm-b", &uuid, GuestState::Running);
    let e = b
        .core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), true, false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("outcome is not known yet"), "{e}");
    let g = b.core.get_guest("g1").unwrap();
    assert_eq!(g.migrating_to.as_deref(), Some("kvm-b"));
    assert_eq!(
        b.core.get_volume("disk").unwrap().state,
        VolumeState::Migrating
    );
    // Nothing else may happen to it meanwhile.
    let e = b.core.delete_volume(&b.admin, "disk").unwrap_err();
    assert!(e.to_string().contains("is migrating with its guest"), "{e}");
    let e = b
        .core
        .guest_action(&b.admin, "g1", crate::model::GuestOp::Stop)
        .unwrap_err();
    assert!(e.to_string().contains("is migrating to host kvm-b"), "{e}");

    // A resumed migration whose destination does not answer is not failed.
    b.agents.set_down("kvm-b", true);
    let left = b.core.unfinished_migrations().unwrap();
    assert_eq!(left, [(uuid.clone(), "kvm-b".to_owned())]);
    let e = b
        .core
        .migrate_guest(
            Caller::Scheduler,
            uuid.clone(),
            "kvm-b".into(),
            false,
            false,
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("stays pending and is retried"),
        "{e}"
    );
    assert_eq!(
        b.core.get_guest("g1").unwrap().migrating_to.as_deref(),
        Some("kvm-b")
    );

    // It answers again: the migration is finished where the guest is.
    b.agents.set_down("kvm-b", false);
    b.agents.place_guest("kvm-a", &uuid, GuestState::Running);
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
    assert_eq!(
        (g.host.as_str(), g.migrating_to.as_deref()),
        ("kvm-b", None)
    );
    assert!(b.core.unfinished_migrations().unwrap().is_empty());
    assert_eq!(b.core.get_volume("disk").unwrap().host, "kvm-b");
}

#[tokio::test]
async fn bad_migrations_are_refused_before_anything_moves() {
    let (b, _, _) = two_hosts_and_a_guest().await;
    b.core.add_host(&b.admin, "kvm-c", "kvm-c:7444").unwrap();
    let before = b.snapshot();
    for (to, want) in [
        ("kvm-a", "already on host kvm-a"),
        ("kvm-zz", "no host named \"kvm-zz\""),
        ("kvm-c", "host kvm-c has not enrolled yet"),
        ("../x", "invalid host name"),
    ] {
        let e = b
            .core
            .migrate_guest(b.admin.clone(), "g1".into(), to.into(), false, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    assert_eq!(b.snapshot(), before);
}
