//! Escrow packets on the store (either engine) with fake hosts: the
//! two-person rule, every bad input refused with nothing changed, the
//! limits per volume and per requester, generations and obsolete packets,
//! denial, expiry, fetching, the audit records (no key in them), and a
//! host that fails. (The packet's contents are guestkeyd's: the fake host
//! answers fixed bytes.)

use super::Bed;
use crate::domain::AgentErrorKind;
use crate::domain::escrow::{MAX_OPEN_PER_VOLUME, MAX_PENDING_PER_REQUESTER};
use crate::domain::fake_agent::Call;
use crate::model::{Caller, CoreError, EscrowEntry, EscrowState, RekeyKind, RekeyPlacement};

/// A fresh age X25519 recipient (`age1...`).
fn recipient() -> String {
    age::x25519::Identity::generate().to_public().to_string()
}

fn bob() -> Caller {
    Caller::Admin("bob".into())
}

/// Every request, and how many audit records there are.
fn state(b: &Bed) -> (Vec<EscrowEntry>, usize) {
    (
        b.core.list_escrow(None, true).unwrap(),
        b.core.list_audit(0, 100_000).unwrap().len(),
    )
}

fn ask(b: &Bed, volume: &str) -> EscrowEntry {
    b.core
        .request_escrow(&b.admin, volume, &[recipient()], "offline copy")
        .unwrap()
}

async fn approve(b: &Bed, who: Caller, id: &str) -> Result<EscrowEntry, CoreError> {
    b.core
        .decide_escrow(who, id.to_owned(), true, String::new())
        .await
}

#[tokio::test]
async fn the_requester_cannot_approve_another_admin_can_and_the_packet_is_kept() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "disk").await;
    let (r1, r2) = (recipient(), recipient());
    let e = b
        .core
        .request_escrow(&b.admin, "disk", &[r1.clone(), r2.clone()], "yearly copy")
        .unwrap();
    assert!(e.id.starts_with("es-") && e.id.len() == 15, "{}", e.id);
    assert_eq!(
        (e.state, e.generation, &e.requested_by),
        (EscrowState::Pending, 1, &"admin:admin".to_owned())
    );
    assert_eq!(e.recipients, vec![r1.clone(), r2.clone()]);

    // The same admin: refused, audited, still pending, nothing asked of
    // the host.
    let err = approve(&b, b.admin.clone(), &e.id).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CoreError::Denied(_))
            && msg.contains("another admin must approve")
            && msg.contains("guestkey-server admin add NAME --data-dir DIR --out DIR"),
        "{msg}"
    );
    assert!(b.actions().contains(&"escrow.refused".to_owned()));
    assert_eq!(
        b.core.list_escrow(None, false).unwrap()[0].state,
        EscrowState::Pending
    );
    assert!(
        !b.agents
            .calls("kvm-a")
            .iter()
            .any(|c| matches!(c, Call::Escrow { .. }))
    );

    // Another admin: the host makes it with the current key.
    let made = approve(&b, bob(), &e.id).await.unwrap();
    assert_eq!(made.state, EscrowState::Made);
    assert_eq!(made.decided_by, "admin:bob");
    assert!(!made.obsolete && made.packet_bytes > 0 && !made.luks_uuid.is_empty());
    assert!(b.agents.calls("kvm-a").contains(&Call::Escrow {
        volume: v.id.clone(),
        generation: 1,
        recipients: vec![r1.clone(), r2.clone()],
    }));
    let (entry, packet) = b.core.get_escrow_packet(&b.admin, &e.id).unwrap();
    assert_eq!(packet.len() as u64, entry.packet_bytes);
    assert_eq!(
        packet,
        format!("fake escrow packet {} of {}", e.id, v.id).into_bytes()
    );

    // Audited with ids, names and recipients.
    let recs = b.core.list_audit(0, 100_000).unwrap();
    for action in [
        "escrow.requested",
        "escrow.made",
        "escrow.fetched",
        "key.released",
    ] {
        let r = recs.iter().rev().find(|r| r.action == action).unwrap();
        assert_eq!(r.subject, v.id, "{action}");
        if action != "key.released" {
            assert!(r.detail.contains(&e.id), "{action}: {}", r.detail);
        }
    }
    let requested = recs
        .iter()
        .find(|r| r.action == "escrow.requested")
        .unwrap();
    assert!(
        requested.actor == "admin:admin"
            && requested.detail.contains(&r1)
            && requested.detail.contains("yearly copy"),
        "{requested:?}"
    );
    let made_rec = recs.iter().find(|r| r.action == "escrow.made").unwrap();
    assert!(made_rec.actor == "admin:bob" && made_rec.detail.contains("admin:admin"));
    // Deciding it again: refused.
    let again = approve(&b, bob(), &e.id).await.unwrap_err().to_string();
    assert!(again.contains("is made, not pending"), "{again}");
}

