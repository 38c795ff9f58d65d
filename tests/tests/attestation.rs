//! Release gates, attestation, end to end: the real server, guestkeyd and
//! hook, real libvirtd/KVM guests, and a TPM simulator per host (`swtpm`,
//! the only stand-in: a test cannot extend a real TPM's PCRs).
//!
//! The verifier's refusals of forged quotes (a replayed nonce, another
//! host's AK, values that are not the quote's, a tampered signature) are
//! shown against swtpm in `protect/tests/attest.rs`; here, that a host's
//! keys follow its quotes.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use guestkey_testkit::Swtpm;
use guestkey_testkit::cleanup::Made;
use guestkey_tests::stack::Stack;
use guestkey_tests::{virsh, volume_domain_xml};

/// Short retries: a held-back push goes out soon after the admin acts.
const CONFIG: &str = "[retry]\ninitial_delay_ms = 200\nmax_delay_ms = 1000\n";

fn d(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Audit records of `action` about `subject`.
fn audited(s: &Stack, action: &str, subject: &str) -> usize {
    s.audit(action)
        .iter()
        .filter(|r| r["subject"] == subject)
        .count()
}

fn volume(s: &Stack, name: &str) -> serde_json::Value {
    s.json(&["volume", "show", name])
}

#[test]
fn an_attested_volume_goes_only_to_a_host_whose_fresh_quote_its_allowlist_names() {
    let tpm = Swtpm::start();
    let dir = guestkey_testkit::temp_dir("tpm-authority");
    let _gone = Made::dir(&dir);
    let s = Stack::start_configured(
        &[
            "--tpm".into(),
            "--tpm-tcti".into(),
            tpm.tcti(),
            "--tpm-authority-key".into(),
            d(&dir.join("authority.pk8")).into(),
        ],
        Some(CONFIG),
    );
    // Enrollment bound the host to its TPM: the AK was proven to live in
    // the TPM of the EK (TPM2_ActivateCredential) and pinned.
    let h = s.json(&["host", "show", &s.host]);
    assert_eq!(h["attestation"]["pinned"], true, "{h}");
    assert_eq!(h["attestation"]["allowlist_version"], 0, "{h}");
    assert_eq!(audited(&s, "host.attestation_key_pinned", &s.host), 1);
    for f in ["ak.pub", "ak.priv", "tcti"] {
        assert!(s.state_dir().join("attestation").join(f).exists(), "{f}");
    }

    // Without an allowlist an attested volume waits: no key goes out.
    s.json(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "att-disk",
        "--size",
        "16M",
        "--release",
        "attested",
        "--no-wait",
    ]);
    let id = volume(&s, "att-disk")["id"].as_str().unwrap().to_owned();
    s.wait_for(30, "the create held back for the allowlist", || {
        volume(&s, "att-disk")["last_error"]
            .as_str()
            .unwrap()
            .contains("has no attestation allowlist")
    });
    assert_eq!(volume(&s, "att-disk")["state"], "pending-create");
    assert_eq!(audited(&s, "key.released", &id), 0, "a key went out");

    // The admin learns the host's values from a verified quote: the
    // volume is made.
    let a = s.json(&[
        "attestation",
        "allow",
        "--host",
        &s.host,
        "--learn",
        "--learn-pcrs",
        "0,7,10",
    ]);
    assert_eq!(a["version"], 1, "{a}");
    assert_eq!(a["pcrs"].as_array().unwrap().len(), 3, "{a}");
    s.wait_for(60, "the attested volume made", || {
        volume(&s, "att-disk")["state"] == "ready"
    });
    assert_eq!(volume(&s, "att-disk")["release"], "attested");
    let h = s.json(&["host", "show", &s.host]);
    assert_eq!(h["attestation"]["last_ok"], true, "{h}");
    assert!(h["attestation"]["fresh_until_unix"].as_i64().unwrap() > 0);

    // A guest on it is defined: the host gets no key of the volume to
    // keep. Each start asks the server, which attests the host first.
    let guest = format!("gk-test-{}-att", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "att-disk", "qcow2"),
    );
    assert_eq!(audited(&s, "key.released", &id), 1, "only the create's");
    let attested = audited(&s, "host.attested", &s.host);
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();
    assert_eq!(audited(&s, "key.released", &id), 2, "the start's");
    assert_eq!(audited(&s, "host.attested", &s.host), attested + 1);

    // A software change on the host: PCR 10 is extended. The next start
    // fails closed, and the virsh user reads which PCR and what to run.
    tpm.extend(10, b"an unexpected kernel module");
    let hint = format!("guestkeyctl attestation allow --host {} --pcr 10=", s.host);
    let e = virsh(&["start", &guest]).unwrap_err().0;
    assert!(e.contains("PCR 10 is ") && e.contains(&hint), "{e}");
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "shut off");
    assert_eq!(audited(&s, "key.released", &id), 2, "a key went out");
    let out = s.ctl(&["host", "attest", &s.host]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the changed host passed attestation");
    assert!(err.contains("PCR 10 is "), "{err}");
    assert!(err.contains(&hint), "{err}");
    let h = s.json(&["host", "show", &s.host]);
    assert_eq!(h["attestation"]["last_ok"], false, "{h}");
    assert_eq!(
        h["attestation"]["differing"],
        serde_json::json!([10]),
        "{h}"
    );
    assert_eq!(h["attestation"]["fresh_until_unix"], 0, "{h}");
    assert!(audited(&s, "host.attestation_failed", &s.host) >= 1);

    // A rekey of the volume is held back: no key is released.
    let released = audited(&s, "key.released", &id);
    s.json(&["volume", "rekey", "att-disk", "--shallow"]);
    s.wait_for(30, "the rekey held back for attestation", || {
        volume(&s, "att-disk")["last_error"]
            .as_str()
            .unwrap()
            .contains("PCR 10 is ")
    });
    let v = volume(&s, "att-disk");
    assert_eq!(
        (v["state"].as_str(), v["key_generation"].as_u64()),
        (Some("rekeying"), Some(1))
    );
    assert_eq!(audited(&s, "key.released", &id), released, "a key went out");

    // The admin allows the new value (a new allowlist version): the rekey
    // goes through.
    let at = err.find(&hint).unwrap() + hint.len();
    let value = &err[at..at + 64];
    let a = s.json(&[
        "attestation",
        "allow",
        "--host",
        &s.host,
        "--pcr",
        &format!("10={value}"),
    ]);
    assert_eq!(a["version"], 2, "{a}");
    s.wait_for(60, "the rekey done", || {
        let v = volume(&s, "att-disk");
        v["state"] == "ready" && v["key_generation"] == 2
    });
    assert_eq!(
        audited(&s, "attestation.allowed", &format!("host:{}", s.host)),
        2
    );
    let shown = s.json(&["attestation", "show", "--host", &s.host]);
    assert_eq!(shown["pcrs"].as_array().unwrap().len(), 4, "{shown}");
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();

    // The whole host taken away (its TPM still unseals its store): without
    // the server its guest does not start, and the reason says so.
    let mut s = s;
    s.server.stop();
    let e = virsh(&["start", &guest]).unwrap_err().0;
    assert!(e.contains("released no key"), "{e}");
    s.run_server();
}

