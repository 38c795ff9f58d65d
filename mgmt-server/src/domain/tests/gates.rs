//! The release gates' rules on the in-memory store: what a release of an
//! `attested` key needs of the host's last attestation, what policies a
//! host without a TPM may have, and the life of approval requests. (Real
//! quotes are checked against swtpm in `protect/tests/attest.rs` and end
//! to end in `tests/tests/attestation.rs`.)

use super::Bed;
use crate::model::{
    AttestationOutcome, CoreError, ReleasePolicy, ReleaseRequest, RequestState, VolumeFormat,
};
use crate::store::{Access, HostIdentity, Store};

fn pin(b: &Bed, host: &str) {
    let mut tx = b.store.begin(Access::Write).unwrap();
    tx.set_host_identity(
        host,
        &HostIdentity {
            ek_public: vec![1],
            ek_certificate: None,
            ak_public: vec![2],
            challenge_hash: None,
            pinned: true,
        },
    )
    .unwrap();
    tx.commit().unwrap();
}

fn outcome(b: &Bed, host: &str, ok: bool, age_secs: i64) {
    let mut tx = b.store.begin(Access::Write).unwrap();
    tx.record_attestation(
        host,
        &AttestationOutcome {
            at_unix: crate::domain::now_unix() - age_secs,
            ok,
            detail: "PCR 10 is 00".into(),
            differing: vec![10],
        },
        None,
    )
    .unwrap();
    tx.commit().unwrap();
}

fn audit_count(b: &Bed, action: &str) -> usize {
    b.core
        .list_audit(0, 100_000)
        .unwrap()
        .iter()
        .filter(|r| r.action == action)
        .count()
}

