//! Rekeys: the two-key window, a declined rekey, failures retried with
//! both keys kept; policies.

use super::Bed;
use crate::domain::AgentErrorKind;
use crate::domain::fake_agent::Call;
use crate::model::{CoreError, Policy, PolicyScope, RekeyKind, RekeyPlacement, VolumeState};

#[tokio::test]
async fn a_rekey_holds_two_generations_until_the_host_confirms() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "disk").await;
    let r = b
        .core
        .request_rekey(&b.admin, "disk", RekeyKind::Deep, RekeyPlacement::Any, 0)
        .unwrap();
    assert_eq!(r.state, VolumeState::Rekeying);
    assert_eq!(r.key_generation, 1, "the old generation stays active");
    assert_eq!(b.generations(&v.id), [1, 2]);
    let e = b
        .core
        .request_rekey(&b.admin, "disk", RekeyKind::Shallow, RekeyPlacement::Any, 0)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("is rekeying: a rekey needs it ready"),
        "{e}"
    );

    // The host fails (a crash, a failed copy): both generations stay.
    b.agents.fail_next("kvm-a", "rekey", AgentErrorKind::Failed);
    b.agents
        .fail_next("kvm-a", "rekey", AgentErrorKind::Refused);
    b.push().await;
    b.push().await;
    let r = b.core.get_volume("disk").unwrap();
    assert_eq!((r.state, r.attempts), (VolumeState::Rekeying, 2));
    assert!(r.last_error.contains("scripted rekey failure"), "{r:?}");
    assert_eq!(b.generations(&v.id), [1, 2]);

    // Confirmed: only the new generation is left.
    b.push().await;
    let r = b.core.get_volume("disk").unwrap();
    assert_eq!((r.state, r.key_generation), (VolumeState::Ready, 2));
    assert_eq!(r.last_error, "");
    assert_eq!(b.generations(&v.id), [2]);
    assert!(b.agents.calls("kvm-a").contains(&Call::Rekey {
        volume: v.id.clone(),
        old: 1,
        new: 2
    }));
    let actions = b.actions();
    for a in ["volume.rekey-requested", "key.rotated", "key.destroyed"] {
        assert!(actions.iter().any(|x| x == a), "{a}");
    }
}

#[tokio::test]
async fn a_declined_rekey_drops_the_new_generation_and_says_why() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "disk").await;
    b.core
        .request_rekey(
            &b.admin,
            "disk",
            RekeyKind::Shallow,
            RekeyPlacement::Online,
            0,
        )
        .unwrap();
    b.agents
        .fail_next("kvm-a", "rekey", AgentErrorKind::Declined);
    b.push().await;
    let r = b.core.get_volume("disk").unwrap();
    assert_eq!((r.state, r.key_generation), (VolumeState::Ready, 1));
    assert!(r.last_error.contains("scripted rekey failure"), "{r:?}");
    assert_eq!(b.generations(&v.id), [1]);
    let actions = b.actions();
    assert!(actions.iter().any(|a| a == "volume.rekey-refused"));
    // Ready again: a new rekey may start.
    b.core
        .request_rekey(&b.admin, "disk", RekeyKind::Deep, RekeyPlacement::Any, 0)
        .unwrap();
}

#[tokio::test]
async fn bad_rekey_requests_are_refused_and_change_nothing() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "disk").await;
    let before = b.snapshot();
    for (bandwidth, name, want) in [
        (1, "disk", "invalid bandwidth"),
        (2 << 40, "disk", "invalid bandwidth"),
        (0, "nope", "no volume named or with id \"nope\""),
    ] {
        let e = b
            .core
            .request_rekey(
                &b.admin,
                name,
                RekeyKind::Deep,
                RekeyPlacement::Any,
                bandwidth,
            )
            .unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    assert_eq!(b.snapshot(), before);
}

#[tokio::test]
async fn policies_are_set_resolved_and_removed() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "disk").await;
    let p = b
        .core
        .set_policy(
            &b.admin,
            &Policy {
                scope: PolicyScope::Volume,
                target: "disk".into(),
                max_key_age_secs: 3600,
                mode: RekeyKind::Deep,
                after_migration_secs: 60,
            },
        )
        .unwrap();
    assert_eq!(p.target, v.id, "a volume policy is stored by UUID");
    let pool = Policy {
        scope: PolicyScope::Pool,
        target: "default".into(),
        max_key_age_secs: 7200,
        mode: RekeyKind::Shallow,
        after_migration_secs: 0,
    };
    b.core.set_policy(&b.admin, &pool).unwrap();
    // The volume's own policy wins over its pool's.
    assert_eq!(
        b.core.policy_of(&v.id, "default").unwrap().unwrap().mode,
        RekeyKind::Deep
    );
    assert_eq!(b.core.list_policies().unwrap().len(), 2);
    // Nothing is old enough yet.
    assert!(b.core.apply_policies().unwrap().is_empty());
    let e = b
        .core
        .set_policy(
            &b.admin,
            &Policy {
                max_key_age_secs: 0,
                ..pool.clone()
            },
        )
        .unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e}");
    b.core
        .remove_policy(&b.admin, PolicyScope::Volume, "disk")
        .unwrap();
    let e = b
        .core
        .remove_policy(&b.admin, PolicyScope::Volume, "disk")
        .unwrap_err();
    assert!(e.to_string().contains("no volume policy for"), "{e}");
    assert_eq!(
        b.core.policy_of(&v.id, "default").unwrap().unwrap().mode,
        RekeyKind::Shallow
    );
}

#[tokio::test]
async fn a_volume_due_by_its_policy_and_after_a_migration_is_overdue_once() {
    use crate::model::{Policy, PolicyScope, RekeyKind};
    use crate::store::{Access, Store};
    let b = Bed::new();
    b.host("h1");
    let a = b.volume("h1", "a").await;
    let both = b.volume("h1", "both").await;
    b.core
        .set_policy(
            &b.admin,
            &Policy {
                scope: PolicyScope::Pool,
                target: "default".into(),
                max_key_age_secs: 10,
                mode: RekeyKind::Shallow,
                after_migration_secs: 0,
            },
        )
        .unwrap();
    let created = {
        let mut tx = b.store.begin(Access::Read).unwrap();
        tx.key_created(&a.id, 1).unwrap().unwrap()
    };
    // `both` also has an after-migration rekey due, earlier.
    {
        let mut tx = b.store.begin(Access::Write).unwrap();
        tx.move_volume(&both.id, "h1", created + 5).unwrap();
        tx.commit().unwrap();
    }
    let mut tx = b.store.begin(Access::Read).unwrap();
    let none = tx.rekeys_overdue(created + 4).unwrap();
    assert_eq!(none.volumes, 0, "{none:?}");
    let one = tx.rekeys_overdue(created + 6).unwrap();
    assert_eq!((one.volumes, one.oldest_due), (1, created + 5), "{one:?}");
    let two = tx.rekeys_overdue(created + 100).unwrap();
    assert_eq!((two.volumes, two.oldest_due), (2, created + 5), "{two:?}");
}
