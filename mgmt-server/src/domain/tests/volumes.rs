//! The volume lifecycle: create, push, delete (crypto-shredding), decrypt;
//! unreachable and revoked hosts.

use super::Bed;
use crate::domain::fake_agent::Call;
use crate::model::{CoreError, VolumeFormat, VolumeState};

#[tokio::test]
async fn a_volume_is_created_with_its_key_for_its_host_only_and_shredded_on_delete() {
    let b = Bed::new();
    b.host("kvm-a");
    b.host("kvm-b");
    let v = b
        .core
        .create_volume(
            &b.admin,
            "kvm-a",
            "default",
            "disk1",
            1 << 30,
            VolumeFormat::Raw,
        )
        .unwrap();
    assert_eq!(v.state, VolumeState::PendingCreate);
    assert_eq!((v.key_generation, v.capacity_bytes), (1, 1 << 30));
    assert_eq!(b.generations(&v.id), [1]);
    b.push().await;
    let v = b.core.get_volume("disk1").unwrap();
    assert_eq!(v.state, VolumeState::Ready);
    assert_eq!(v.path, format!("/fake/default/{}", v.id));
    // The fake opened the packet with kvm-a's key: sealed to it, for this
    // volume and generation. kvm-b got nothing.
    assert_eq!(
        b.agents.calls("kvm-a"),
        [Call::Create {
            volume: v.id.clone(),
            generation: 1,
            encrypt: false
        }]
    );
    assert!(b.agents.calls("kvm-b").is_empty());
    let actions = b.actions();
    for a in [
        "key.created",
        "volume.create-requested",
        "key.released",
        "key.pushed",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} in {actions:?}");
    }
    // The release is audited before the push is recorded.
    let released = actions.iter().position(|a| a == "key.released").unwrap();
    let pushed = actions.iter().position(|a| a == "key.pushed").unwrap();
    assert!(released < pushed);

    let e = b
        .core
        .create_volume(
            &b.admin,
            "kvm-b",
            "default",
            "disk1",
            1,
            VolumeFormat::Qcow2,
        )
        .unwrap_err();
    assert!(matches!(e, CoreError::AlreadyExists(_)), "{e}");

    let v = b.core.delete_volume(&b.admin, "disk1").unwrap();
    assert_eq!(v.state, VolumeState::PendingDelete);
    assert_eq!(
        b.generations(&v.id),
        [1],
        "the key stays until the host confirms"
    );
    let e = b.core.delete_volume(&b.admin, "disk1").unwrap_err();
    assert!(e.to_string().contains("already pending-delete"), "{e}");
    b.push().await;
    let v = b.core.get_volume(&v.id).unwrap();
    assert_eq!(v.state, VolumeState::Deleted);
    assert!(b.generations(&v.id).is_empty());
    assert!(b.core.list_volumes(None).unwrap().is_empty());
    // The name is free again.
    b.core
        .create_volume(
            &b.admin,
            "kvm-b",
            "default",
            "disk1",
            1,
            VolumeFormat::Qcow2,
        )
        .unwrap();
    assert!(b.core.verify_audit(None).unwrap().ok);
}

#[tokio::test]
async fn an_unreachable_host_leaves_the_creation_pending_until_it_answers() {
    let b = Bed::new();
    b.host("kvm-late");
    b.agents.set_down("kvm-late", true);
    b.core
        .create_volume(
            &b.admin,
            "kvm-late",
            "p",
            "late",
            1 << 20,
            VolumeFormat::Qcow2,
        )
        .unwrap();
    b.push().await;
    b.push().await;
    let v = b.core.get_volume("late").unwrap();
    assert_eq!(v.state, VolumeState::PendingCreate);
    assert_eq!(v.attempts, 2);
    assert!(
        v.last_error
            .contains("host kvm-late at kvm-late:7444 is unreachable"),
        "{v:?}"
    );
    b.agents.set_down("kvm-late", false);
    b.push().await;
    let v = b.core.get_volume("late").unwrap();
    assert_eq!((v.state, v.last_error.as_str()), (VolumeState::Ready, ""));
}