#[tokio::test]
async fn audit_records_hold_no_key() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "disk").await;
    let e = ask(&b, "disk");
    approve(&b, bob(), &e.id).await.unwrap();
    b.core.get_escrow_packet(&bob(), &e.id).unwrap();
    // The key as the host would get it, and its textual forms.
    let host = b.core.enrolled_host("kvm-a").unwrap();
    let key = b
        .core
        .write(|tx| {
            b.core
                .release(tx, &v.id, v.format, 1, &host, " for the test")
        })
        .unwrap();
    let raw = key.secret.expose_secret().to_vec();
    let forms = [
        hex::encode(&raw),
        String::from_utf8_lossy(&raw).into_owned(),
    ];
    for r in b.core.list_audit(0, 100_000).unwrap() {
        let text = format!("{} {} {}", r.actor, r.subject, r.detail);
        for f in &forms {
            assert!(!text.contains(f.as_str()), "{}: {text}", r.action);
        }
    }
    assert!(!format!("{:?}", b.core.list_escrow(None, true).unwrap()).contains(&forms[0]));
}

#[tokio::test]
async fn bad_input_is_refused_by_name_and_changes_nothing() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "disk").await;
    let e = ask(&b, "disk");
    let before = state(&b);
    let r = recipient();
    let long = "x".repeat(201);
    let seventeen: Vec<String> = (0..17).map(|_| recipient()).collect();
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        ("nope", vec![r.clone()], "", "no volume named"),
        ("disk", vec![], "", "give 1 to 16 age recipients"),
        ("disk", seventeen, "", "give 1 to 16 age recipients"),
        (
            "disk",
            vec!["age1notarecipient".into()],
            "",
            "not an age X25519 recipient",
        ),
        (
            "disk",
            vec!["ssh-ed25519 AAAAC3Nza".into()],
            "",
            "not an age X25519 recipient",
        ),
        ("disk", vec![r.clone(), r.clone()], "", "given twice"),
        ("disk", vec![r.clone()], &long, "at most 200 characters"),
        ("disk", vec![r.clone()], "two\nlines", "control characters"),
    ];
    for (volume, recipients, reason, says) in cases {
        let err = b
            .core
            .request_escrow(&b.admin, volume, &recipients, reason)
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{volume} {recipients:?}: {err}");
    }
    // Not an admin.
    let err = b
        .core
        .request_escrow(
            &Caller::Host("kvm-a".into()),
            "disk",
            std::slice::from_ref(&r),
            "",
        )
        .unwrap_err();
    assert!(matches!(err, CoreError::Denied(_)), "{err}");
    // Unknown ids, and a note too long.
    for id in ["es-000000000000", "rq-000000000000"] {
        let err = approve(&b, bob(), id).await.unwrap_err().to_string();
        assert!(
            err.contains("no escrow request") && err.contains("escrow list"),
            "{err}"
        );
        let err = b
            .core
            .get_escrow_packet(&bob(), id)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no escrow request"), "{err}");
    }
    let err = b
        .core
        .decide_escrow(bob(), e.id.clone(), true, "n".repeat(300))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 200 characters"), "{err}");
    // A pending request has no packet.
    let err = b
        .core
        .get_escrow_packet(&bob(), &e.id)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is pending") && err.contains(&format!("guestkeyctl escrow approve {}", e.id)),
        "{err}"
    );
    assert_eq!(state(&b), before, "nothing changed");
}

