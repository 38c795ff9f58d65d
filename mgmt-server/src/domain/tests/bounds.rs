//! Bounds on retries and on refusals (issue 15, items 4 and 9): an
//! operation that keeps failing ends in a terminal state with its reason
//! and releases no more keys; an unreachable host gets no key at all;
//! refused calls add a bounded number of records that still say how many
//! there were.

use super::Bed;
use crate::domain::AgentErrorKind;
use crate::model::{GuestOp, GuestState, VolumeFormat, VolumeOp, VolumeState};

impl Bed {
    fn count(&self, action: &str) -> usize {
        self.actions().iter().filter(|a| *a == action).count()
    }
}

#[tokio::test]
async fn a_push_that_always_fails_ends_failed_with_its_reason_and_can_be_retried() {
    let b = Bed::new(); // retry.max_attempts = 4
    b.host("kvm-a");
    b.agents
        .fail_always("kvm-a", "create_volume", Some(AgentErrorKind::Refused));
    b.core
        .create_volume(
            &b.admin,
            "kvm-a",
            "nopool",
            "v",
            1 << 20,
            VolumeFormat::Qcow2,
        )
        .unwrap();
    for _ in 0..10 {
        b.push().await;
    }
    let v = b.core.get_volume("v").unwrap();
    assert_eq!(
        (v.state, v.failed_op),
        (VolumeState::Failed, Some(VolumeOp::Create))
    );
    assert_eq!((v.attempts, v.failures), (4, 4));
    assert!(
        v.last_error
            .starts_with("create gave up after 4 failed attempts: host kvm-a refused:"),
        "{v:?}"
    );
    assert_eq!(
        b.count("key.released"),
        4,
        "one release per attempt, none after"
    );
    assert_eq!(b.count("volume.failed"), 1);
    assert!(b.core.due_volumes(10).unwrap().is_empty());
    // Other operations wait for the admin.
    let e = b
        .core
        .request_rekey(
            &b.admin,
            "v",
            crate::model::RekeyKind::Deep,
            crate::model::RekeyPlacement::Any,
            0,
        )
        .unwrap_err();
    assert!(e.to_string().contains("volume v is failed"), "{e}");

    // The admin retries it explicitly once the host is fixed.
    b.agents.fail_always("kvm-a", "create_volume", None);
    let v = b.core.retry_volume(&b.admin, "v").unwrap();
    assert_eq!(
        (v.state, v.attempts, v.failures),
        (VolumeState::PendingCreate, 0, 0)
    );
    b.push().await;
    assert_eq!(b.core.get_volume("v").unwrap().state, VolumeState::Ready);
    let e = b.core.retry_volume(&b.admin, "v").unwrap_err();
    assert!(
        e.to_string().contains("only a failed volume is retried"),
        "{e}"
    );
    assert!(b.actions().iter().any(|a| a == "volume.retry-requested"));
}

#[tokio::test]
async fn an_unreachable_host_is_retried_without_limit_and_gets_no_key_meanwhile() {
    let b = Bed::new();
    b.host("kvm-down");
    b.agents.set_down("kvm-down", true);
    b.core
        .create_volume(&b.admin, "kvm-down", "p", "v", 1 << 20, VolumeFormat::Qcow2)
        .unwrap();
    for _ in 0..10 {
        b.push().await;
    }
    let v = b.core.get_volume("v").unwrap();
    assert_eq!(
        (v.state, v.attempts, v.failures),
        (VolumeState::PendingCreate, 10, 0)
    );
    assert_eq!(
        b.count("key.released"),
        0,
        "no key released for an unreachable host"
    );
    b.agents.set_down("kvm-down", false);
    b.push().await;
    assert_eq!(b.core.get_volume("v").unwrap().state, VolumeState::Ready);
    assert_eq!(b.count("key.released"), 1);
}

#[tokio::test]
async fn a_rekey_that_keeps_failing_ends_failed_with_both_keys_kept() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "disk").await;
    b.core
        .request_rekey(
            &b.admin,
            "disk",
            crate::model::RekeyKind::Shallow,
            crate::model::RekeyPlacement::Any,
            0,
        )
        .unwrap();
    b.agents
        .fail_always("kvm-a", "rekey", Some(AgentErrorKind::Failed));
    for _ in 0..6 {
        b.push().await;
    }
    let r = b.core.get_volume("disk").unwrap();
    assert_eq!(
        (r.state, r.failed_op),
        (VolumeState::Failed, Some(VolumeOp::Rekey))
    );
    assert_eq!(
        b.generations(&v.id),
        [1, 2],
        "the host may hold either: both kept"
    );
    b.agents.fail_always("kvm-a", "rekey", None);
    let r = b.core.retry_volume(&b.admin, "disk").unwrap();
    assert_eq!(r.state, VolumeState::Rekeying);
    assert!(r.rekey.is_some());
    b.push().await;
    let r = b.core.get_volume("disk").unwrap();
    assert_eq!((r.state, r.key_generation), (VolumeState::Ready, 2));
    assert_eq!(b.generations(&v.id), [2]);
}