#[tokio::test]
async fn a_revoked_host_gets_no_key_and_its_volumes_are_shredded_at_once() {
    let b = Bed::new();
    b.host("kvm-r");
    let v = b.volume("kvm-r", "rv").await;
    b.core.revoke_host(&b.admin, "kvm-r").unwrap();
    let before = b.snapshot();
    let e = b
        .core
        .create_volume(&b.admin, "kvm-r", "p", "v2", 1, VolumeFormat::Qcow2)
        .unwrap_err();
    assert_eq!(e.to_string(), "host kvm-r is revoked: no keys go to it");
    let e = b.core.decrypt_volume(&b.admin, "rv", true).unwrap_err();
    assert!(e.to_string().contains("is revoked"), "{e}");
    assert_eq!(b.snapshot(), before);

    let d = b.core.delete_volume(&b.admin, "rv").unwrap();
    assert_eq!(d.state, VolumeState::Deleted);
    assert!(
        d.last_error
            .contains("unreadable without the destroyed key"),
        "{d:?}"
    );
    assert!(b.generations(&v.id).is_empty());
    b.push().await;
    assert_eq!(
        b.agents.calls("kvm-r").len(),
        1,
        "only the creation reached it"
    );
}

#[tokio::test]
async fn decryption_needs_confirmation_and_no_guest_and_destroys_the_key() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "data").await;
    b.volume("kvm-a", "root").await;
    b.guest("kvm-a", "g1", &["root"]).await;
    let e = b.core.decrypt_volume(&b.admin, "data", false).unwrap_err();
    assert!(e.to_string().contains("--yes-i-know"), "{e}");
    let e = b.core.decrypt_volume(&b.admin, "root", true).unwrap_err();
    assert!(e.to_string().contains("used by guest(s) g1"), "{e}");
    let d = b.core.decrypt_volume(&b.admin, "data", true).unwrap();
    assert_eq!(d.state, VolumeState::PendingDecrypt);
    b.push().await;
    let d = b.core.get_volume(&v.id).unwrap();
    assert_eq!(d.state, VolumeState::Decrypted);
    assert!(b.generations(&v.id).is_empty());
    assert!(b.agents.calls("kvm-a").contains(&Call::Decrypt {
        volume: v.id.clone()
    }));
    for a in [
        "volume.decrypt-requested",
        "volume.decrypted",
        "key.destroyed",
    ] {
        assert!(b.actions().iter().any(|x| x == a), "{a}");
    }
}

#[tokio::test]
async fn a_guest_gets_exactly_its_volumes_keys() {
    let b = Bed::new();
    b.host("kvm-a");
    b.host("kvm-b");
    let root = b.volume("kvm-a", "root").await;
    let data = b.volume("kvm-a", "data").await;
    b.volume("kvm-a", "other").await;
    let other_host = b.volume("kvm-b", "b-disk").await;
    let g = b.guest("kvm-a", "web", &["root", "data"]).await;
    assert_eq!(g.state, crate::model::GuestState::ShutOff);
    let define = b
        .agents
        .calls("kvm-a")
        .into_iter()
        .find_map(|c| match c {
            Call::Define { keys, .. } => Some(keys),
            _ => None,
        })
        .unwrap();
    let mut want = vec![(root.id.clone(), 1), (data.id.clone(), 1)];
    want.sort();
    let mut got = define;
    got.sort();
    assert_eq!(got, want);

    // A disk on another host's volume is refused, naming the disk.
    let xml = "<domain><name>g2</name><devices><disk type='volume' device='disk'>\
        <source pool='default' volume='b-disk'/><target dev='vda'/></disk></devices></domain>";
    let e = b.core.define_guest(&b.admin, "kvm-a", xml).unwrap_err();
    assert!(
        e.to_string()
            .contains("its volume is on host kvm-b, not on kvm-a"),
        "{e}"
    );
    assert!(!b.agents.keys("kvm-a").contains(&(other_host.id, 1)));

    // An action waits for the one pending.
    b.core
        .guest_action(&b.admin, "web", crate::model::GuestOp::Start)
        .unwrap();
    let e = b
        .core
        .guest_action(&b.admin, "web", crate::model::GuestOp::Stop)
        .unwrap_err();
    assert!(e.to_string().contains("is waiting for `start`"), "{e}");
    b.push().await;
    assert_eq!(
        b.core.get_guest("web").unwrap().state,
        crate::model::GuestState::Running
    );
}

