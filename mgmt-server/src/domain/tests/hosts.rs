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

/// A host may not take one of the server's names (its certificate's SANs,
/// here kms.example and 10.0.0.5, or guestkey-server, guestkey-admin,
/// localhost), in its name or, as a DNS name, in its address: refused by
/// name, in any case, changing nothing. IP addresses may be shared.
#[test]
fn a_host_named_like_the_server_is_refused_and_nothing_changes() {
    let b = Bed::new();
    let before = b.snapshot();
    let records = b.actions().len();
    for (name, address, what, clash) in [
        (
            "localhost",
            "10.0.0.9:7444",
            "host name \"localhost\"",
            "localhost",
        ),
        (
            "LocalHost",
            "10.0.0.9:7444",
            "host name \"LocalHost\"",
            "localhost",
        ),
        (
            "guestkey-server",
            "10.0.0.9:7444",
            "host name",
            "guestkey-server",
        ),
        (
            "guestkey-admin",
            "10.0.0.9:7444",
            "host name",
            "guestkey-admin",
        ),
        ("KMS.example", "10.0.0.9:7444", "host name", "kms.example"),
        ("10.0.0.5", "10.0.0.9:7444", "host name", "10.0.0.5"),
        (
            "kvm-01",
            "localhost:7444",
            "address \"localhost:7444\"",
            "localhost",
        ),
        ("kvm-01", "Kms.Example:7444", "address", "kms.example"),
    ] {
        let e = b.core.add_host(&b.admin, name, address).unwrap_err();
        assert!(matches!(e, CoreError::Invalid(_)), "{e}");
        let e = e.to_string();
        assert!(
            e.starts_with(&format!("invalid {what}"))
                && e.contains(&format!("one of the management server's names ({clash})")),
            "{name} {address}: {e}"
        );
    }
    assert_eq!(b.snapshot(), before, "refusals change nothing");
    assert_eq!(b.actions().len(), records);
    // The server's IP address is no name of the host's: hosts may share
    // the server's machine (the tests put every host on 127.0.0.1).
    b.core
        .add_host(&b.admin, "kvm-01", "10.0.0.5:7444")
        .unwrap();
    b.core
        .add_host(&b.admin, "kvm-02", "kvm-02.example:7444")
        .unwrap();
}

#[test]
fn a_hosts_tpm_report_is_kept_when_plausible_and_refused_otherwise() {
    use crate::model::HostTpm;
    let b = Bed::new();
    let (_, token, _) = b.core.add_host(&b.admin, "kvm-01", "kvm-01:7444").unwrap();
    b.core.enroll(&token, &csr(), &sealing()).unwrap();
    assert_eq!(b.core.get_host("kvm-01").unwrap().tpm, None);
    let good = HostTpm {
        tcti: "device:/dev/tpmrm0".into(),
        pcrs: "sha256:7".into(),
        authority: "3f1c9a0b7d2e4f55".into(),
        current: vec![(7, "ab".repeat(32))],
        approvals: 1,
        unseals: true,
        reported_unix: 0,
    };
    let before = b.snapshot();
    for (bad, says) in [
        (
            HostTpm {
                current: vec![(24, "ab".repeat(32))],
                ..good.clone()
            },
            "PCR 24 is not a SHA-256 PCR reading",
        ),
        (
            HostTpm {
                current: vec![(7, "xyz".into())],
                ..good.clone()
            },
            "PCR 7 is not a SHA-256 PCR reading",
        ),
        (
            HostTpm {
                tcti: "x".repeat(300),
                ..good.clone()
            },
            "longer than a TPM report's",
        ),
        (
            HostTpm {
                current: (0..25).map(|p| (p % 24, "ab".repeat(32))).collect(),
                ..good.clone()
            },
            "more than 24 PCRs",
        ),
    ] {
        let e = b.core.record_tpm("kvm-01", bad).unwrap_err();
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
    assert_eq!(b.snapshot(), before, "refused reports change nothing");
    b.core.record_tpm("kvm-01", good.clone()).unwrap();
    let kept = b.core.get_host("kvm-01").unwrap().tpm.unwrap();
    assert_eq!(kept.current, good.current);
    assert!(kept.unseals);
    assert!(kept.reported_unix > 0);
}

#[test]
fn database_failures_are_counted_for_the_metrics() {
    let b = Bed::new();
    let c = b.core.counters();
    b.core.add_host(&b.admin, "kvm-01", "kvm-01:7444").unwrap();
    b.core.list_hosts().unwrap();
    assert_eq!(c.store_failures.get(), 0);
    // The audit table gone: an action that must be audited fails (at its
    // audit write, or at the commit where the store pipelines writes).
    b.store
        .tamper("ALTER TABLE audit RENAME TO audit_gone")
        .unwrap();
    let e = b
        .core
        .add_host(&b.admin, "kvm-02", "kvm-02:7444")
        .unwrap_err();
    assert!(matches!(e, CoreError::Store(_)), "{e}");
    assert_eq!(c.store_failures.get(), 1);
    // A refusal of bad input is not a failure of the database.
    b.store
        .tamper("ALTER TABLE audit_gone RENAME TO audit")
        .unwrap();
    assert!(b.core.add_host(&b.admin, "bad name!", "x:1").is_err());
    assert!(b.core.get_host("no-such-host").is_err());
    assert_eq!(c.store_failures.get(), 1);
}
