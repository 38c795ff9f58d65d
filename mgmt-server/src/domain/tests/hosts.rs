//! Enrollment: one-time tokens, expiry, replay, concurrent use; revocation.

use std::sync::Arc;

use xdr_wipe::seal::HostSealingKey;

use super::{Bed, csr};
use crate::model::{CoreError, HostState};

fn sealing() -> Vec<u8> {
    HostSealingKey::generate().public_key().as_bytes().to_vec()
}

#[test]
fn a_token_works_once_and_bad_enrollments_change_nothing() {
    let b = Bed::new();
    let (h, token, expires) = b.core.add_host(&b.admin, "kvm-01", "kvm-01:7444").unwrap();
    assert_eq!(h.state, HostState::PendingEnrollment);
    assert!(token.starts_with("gkt_") && token.len() == 47, "{token}");
    assert!(expires > h.created_unix);

    let before = b.snapshot();
    for (token, csr, key, want) in [
        ("gkt_wrong", csr(), sealing(), "token is not valid"),
        (
            token.as_str(),
            b"junk".to_vec(),
            sealing(),
            "signing request",
        ),
        (token.as_str(), csr(), vec![1, 2, 3], "enrollment refused"),
    ] {
        let e = b.core.enroll(token, &csr, &key).unwrap_err();
        assert!(matches!(e, CoreError::Denied(_)), "{e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    assert_eq!(b.snapshot(), before, "refusals change nothing");

    let (name, cert) = b.core.enroll(&token, &csr(), &sealing()).unwrap();
    assert_eq!(name, "kvm-01");
    assert!(cert.contains("BEGIN CERTIFICATE"));
    let h = b.core.get_host("kvm-01").unwrap();
    assert_eq!(h.state, HostState::Enrolled);
    assert_eq!(h.certificate_sha256.len(), 64);

    // Replayed: refused, and the enrolled host is left as it is.
    let after = b.snapshot();
    let e = b.core.enroll(&token, &csr(), &sealing()).unwrap_err();
    assert!(e.to_string().contains("token is not valid"), "{e}");
    assert_eq!(b.snapshot(), after);

    let actions = b.actions();
    assert_eq!(actions.iter().filter(|a| *a == "refused").count(), 4);
    assert_eq!(actions.iter().filter(|a| *a == "host.enrolled").count(), 1);
    assert!(b.core.verify_audit(None).unwrap().ok);
}

#[test]
fn an_expired_token_is_refused_by_name() {
    let b = Bed::new();
    let (_, token, _) = b.core.add_host(&b.admin, "kvm-02", "kvm-02:7444").unwrap();
    b.store
        .tamper("UPDATE hosts SET token_expires = 1 WHERE name = 'kvm-02'")
        .unwrap();
    let before = b.snapshot();
    let e = b.core.enroll(&token, &csr(), &sealing()).unwrap_err();
    assert!(
        e.to_string()
            .contains("the token of host kvm-02 has expired"),
        "{e}"
    );
    assert_eq!(b.snapshot(), before);
    assert_eq!(
        b.core.get_host("kvm-02").unwrap().state,
        HostState::PendingEnrollment
    );
}

#[test]
fn a_token_used_concurrently_enrolls_exactly_once() {
    let b = Bed::new();
    let (_, token, _) = b.core.add_host(&b.admin, "kvm-03", "kvm-03:7444").unwrap();
    let core = b.core.clone();
    let token = Arc::new(token);
    let start = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (core, token, start) = (core.clone(), token.clone(), start.clone());
            let (csr, key) = (csr(), sealing());
            std::thread::spawn(move || {
                start.wait();
                core.enroll(&token, &csr, &key)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        let e = e.to_string();
        assert!(
            e.contains("token is not valid") || e.contains("used concurrently"),
            "{e}"
        );
    }
    let enrolled = b.actions().iter().filter(|a| *a == "host.enrolled").count();
    assert_eq!(enrolled, 1);
}

#[test]
fn revocation_and_host_input_are_checked() {
    let b = Bed::new();
    b.host("kvm-r");
    for (name, address, want) in [
        ("bad/name", "h:1", "invalid host name"),
        ("h", "nowhere", "invalid address \"nowhere\": use HOST:PORT"),
        ("kvm-r", "h:1", "host kvm-r already exists"),
    ] {
        let e = b.core.add_host(&b.admin, name, address).unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    let h = b.core.revoke_host(&b.admin, "kvm-r").unwrap();
    assert_eq!(h.state, HostState::Revoked);
    let e = b.core.revoke_host(&b.admin, "kvm-r").unwrap_err();
    assert!(e.to_string().contains("already revoked"), "{e}");
    let e = b.core.revoke_host(&b.admin, "nope").unwrap_err();
    assert!(matches!(e, CoreError::NotFound(_)), "{e}");
    // Its certificate no longer identifies anyone.
    let cert = b.core.get_host("kvm-r").unwrap().certificate_sha256;
    assert_eq!(b.core.identify(&cert).unwrap(), None);
}