#[tokio::test]
async fn limits_per_volume_and_per_requester_name_what_to_do() {
    let b = Bed::new();
    b.host("kvm-a");
    for i in 0..4 {
        b.volume("kvm-a", &format!("v{i}")).await;
    }
    // Per volume: pending and made-and-current count.
    let first = ask(&b, "v0");
    approve(&b, bob(), &first.id).await.unwrap();
    for _ in 1..MAX_OPEN_PER_VOLUME {
        ask(&b, "v0");
    }
    let before = state(&b);
    let err = b
        .core
        .request_escrow(&b.admin, "v0", &[recipient()], "")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CoreError::Exhausted(_))
            && msg.contains(&format!("at most {MAX_OPEN_PER_VOLUME}"))
            && msg.contains("guestkeyctl escrow deny")
            && msg.contains("expire"),
        "{msg}"
    );
    assert_eq!(state(&b), before);
    // A denial frees a place; so does a rekey (the made one is obsolete).
    let pending = b.core.list_escrow(Some("v0"), false).unwrap();
    let p = pending
        .iter()
        .find(|e| e.state == EscrowState::Pending)
        .unwrap();
    b.core
        .decide_escrow(b.admin.clone(), p.id.clone(), false, "not needed".into())
        .await
        .unwrap();
    ask(&b, "v0");

    // Per requester: pending ones of every volume.
    let carol = Caller::Admin("carol".into());
    for i in 0..MAX_PENDING_PER_REQUESTER {
        let v = ["v1", "v2"][(i % 2) as usize];
        b.core
            .request_escrow(&carol, v, &[recipient()], "")
            .unwrap();
    }
    let before = state(&b);
    let err = b
        .core
        .request_escrow(&carol, "v3", &[recipient()], "")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin:carol has 16 escrow requests pending")
            && err.contains(&format!("at most {MAX_PENDING_PER_REQUESTER}"))
            && err.contains("let them expire"),
        "{err}"
    );
    assert_eq!(state(&b), before);
    // Others may still ask.
    b.core
        .request_escrow(&bob(), "v3", &[recipient()], "")
        .unwrap();
}

#[tokio::test]
async fn a_rekey_makes_a_request_stale_and_a_made_packet_obsolete() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "disk").await;
    let made = ask(&b, "disk");
    approve(&b, bob(), &made.id).await.unwrap();
    let stale = ask(&b, "disk");
    assert_eq!(b.core.list_escrow(Some("disk"), false).unwrap().len(), 2);

    // Mid-rekey: refused, still pending.
    b.core
        .request_rekey(&b.admin, "disk", RekeyKind::Shallow, RekeyPlacement::Any, 0)
        .unwrap();
    let err = approve(&b, bob(), &stale.id).await.unwrap_err().to_string();
    assert!(
        err.contains("is rekeying") && err.contains("stays pending"),
        "{err}"
    );
    b.push().await;

    // After it: the request is for generation 1, the volume at 2.
    let before = state(&b);
    let err = approve(&b, bob(), &stale.id).await.unwrap_err().to_string();
    assert!(
        err.contains("generation 1")
            && err.contains("at generation 2 now")
            && err.contains("ask again"),
        "{err}"
    );
    assert_eq!(state(&b), before, "still pending, nothing recorded");

    // The made packet is obsolete: listed with --all only, still fetchable.
    let open = b.core.list_escrow(None, false).unwrap();
    assert_eq!(
        open.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [stale.id.as_str()]
    );
    let all = b.core.list_escrow(None, true).unwrap();
    let old = all.iter().find(|e| e.id == made.id).unwrap();
    assert!(old.obsolete && old.state == EscrowState::Made);
    let (e, packet) = b.core.get_escrow_packet(&b.admin, &made.id).unwrap();
    assert!(e.obsolete && !packet.is_empty());
    let fetched = b.core.list_audit(0, 100_000).unwrap();
    assert!(
        fetched
            .iter()
            .any(|r| r.action == "escrow.fetched" && r.detail.contains("obsolete"))
    );

    // A new request is for generation 2, and is made with it.
    let fresh = ask(&b, "disk");
    assert_eq!(fresh.generation, 2);
    assert_eq!(approve(&b, bob(), &fresh.id).await.unwrap().generation, 2);
    // Newest first.
    let all = b.core.list_escrow(Some("disk"), true).unwrap();
    assert_eq!(all[0].id, fresh.id);
    assert_eq!(all.last().unwrap().id, made.id);

    // A deleted volume's packets are obsolete, and it takes no request.
    b.core.delete_volume(&b.admin, "disk").unwrap();
    b.push().await;
    assert!(
        b.core
            .list_escrow(None, false)
            .unwrap()
            .iter()
            .all(|e| e.state == EscrowState::Pending)
    );
    let v = b.core.list_escrow(None, true).unwrap();
    assert!(
        v.iter()
            .filter(|e| e.state == EscrowState::Made)
            .all(|e| e.obsolete)
    );
}