#[tokio::test]
async fn an_attested_release_needs_a_passed_attestation_younger_than_its_limit() {
    let b = Bed::new();
    b.host("kvm-a");
    let v = b.volume("kvm-a", "att").await;
    let host = b.core.enrolled_host("kvm-a").unwrap();
    let policy = |b: &Bed, p: ReleasePolicy| {
        let mut tx = b.store.begin(Access::Write).unwrap();
        tx.set_release_policy(&v.id, p).unwrap();
        tx.commit().unwrap();
    };
    // The volume's policy as it is at the release counts.
    policy(&b, ReleasePolicy::Attested);
    let release = |b: &Bed| {
        b.core
            .write(|tx| b.core.release(tx, &v.id, v.format, 1, &host, "").map(drop))
    };
    let released = audit_count(&b, "key.released");
    let check = |b: &Bed, want: &str| {
        let before = audit_count(b, "key.released");
        let e = release(b).unwrap_err();
        assert!(matches!(e, CoreError::Unattested(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(audit_count(b, "key.released"), before, "released anyway");
    };
    // Enrolled without a TPM, or never attested.
    check(&b, "has not been attested");
    pin(&b, "kvm-a");
    check(&b, "has not been attested");
    // Failed: the reason is the attestation's.
    outcome(&b, "kvm-a", false, 300);
    check(&b, "failed attestation: PCR 10 is 00");
    // Passed, but longer ago than limits.attestation_max_age_secs: a stalled
    // check leaves the host unattested (Keylime CVE-2022-3500).
    outcome(&b, "kvm-a", true, 121);
    check(&b, "older than limits.attestation_max_age_secs (120 s)");
    // Passed and fresh.
    outcome(&b, "kvm-a", true, 5);
    release(&b).unwrap();
    assert_eq!(audit_count(&b, "key.released"), released + 1);
    // An outcome issued before the recorded one changes nothing.
    outcome(&b, "kvm-a", false, 60);
    release(&b).unwrap();
    // A newer failure does.
    outcome(&b, "kvm-a", false, 0);
    check(&b, "failed attestation");
    // An `auto` key needs none of it.
    policy(&b, ReleasePolicy::Auto);
    release(&b).unwrap();
}

#[tokio::test]
async fn a_host_without_a_proven_attestation_key_gets_no_attested_volume() {
    let b = Bed::new();
    b.host("kvm-a");
    let e = b
        .core
        .create_volume_with(
            &b.admin,
            "kvm-a",
            "default",
            "att",
            1 << 20,
            VolumeFormat::Qcow2,
            ReleasePolicy::Attested,
            false,
        )
        .unwrap_err();
    assert!(e.to_string().contains("enrolled without a TPM"), "{e}");
    assert!(b.core.list_volumes(None).unwrap().is_empty());
    let v = b.volume("kvm-a", "plain").await;
    for p in [ReleasePolicy::Attested, ReleasePolicy::AttestedApproved] {
        let e = b.core.set_release_policy(&b.admin, "plain", p).unwrap_err();
        assert!(e.to_string().contains("enrolled without a TPM"), "{e}");
    }
    assert_eq!(
        b.core.get_volume(&v.id).unwrap().release,
        ReleasePolicy::Auto
    );
    // Approval alone needs no TPM; it is audited.
    let after = b
        .core
        .set_release_policy(&b.admin, "plain", ReleasePolicy::Approved)
        .unwrap();
    assert_eq!(after.release, ReleasePolicy::Approved);
    assert_eq!(audit_count(&b, "volume.release-policy"), 1);
    // Not while a guest uses the volume.
    b.guest("kvm-a", "g1", &["plain"]).await;
    let e = b
        .core
        .set_release_policy(&b.admin, "plain", ReleasePolicy::Auto)
        .unwrap_err();
    assert!(e.to_string().contains("used by guest(s) g1"), "{e}");
    // An allowlist for such a host would never be checked.
    let value = "00".repeat(32).parse().unwrap();
    let e = b
        .core
        .allow_pcrs(
            &b.admin,
            crate::model::AllowScope::Host,
            "kvm-a",
            &[(7, value)],
            false,
        )
        .unwrap_err();
    assert!(e.to_string().contains("enrolled without a TPM"), "{e}");
    let e = b
        .core
        .allow_pcrs(
            &b.admin,
            crate::model::AllowScope::Host,
            "kvm-a",
            &[],
            false,
        )
        .unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e:?}");
    // An unproven AK counts as none.
    let mut tx = b.store.begin(Access::Write).unwrap();
    tx.set_host_identity(
        "kvm-a",
        &HostIdentity {
            ek_public: vec![1],
            ek_certificate: None,
            ak_public: vec![2],
            challenge_hash: Some(vec![3]),
            pinned: false,
        },
    )
    .unwrap();
    tx.commit().unwrap();
    b.volume("kvm-a", "plain2").await;
    let e = b
        .core
        .set_release_policy(&b.admin, "plain2", ReleasePolicy::Attested)
        .unwrap_err();
    assert!(e.to_string().contains("never proven"), "{e}");
    // A wrong proof leaves it unpinned (audited); the right one pins it.
    let e = b.core.prove_attestation_key("kvm-a", b"guess").unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    assert_eq!(audit_count(&b, "host.attestation_key_refused"), 1);
    assert_eq!(audit_count(&b, "host.attestation_key_pinned"), 0);
    let mut tx = b.store.begin(Access::Write).unwrap();
    let right = b"the credential";
    tx.set_host_identity(
        "kvm-a",
        &HostIdentity {
            ek_public: vec![1],
            ek_certificate: None,
            ak_public: vec![2],
            challenge_hash: Some(<sha2::Sha256 as sha2::Digest>::digest(right).to_vec()),
            pinned: false,
        },
    )
    .unwrap();
    tx.commit().unwrap();
    b.core.prove_attestation_key("kvm-a", right).unwrap();
    assert_eq!(audit_count(&b, "host.attestation_key_pinned"), 1);
    let e = b.core.prove_attestation_key("kvm-a", right).unwrap_err();
    assert!(e.to_string().contains("already pinned"), "{e}");
}

#[tokio::test]
async fn requests_are_decided_once_and_expire() {
    let b = Bed::new();
    b.host("kvm-a");
    let request = |id: &str, age: i64| ReleaseRequest {
        id: id.into(),
        host: "kvm-a".into(),
        guest_uuid: "6f1c2b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f".into(),
        guest_name: "g1".into(),
        volumes: vec!["d1".into()],
        state: RequestState::Pending,
        created_unix: crate::domain::now_unix() - age,
        decided_unix: 0,
        decided_by: String::new(),
        note: String::new(),
    };
    let mut tx = b.store.begin(Access::Write).unwrap();
    tx.insert_request(&request("rq-000000000001", 10)).unwrap();
    tx.insert_request(&request("rq-000000000002", 3601))
        .unwrap();
    tx.commit().unwrap();
    // The old one expired (audited); the young one waits.
    let open = b.core.release_requests(false).unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, "rq-000000000001");
    assert_eq!(audit_count(&b, "release.expired"), 1);
    let e = b
        .core
        .decide_request(&b.admin, "rq-000000000002", true, "")
        .unwrap_err();
    assert!(e.to_string().contains("is expired, not pending"), "{e}");
    let e = b
        .core
        .decide_request(&b.admin, "rq-nope", true, "")
        .unwrap_err();
    assert!(matches!(e, CoreError::NotFound(_)), "{e:?}");
    let e = b
        .core
        .decide_request(&b.admin, "rq-000000000001", true, &"x".repeat(1025))
        .unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e:?}");
    let r = b
        .core
        .decide_request(&b.admin, "rq-000000000001", false, "no")
        .unwrap();
    assert_eq!(
        (r.state, r.decided_by.as_str()),
        (RequestState::Denied, "admin:admin")
    );
    let e = b
        .core
        .decide_request(&b.admin, "rq-000000000001", true, "")
        .unwrap_err();
    assert!(e.to_string().contains("is denied, not pending"), "{e}");
    assert_eq!(audit_count(&b, "release.denied"), 1);
}