#[tokio::test]
async fn the_release_rate_limit_holds_back_without_counting() {
    let b = Bed::with_limits(crate::config::Limits {
        max_volumes_per_host: 100,
        key_releases_per_minute: 1,
        ..Default::default()
    });
    b.host("kvm-a");
    for n in ["r1", "r2"] {
        b.core
            .create_volume(&b.admin, "kvm-a", "p", n, 1, VolumeFormat::Qcow2)
            .unwrap();
    }
    for _ in 0..8 {
        b.push().await;
    }
    let held: Vec<_> = b
        .core
        .list_volumes(None)
        .unwrap()
        .into_iter()
        .filter(|v| v.state != VolumeState::Ready)
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].state, VolumeState::PendingCreate, "{held:?}");
    assert_eq!(held[0].failures, 0);
    assert!(held[0].last_error.contains("rate limit"), "{held:?}");
}

#[tokio::test]
async fn a_guest_definition_that_can_never_succeed_ends_failed_and_can_be_redefined() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "root").await;
    b.agents
        .fail_always("kvm-a", "define_guest", Some(AgentErrorKind::Refused));
    let xml = "<domain><name>bad</name><devices><disk type='volume' device='disk'>\
        <source pool='default' volume='root'/><target dev='vda'/></disk></devices></domain>";
    b.core.define_guest(&b.admin, "kvm-a", xml).unwrap();
    let released = b.count("key.released");
    for _ in 0..10 {
        b.push().await;
    }
    let g = b.core.get_guest("bad").unwrap();
    assert_eq!((g.state, g.pending), (GuestState::Failed, None));
    assert!(
        g.last_error
            .starts_with("define gave up after 4 failed attempts:"),
        "{g:?}"
    );
    assert_eq!(b.count("key.released") - released, 4);
    assert_eq!(b.count("guest.failed"), 1);
    let e = b
        .core
        .guest_action(&b.admin, "bad", GuestOp::Start)
        .unwrap_err();
    assert!(
        e.to_string().contains("was never defined on host kvm-a"),
        "{e}"
    );

    // Fixed and defined again: the failed record makes way.
    b.agents.fail_always("kvm-a", "define_guest", None);
    b.core.define_guest(&b.admin, "kvm-a", xml).unwrap();
    b.push().await;
    let g = b.core.get_guest("bad").unwrap();
    assert_eq!((g.state, g.pending), (GuestState::ShutOff, None));
}

#[tokio::test]
async fn a_failed_guest_is_undefined_without_its_host_and_a_failed_start_can_be_repeated() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "root").await;
    b.guest("kvm-a", "g1", &["root"]).await;
    b.agents
        .fail_always("kvm-a", "start_guest", Some(AgentErrorKind::Refused));
    b.core.guest_action(&b.admin, "g1", GuestOp::Start).unwrap();
    for _ in 0..6 {
        b.push().await;
    }
    let g = b.core.get_guest("g1").unwrap();
    assert_eq!((g.state, g.pending), (GuestState::ShutOff, None), "{g:?}");
    assert!(
        g.last_error
            .starts_with("start gave up after 4 failed attempts"),
        "{g:?}"
    );
    b.agents.fail_always("kvm-a", "start_guest", None);
    b.core.guest_action(&b.admin, "g1", GuestOp::Start).unwrap();
    b.push().await;
    assert_eq!(b.core.get_guest("g1").unwrap().state, GuestState::Running);

    // A guest whose definition was given up: undefining needs no host.
    b.agents
        .fail_always("kvm-a", "define_guest", Some(AgentErrorKind::Refused));
    let xml = "<domain><name>g2</name><devices></devices></domain>";
    b.core.define_guest(&b.admin, "kvm-a", xml).unwrap();
    for _ in 0..6 {
        b.push().await;
    }
    assert_eq!(b.core.get_guest("g2").unwrap().state, GuestState::Failed);
    let g = b
        .core
        .guest_action(&b.admin, "g2", GuestOp::Undefine)
        .unwrap();
    assert_eq!(g.state, GuestState::Undefined);
    assert!(
        !b.agents
            .calls("kvm-a")
            .iter()
            .any(|c| matches!(c, crate::domain::fake_agent::Call::Undefine { .. }))
    );
}