#[tokio::test]
async fn denial_and_expiry_end_a_request() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "disk").await;
    // The requester may withdraw their own.
    let e = ask(&b, "disk");
    let d = b
        .core
        .decide_escrow(
            b.admin.clone(),
            e.id.clone(),
            false,
            "asked by mistake".into(),
        )
        .await
        .unwrap();
    assert_eq!(
        (d.state, d.decided_by.as_str(), d.note.as_str()),
        (EscrowState::Denied, "admin:admin", "asked by mistake")
    );
    assert!(b.actions().contains(&"escrow.denied".to_owned()));
    let err = approve(&b, bob(), &e.id).await.unwrap_err().to_string();
    assert!(err.contains("is denied, not pending"), "{err}");
    let err = b
        .core
        .get_escrow_packet(&bob(), &e.id)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is denied") && err.contains("ask again"),
        "{err}"
    );
    assert!(b.core.list_escrow(None, false).unwrap().is_empty());

    // Eight days old: expired at the next look, audited.
    let old = ask(&b, "disk");
    let eight_days_ago = crate::domain::now_unix() - 8 * 24 * 3600;
    b.store
        .tamper(&format!(
            "UPDATE escrow_packets SET requested_unix = {eight_days_ago} WHERE id = '{}'",
            old.id
        ))
        .unwrap();
    let err = approve(&b, bob(), &old.id).await.unwrap_err().to_string();
    assert!(err.contains("is expired, not pending"), "{err}");
    let all = b.core.list_escrow(None, true).unwrap();
    assert_eq!(
        all.iter().find(|x| x.id == old.id).unwrap().state,
        EscrowState::Expired
    );
    let recs = b.core.list_audit(0, 100_000).unwrap();
    assert!(
        recs.iter()
            .any(|r| r.action == "escrow.expired" && r.subject == old.id)
    );
}

#[tokio::test]
async fn a_failing_host_leaves_the_request_pending_and_says_why() {
    let b = Bed::new();
    b.host("kvm-a");
    b.volume("kvm-a", "disk").await;
    let e = ask(&b, "disk");

    b.agents.set_down("kvm-a", true);
    let err = approve(&b, bob(), &e.id).await.unwrap_err().to_string();
    assert!(
        err.contains("unreachable")
            && err.contains("stays pending")
            && err.contains("when the host answers"),
        "{err}"
    );
    b.agents.set_down("kvm-a", false);
    b.agents
        .fail_next("kvm-a", "make_escrow_packet", AgentErrorKind::Refused);
    let err = approve(&b, bob(), &e.id).await.unwrap_err().to_string();
    assert!(
        err.contains("scripted make_escrow_packet failure")
            && err.contains(&format!("guestkeyctl escrow approve {}", e.id)),
        "{err}"
    );
    let now = b.core.list_escrow(None, false).unwrap();
    assert_eq!((now.len(), now[0].state), (1, EscrowState::Pending));
    let failed: Vec<_> = b
        .core
        .list_audit(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "escrow.failed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed[1]
            .detail
            .contains("scripted make_escrow_packet failure")
    );
    // Once it answers, the approval goes through.
    assert_eq!(
        approve(&b, bob(), &e.id).await.unwrap().state,
        EscrowState::Made
    );
}