#[tokio::test]
async fn a_host_may_quote_what_its_own_list_or_its_groups_names() {
    use crate::domain::allowlist::effective;
    use crate::model::AllowScope;
    let b = Bed::new();
    b.host("kvm-a");
    pin(&b, "kvm-a");
    let v = |byte: &str| byte.repeat(32).parse().unwrap();
    b.core
        .allow_pcrs(&b.admin, AllowScope::Host, "kvm-a", &[(7, v("aa"))], false)
        .unwrap();
    // A group's list, before the host is in it, does not apply.
    let g = b
        .core
        .allow_pcrs(
            &b.admin,
            AllowScope::Group,
            "rack-1",
            &[(7, v("bb"))],
            false,
        )
        .unwrap();
    assert_eq!(g.version, 1);
    let look = |b: &Bed| {
        let mut tx = b.store.begin(Access::Read).unwrap();
        effective(tx.as_mut(), "kvm-a").unwrap()
    };
    assert_eq!(look(&b).values.len(), 1);
    let h = b.core.set_host_group(&b.admin, "kvm-a", "rack-1").unwrap();
    assert_eq!(h.group, "rack-1");
    let e = look(&b);
    assert_eq!(e.values, vec![(7, "aa".repeat(32)), (7, "bb".repeat(32))]);
    assert_eq!(e.versions, "host kvm-a v1, group rack-1 v1");
    let shown = b.core.get_host("kvm-a").unwrap().attestation.unwrap();
    assert_eq!(
        (shown.allowlist_version, shown.group_allowlist_version),
        (1, 1)
    );
    // Replacing the group's value of PCR 7 is a new version.
    let g = b
        .core
        .allow_pcrs(&b.admin, AllowScope::Group, "rack-1", &[(7, v("cc"))], true)
        .unwrap();
    assert_eq!((g.version, g.values.len()), (2, 1));
    assert_eq!(audit_count(&b, "attestation.allowed"), 3);
    assert_eq!(audit_count(&b, "host.group"), 1);
    // Bad names change nothing.
    let e = b
        .core
        .allow_pcrs(
            &b.admin,
            AllowScope::Group,
            "rack 1",
            &[(7, v("dd"))],
            false,
        )
        .unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e:?}");
    let e = b
        .core
        .set_host_group(&b.admin, "kvm-a", "../x")
        .unwrap_err();
    assert!(matches!(e, CoreError::Invalid(_)), "{e:?}");
    assert_eq!(b.core.get_host("kvm-a").unwrap().group, "rack-1");
    let e = b
        .core
        .set_host_group(&b.admin, "nope", "rack-1")
        .unwrap_err();
    assert!(matches!(e, CoreError::NotFound(_)), "{e:?}");
    // Out of the group: only its own list again.
    b.core.set_host_group(&b.admin, "kvm-a", "").unwrap();
    assert_eq!(look(&b).values.len(), 1);
}