#[tokio::test]
async fn the_same_volume_twice_in_one_guest_is_refused_by_name() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "root").await;
    let before = b.snapshot();
    let xml = "<domain><name>twice</name><devices>\n\
        <disk type='volume' device='disk'><source pool='default' volume='root'/><target dev='vda'/></disk>\n\
        <disk type='volume' device='disk'><source pool='default' volume='root'/><target dev='vdb'/></disk>\n\
        </devices></domain>";
    let e = b.core.define_guest(&b.admin, "kvm-a", xml).unwrap_err();
    let e = e.to_string();
    assert!(
        e.starts_with("invalid disks \"vda (line 2) and vdb (line 3)\": both use volume root"),
        "{e}"
    );
    assert!(!e.contains("database"), "{e}");
    assert_eq!(b.snapshot(), before);
}

#[test]
fn two_hundred_refusals_add_a_bounded_number_of_records_that_count_them() {
    let b = Bed::new();
    let before = b.actions().len();
    for _ in 0..200 {
        b.core
            .audit_refusal("unauthenticated", "the admin API", "no client certificate");
    }
    for i in 0..50 {
        b.core.audit_refusal(
            &format!("cert:{i}"),
            "the admin API",
            "unknown or revoked certificate",
        );
    }
    let mid = b.actions().len() - before;
    assert!(mid <= 3 + 7 * 3, "{mid} records while counting");
    b.core.flush_refusals(true).unwrap();
    let records = b.core.list_audit(0, 10_000).unwrap();
    let refused: Vec<_> = records.iter().filter(|r| r.action == "refused").collect();
    assert!(refused.len() <= 3 + 7 * 3 + 8 + 1, "{}", refused.len());
    let summary = refused
        .iter()
        .find(|r| r.actor == "unauthenticated" && r.detail.contains("repeated"))
        .unwrap();
    assert!(
        summary
            .detail
            .starts_with("no client certificate (repeated 197 more times within"),
        "{summary:?}"
    );
    let others = refused.iter().find(|r| r.actor == "various").unwrap();
    assert!(
        others.detail.starts_with("43 refusals of other kinds"),
        "{others:?}"
    );
    assert!(b.core.verify_audit(None).unwrap().ok);
}

#[tokio::test]
async fn a_host_that_stops_answering_during_every_call_is_given_up_too() {
    // It accepts the connection, then drops every call: each attempt
    // released a key, so each one counts.
    let b = Bed::new();
    b.host("kvm-a");
    b.agents
        .fail_always("kvm-a", "create_volume", Some(AgentErrorKind::Unreachable));
    b.core
        .create_volume(&b.admin, "kvm-a", "p", "v", 1, VolumeFormat::Qcow2)
        .unwrap();
    for _ in 0..10 {
        b.push().await;
    }
    assert_eq!(b.core.get_volume("v").unwrap().state, VolumeState::Failed);
    assert_eq!(b.count("key.released"), 4);
}

/// A guest push's failure that arrives after the guest's request changed
/// (here its XML was redefined, as adopting an encrypted volume does)
/// neither counts against the new request nor gives it up.
#[tokio::test]
async fn a_stale_guest_push_failure_leaves_the_new_request_alone() {
    use crate::domain::push::{FailureKind, PushFailure};
    use crate::store::{Access, Store};

    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "root").await;
    let g = b.guest("kvm-a", "web", &["root"]).await;
    let mut start = b
        .core
        .guest_action(&b.admin, "web", GuestOp::Start)
        .unwrap();
    // Its last allowed attempt is under way ...
    start.failures = 3;
    // ... when the admin's new definition replaces the request.
    let mut tx = b.store.begin(Access::Write).unwrap();
    tx.redefine_guest(&g.uuid, &g.domain_xml).unwrap();
    tx.commit().unwrap();
    let before = b.snapshot();
    let failed = PushFailure {
        kind: FailureKind::Lasting,
        message: "the start failed".into(),
    };
    b.core.guest_push_failed(&start, &failed).unwrap();
    b.core
        .guest_push_succeeded(&start, Some(GuestState::Running))
        .unwrap();
    assert_eq!(b.snapshot(), before);
    let now = b.core.get_guest("web").unwrap();
    assert_eq!((now.pending, now.failures), (Some(GuestOp::Define), 0));
    assert_eq!(b.count("guest.failed"), 0);
}