#[test]
fn a_host_enrolled_without_a_tpm_cannot_be_given_attested_volumes() {
    let s = Stack::start();
    let h = s.json(&["host", "show", &s.host]);
    assert!(h["attestation"].is_null(), "{h}");
    let out = s.ctl(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "no-tpm",
        "--size",
        "1M",
        "--release",
        "attested",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(err.contains("enrolled without a TPM"), "{err}");
    assert!(
        s.json(&["volume", "list"]).as_array().unwrap().is_empty(),
        "a volume was recorded"
    );
    let out = s.ctl(&["attestation", "allow", "--host", &s.host, "--learn"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(err.contains("no proven attestation key"), "{err}");
    let out = s.ctl(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "x",
        "--size",
        "1M",
        "--release",
        "sometimes",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("use auto, attested, approved or attested+approved"),
        "{err}"
    );
}

/// The EK (DER SubjectPublicKeyInfo) of the TPM behind `tpm`.
fn ek_spki(tpm: &Swtpm) -> Vec<u8> {
    use guestkey_protect::tpm::{DEADLINE, with_tpm};
    let ek = with_tpm(&tpm.tcti(), DEADLINE, |t| t.endorsement()).unwrap();
    guestkey_protect::tpm::verify::EndorsementKey::read(&ek.public)
        .unwrap()
        .public_key_der()
}

/// A TPM manufacturer's EK CA, in a test: its PEM, and a signer of EK
/// certificates.
fn manufacturer(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(p, key))
}

/// Puts an EK certificate that `issuer` signed into `tpm`'s NV memory.
fn give_ek_certificate(tpm: &Swtpm, issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) {
    let spki = rcgen::SubjectPublicKeyInfo::from_der(&ek_spki(tpm)).unwrap();
    let cert = rcgen::CertificateParams::default()
        .signed_by(&spki, issuer)
        .unwrap();
    tpm.write_ek_certificate(cert.der());
}

#[test]
fn with_an_ek_ca_only_tpms_with_an_ek_certificate_it_signed_enroll() {
    let dir = guestkey_testkit::temp_dir("ek-ca");
    let _gone = Made::dir(&dir);
    let (ca_pem, ca) = manufacturer("Test TPM Manufacturer EK CA");
    std::fs::write(dir.join("ek-ca.pem"), &ca_pem).unwrap();
    let tpm = Swtpm::start();
    give_ek_certificate(&tpm, &ca);
    let tpm_args = |tpm: &Swtpm, key: &str| -> Vec<String> {
        vec![
            "--tpm".into(),
            "--tpm-tcti".into(),
            tpm.tcti(),
            "--tpm-authority-key".into(),
            d(&dir.join(key)).into(),
        ]
    };
    let config = format!(
        "{CONFIG}[attestation]\nek_ca_file = \"{}\"\n",
        d(&dir.join("ek-ca.pem"))
    );
    let s = Stack::start_configured(&tpm_args(&tpm, "authority.pk8"), Some(&config));
    let enrolled = s.audit("host.enrolled");
    assert!(
        enrolled.iter().any(|r| r["subject"] == s.host
            && r["detail"]
                .as_str()
                .unwrap()
                .contains("its EK certificate signed by CN=Test TPM Manufacturer EK CA")),
        "{enrolled:?}"
    );

    // A TPM without a certificate, or with one of another CA: refused,
    // and the token stays good.
    let other = Swtpm::start();
    let name = guestkey_tests::unique_name("ekless");
    let token = s.json(&["host", "add", &name, "--address", "127.0.0.1:9"])["enrollment_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = dir.join("ekless");
    let enroll = || {
        let mut child = std::process::Command::new(guestkey_tests::stack::bin("guestkeyd"))
            .args([
                "enroll",
                "--server",
                s.server_url(),
                "--token-file",
                "-",
                "--ca-file",
            ])
            .arg(s.dir.join("ca.pem"))
            .arg("--state-dir")
            .arg(&state)
            .args(tpm_args(&other, "authority2.pk8"))
            .env("TSS2_LOG", "all+none")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), token.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let _ = std::fs::remove_dir_all(&state);
        o
    };
    let o = enroll();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(
        e.contains("has no EK certificate") && e.contains("attestation.ek_ca_file"),
        "{e}"
    );
    let (_, stranger) = manufacturer("Test TPM Manufacturer EK CA");
    give_ek_certificate(&other, &stranger);
    let o = enroll();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(e.contains("not signed by a CA of the EK CA file"), "{e}");
    assert_eq!(
        s.json(&["host", "show", &name])["state"],
        "pending-enrollment"
    );
}