/// A split volume: only with a policy that attests; its key, and every
/// rekey's, is a 32-byte half released as a half; its policy stays one
/// that attests.
#[tokio::test]
async fn a_split_key_is_a_half_released_only_as_one() {
    use xdr_wipe::packet::Mechanism;
    let b = Bed::new();
    b.host("kvm-a");
    pin(&b, "kvm-a");
    let create = |release| {
        b.core.create_volume_with(
            &b.admin,
            "kvm-a",
            "default",
            "sp",
            1 << 20,
            VolumeFormat::Qcow2,
            release,
            true,
        )
    };
    for p in [ReleasePolicy::Auto, ReleasePolicy::Approved] {
        let e = create(p).unwrap_err().to_string();
        assert!(
            e.contains("use --release attested or attested+approved with --split"),
            "{e}"
        );
    }
    assert!(b.core.list_volumes(None).unwrap().is_empty());
    let v = create(ReleasePolicy::Attested).unwrap();
    assert!(v.split);
    let host = b.core.enrolled_host("kvm-a").unwrap();
    outcome(&b, "kvm-a", true, 0);
    let p = b
        .core
        .write(|tx| b.core.release(tx, &v.id, v.format, 1, &host, ""))
        .unwrap();
    assert_eq!(p.mechanism, Mechanism::QemuLuksPassphraseHalf);
    assert_eq!(p.secret.len(), 32);
    assert!(p.check().is_ok());
    let e = b
        .core
        .set_release_policy(&b.admin, "sp", ReleasePolicy::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has a split key"), "{e}");
    b.core
        .set_release_policy(&b.admin, "sp", ReleasePolicy::AttestedApproved)
        .unwrap();
    // No escrow packet of a half: refused at the request, nothing stored
    // or audited.
    let audited = b.core.list_audit(0, 100_000).unwrap().len();
    let recipient = age::x25519::Identity::generate().to_public().to_string();
    let e = b
        .core
        .request_escrow(&b.admin, "sp", &[recipient], "offline copy")
        .unwrap_err();
    assert!(
        matches!(e, CoreError::FailedPrecondition(_))
            && e.to_string().contains("volume sp has a split key")
            && e.to_string().contains("created without --split"),
        "{e}"
    );
    assert!(b.core.list_escrow(None, true).unwrap().is_empty());
    assert_eq!(b.core.list_audit(0, 100_000).unwrap().len(), audited);
}

/// A verifier's halves: made at the first request and bound to the host
/// that asked; no other host gets one, nor destroys one; only a fresh
/// attestation releases one; a nonce is good once, for its own host.
#[tokio::test]
async fn a_verifiers_half_is_bound_to_the_host_that_first_asked() {
    use crate::domain::halves::Wanted;
    let b = Bed::new();
    for h in ["kvm-a", "kvm-b"] {
        b.host(h);
        pin(&b, h);
    }
    let vol = "0b7d1c52-6f3e-4b8e-9a51-3f0c2d4e5a6b";
    let want = |g| {
        vec![Wanted {
            volume_id: vol.into(),
            generation: g,
        }]
    };
    // No fresh attestation: nothing.
    let e = b.core.release_halves_now("kvm-a", &want(1)).unwrap_err();
    assert!(matches!(e, CoreError::Unattested(_)), "{e:?}");
    assert_eq!(audit_count(&b, "half.created"), 0);
    outcome(&b, "kvm-a", true, 0);
    outcome(&b, "kvm-b", true, 0);
    let first = b.core.release_halves_now("kvm-a", &want(1)).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(audit_count(&b, "half.created"), 1);
    // The same half again for the same host (a start); a host's halves
    // open only with its own sealing key (`seal_for`).
    b.core.release_halves_now("kvm-a", &want(1)).unwrap();
    assert_eq!(audit_count(&b, "half.created"), 1);
    assert_eq!(audit_count(&b, "half.released"), 2);
    // Another host: refused, nothing released or made.
    let e = b.core.release_halves_now("kvm-b", &want(1)).unwrap_err();
    assert!(e.to_string().contains("is bound to host kvm-a"), "{e}");
    assert_eq!(audit_count(&b, "half.released"), 2);
    assert_eq!(b.core.forget_halves("kvm-b", vol, 0).unwrap(), 0);
    let bound = b
        .store
        .begin(Access::Read)
        .unwrap()
        .key_half(vol, 1)
        .unwrap();
    assert_eq!(bound.map(|(h, _)| h).as_deref(), Some("kvm-a"));
    // The next generation, then the old one goes.
    b.core.release_halves_now("kvm-a", &want(2)).unwrap();
    assert_eq!(b.core.forget_halves("kvm-a", vol, 2).unwrap(), 1);
    assert_eq!(b.core.forget_halves("kvm-a", vol, 0).unwrap(), 1);
    assert_eq!(audit_count(&b, "half.destroyed"), 2);

    // Nonces: unknown, another host's, used twice, and bad requests are
    // refused before any quote is looked at.
    let answer = || crate::domain::agent::QuoteAnswer {
        quote: vec![1],
        signature: vec![2],
        values: vec![],
    };
    let e = b
        .core
        .release_halves("kvm-a", &[7; 32], answer(), want(1))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("was not issued to host kvm-a"),
        "{e}"
    );
    let mut tx = b.store.begin(Access::Write).unwrap();
    tx.insert_half_challenge(&hex::encode([9u8; 32]), "kvm-b", crate::domain::now_unix())
        .unwrap();
    tx.commit().unwrap();
    let e = b
        .core
        .release_halves("kvm-a", &[9; 32], answer(), want(1))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("was not issued to host kvm-a"),
        "{e}"
    );
    // kvm-b's own nonce is spent by its first use, whatever the quote
    // (this bed pins a stand-in AK, so none verifies here; real quotes in
    // tests/tests/split_keys.rs).
    b.core
        .release_halves("kvm-b", &[9; 32], answer(), want(1))
        .await
        .unwrap_err();
    let e = b
        .core
        .release_halves("kvm-b", &[9; 32], answer(), want(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("used already"), "{e}");
    for (nonce, wanted, what) in [
        (vec![1u8; 31], want(1), "nonce"),
        (vec![1u8; 32], vec![], "halves"),
        (vec![1u8; 32], want(0), "generation"),
        (
            vec![1u8; 32],
            vec![Wanted {
                volume_id: "not-a-uuid".into(),
                generation: 1,
            }],
            "volume id",
        ),
    ] {
        let e = b
            .core
            .release_halves("kvm-a", &nonce, answer(), wanted)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    assert_eq!(audit_count(&b, "half.released"), 3);
}