/// A push's outcome that arrives after the volume changed (the admin
/// deleted it, or its host was revoked and it was shredded) changes
/// nothing: the deletion is not undone and its reason stays.
#[tokio::test]
async fn a_push_outcome_of_a_volume_that_changed_meanwhile_is_dropped() {
    use crate::domain::agent::VolumeOnHost;
    use crate::domain::push::{FailureKind, PushFailure};

    let b = Bed::new();
    b.host("kvm-a");
    b.host("kvm-r");
    let made = VolumeOnHost {
        path: "/fake/p/x".into(),
        capacity_bytes: 1 << 20,
    };
    // Deleted while its creation was under way: the creation's success
    // does not make it ready again, and the deletion is still queued.
    let v = b
        .core
        .create_volume(&b.admin, "kvm-a", "p", "gone", 1 << 20, VolumeFormat::Raw)
        .unwrap();
    b.core.delete_volume(&b.admin, "gone").unwrap();
    let before = b.snapshot();
    b.core.record_pushes(&[(v.clone(), Ok(made))]).unwrap();
    assert_eq!(b.snapshot(), before);
    assert_eq!(
        b.core.get_volume(&v.id).unwrap().state,
        VolumeState::PendingDelete
    );
    b.push().await;
    assert_eq!(
        b.core.get_volume(&v.id).unwrap().state,
        VolumeState::Deleted
    );

    // Shredded with its revoked host while a creation failed: the reason
    // shown is the shredding's, not the failed attempt's.
    let v = b
        .core
        .create_volume(&b.admin, "kvm-r", "p", "doomed", 1 << 20, VolumeFormat::Raw)
        .unwrap();
    b.core.revoke_host(&b.admin, "kvm-r").unwrap();
    b.core.delete_volume(&b.admin, "doomed").unwrap();
    let before = b.snapshot();
    let failed = PushFailure {
        kind: FailureKind::Lasting,
        message: "host kvm-r is revoked: no keys go to it".into(),
    };
    b.core.record_pushes(&[(v.clone(), Err(failed))]).unwrap();
    assert_eq!(b.snapshot(), before);
    let d = b.core.get_volume(&v.id).unwrap();
    assert_eq!(d.state, VolumeState::Deleted);
    assert!(d.last_error.contains("its image was left there"), "{d:?}");
}

#[tokio::test]
async fn overlapping_push_rounds_deliver_each_volume_once_and_leave_no_claim() {
    // More than two batches due: one call runs rounds that overlap (the
    // next one reads and releases while the one before delivers). Each
    // volume reaches its host exactly once, all become ready, and no
    // round's claim is left behind.
    let b = Bed::new();
    b.host("kvm-a");
    let n = 2 * super::super::push::BATCH as usize + 7;
    for i in 0..n {
        b.core
            .create_volume(
                &b.admin,
                "kvm-a",
                "default",
                &format!("d{i}"),
                1 << 20,
                VolumeFormat::Qcow2,
            )
            .unwrap();
    }
    let tried = b.core.push_volumes().await.unwrap();
    assert_eq!(tried, n, "one call delivers all {n} due volumes");
    let mut created: Vec<String> = b
        .agents
        .calls("kvm-a")
        .into_iter()
        .map(|c| match c {
            Call::Create { volume, .. } => volume,
            other => panic!("only creations were due, the host got {other:?}"),
        })
        .collect();
    assert_eq!(created.len(), n, "one delivery a volume");
    created.sort();
    created.dedup();
    assert_eq!(created.len(), n, "no volume was delivered twice");
    assert!(b.core.due_volumes(10).unwrap().is_empty(), "all recorded");
    assert!(
        b.core.pushing.lock().unwrap().is_empty(),
        "the rounds' claims ended with them"
    );
    let ready = b
        .core
        .list_volumes(None)
        .unwrap()
        .into_iter()
        .filter(|v| v.state == VolumeState::Ready)
        .count();
    assert_eq!(ready, n);
}
