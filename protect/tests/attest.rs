//! Remote attestation against a real TPM 2.0 implementation (`swtpm`, one
//! simulator per TPM: the only stand-in, since a test cannot extend or
//! clear a real TPM): the host's side through tss-esapi, the verifier's in
//! software, as the server runs it.

#![allow(clippy::unwrap_used)]

use guestkey_protect::tpm::attest::{AttestationKey, Quote};
use guestkey_protect::tpm::verify::{AttestationKeyPublic, EndorsementKey, VerifyError};
use guestkey_protect::tpm::{DEADLINE, PcrSelection, PcrValue, with_tpm};
use guestkey_testkit::Swtpm;

fn on<T: Send + 'static>(
    tpm: &Swtpm,
    f: impl FnOnce(&mut guestkey_protect::tpm::Tpm) -> Result<T, guestkey_protect::tpm::TpmError>
    + Send
    + 'static,
) -> T {
    with_tpm(&tpm.tcti(), DEADLINE, f).unwrap()
}

fn copy(k: &AttestationKey) -> AttestationKey {
    AttestationKey {
        public: k.public.clone(),
        private: k.private.clone(),
    }
}

/// An enrolled host: its EK read, its AK made and proven.
fn enrolled(tpm: &Swtpm) -> (AttestationKey, AttestationKeyPublic) {
    let ek = on(tpm, |t| t.endorsement());
    let ak = on(tpm, |t| t.create_attestation_key());
    let ek_v = EndorsementKey::read(&ek.public).unwrap();
    let ak_v = AttestationKeyPublic::read(&ak.public).unwrap();
    let credential = [7u8; 32];
    let (blob, secret) = ek_v.make_credential(ak_v.name(), &credential).unwrap();
    let k = copy(&ak);
    let got = on(tpm, move |t| t.activate_credential(&k, &blob, &secret));
    assert_eq!(&got[..], &credential[..]);
    (ak, ak_v)
}

fn quote(tpm: &Swtpm, ak: &AttestationKey, nonce: &[u8], sel: &PcrSelection) -> Quote {
    let (k, n, s) = (copy(ak), nonce.to_vec(), sel.clone());
    on(tpm, move |t| t.quote(&k, &n, &s))
}

#[test]
fn the_ek_is_the_same_key_every_time_and_the_credential_opens_only_on_its_tpm() {
    let tpm = Swtpm::start();
    let a = on(&tpm, |t| t.endorsement());
    let b = on(&tpm, |t| t.endorsement());
    assert_eq!(a.public, b.public, "the EK is derived from the TPM's seed");
    let (ak, ak_v) = enrolled(&tpm);

    // A credential for this AK, made for another TPM's EK: this TPM cannot
    // open it.
    let other = Swtpm::start();
    let other_ek = EndorsementKey::read(&on(&other, |t| t.endorsement()).public).unwrap();
    let (blob, secret) = other_ek.make_credential(ak_v.name(), &[1u8; 32]).unwrap();
    let k = copy(&ak);
    let r = with_tpm(&tpm.tcti(), DEADLINE, move |t| {
        t.activate_credential(&k, &blob, &secret)
    });
    assert!(r.is_err(), "a credential for another EK opened");

    // This TPM's EK, but bound to another key's name: refused by the TPM.
    let ek_v = EndorsementKey::read(&a.public).unwrap();
    let mut name = ak_v.name().to_vec();
    name[5] ^= 1;
    let (blob, secret) = ek_v.make_credential(&name, &[1u8; 32]).unwrap();
    let k = copy(&ak);
    let r = with_tpm(&tpm.tcti(), DEADLINE, move |t| {
        t.activate_credential(&k, &blob, &secret)
    });
    assert!(r.is_err(), "a credential for another key's name opened");

    // The AK's files are of no use on another TPM.
    let k = copy(&ak);
    let r = with_tpm(&other.tcti(), DEADLINE, move |t| {
        t.quote(&k, b"nonce", &PcrSelection::default_selection())
    });
    let e = r.err().expect("another TPM loaded this AK").to_string();
    assert!(e.contains("another TPM"), "{e}");
}

#[test]
fn a_quote_verifies_and_every_alteration_is_refused() {
    let tpm = Swtpm::start();
    let (ak, ak_v) = enrolled(&tpm);
    let sel = PcrSelection::new([0, 7, 10]).unwrap();
    let nonce = [9u8; 32];
    let q = quote(&tpm, &ak, &nonce, &sel);
    let facts = ak_v
        .check_quote(&nonce, &sel, &q.attest, &q.signature, &q.values)
        .unwrap();

    // A replay: the quote of another challenge.
    let e = ak_v
        .check_quote(&[8u8; 32], &sel, &q.attest, &q.signature, &q.values)
        .unwrap_err();
    assert!(matches!(e, VerifyError::WrongNonce(_)), "{e}");

    // Values that are not what the TPM signed.
    let forged = q.values.clone().with(10, PcrValue([1u8; 32]));
    let e = ak_v
        .check_quote(&nonce, &sel, &q.attest, &q.signature, &forged)
        .unwrap_err();
    assert!(matches!(e, VerifyError::DigestMismatch(_)), "{e}");

    // A tampered quote, a tampered signature.
    let mut attest = q.attest.clone();
    let last = attest.len() - 1;
    attest[last] ^= 1;
    let e = ak_v
        .check_quote(&nonce, &sel, &attest, &q.signature, &q.values)
        .unwrap_err();
    assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");
    let mut sig = q.signature.clone();
    sig[10] ^= 1;
    let e = ak_v
        .check_quote(&nonce, &sel, &q.attest, &sig, &q.values)
        .unwrap_err();
    assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");

    // Another selection than the one asked for.
    let e = ak_v
        .check_quote(
            &nonce,
            &PcrSelection::new([0, 7]).unwrap(),
            &q.attest,
            &q.signature,
            &q.values,
        )
        .unwrap_err();
    assert!(matches!(e, VerifyError::WrongSelection(_)), "{e}");

    // Another host's AK signed it.
    let other = Swtpm::start();
    let (other_ak, _) = enrolled(&other);
    let q2 = quote(&other, &other_ak, &nonce, &sel);
    let e = ak_v
        .check_quote(&nonce, &sel, &q2.attest, &q2.signature, &q2.values)
        .unwrap_err();
    assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");

    // After a software change (a PCR extended), a fresh quote verifies but
    // carries the new value; and the clock went forward.
    tpm.extend(10, b"new kernel");
    let q3 = quote(&tpm, &ak, &nonce, &sel);
    let later = ak_v
        .check_quote(&nonce, &sel, &q3.attest, &q3.signature, &q3.values)
        .unwrap();
    assert_eq!(q.values.differences(&q3.values), vec![10]);
    assert_eq!(later.goes_back_from(&facts), None);
    assert!(facts.goes_back_from(&later).is_some() || facts == later);
}

#[test]
fn keys_whose_quotes_mean_nothing_are_refused() {
    let tpm = Swtpm::start();
    let ak = on(&tpm, |t| t.create_attestation_key());
    // objectAttributes are bytes 4..8 of TPMT_PUBLIC.
    let flip = |bit: u32| {
        let mut p = ak.public.clone();
        let mut a = u32::from_be_bytes(p[4..8].try_into().unwrap());
        a ^= bit;
        p[4..8].copy_from_slice(&a.to_be_bytes());
        p
    };
    for (bit, what) in [
        (1 << 16, "restricted"),
        (1 << 1, "fixed to its TPM"),
        (1 << 5, "made inside the TPM"),
        (1 << 17, "a decryption key"),
    ] {
        let e = AttestationKeyPublic::read(&flip(bit)).err().unwrap();
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    let mut long = ak.public.clone();
    long.push(0);
    let e = AttestationKeyPublic::read(&long).err().unwrap();
    assert!(e.to_string().contains("after its end"), "{e}");
    let e = AttestationKeyPublic::read(&ak.public[..20]).err().unwrap();
    assert!(e.to_string().contains("ends inside"), "{e}");
    // An EK is not an AK, and the other way round.
    let ek = on(&tpm, |t| t.endorsement());
    assert!(AttestationKeyPublic::read(&ek.public).is_err());
    assert!(EndorsementKey::read(&ak.public).is_err());
}

#[test]
fn every_one_byte_change_or_cut_of_a_quote_or_key_is_refused_without_a_panic() {
    let tpm = Swtpm::start();
    let (ak, ak_v) = enrolled(&tpm);
    let sel = PcrSelection::new([0, 7]).unwrap();
    let nonce = [5u8; 32];
    let q = quote(&tpm, &ak, &nonce, &sel);
    ak_v.check_quote(&nonce, &sel, &q.attest, &q.signature, &q.values)
        .unwrap();
    for i in 0..q.attest.len() {
        let mut a = q.attest.clone();
        a[i] ^= 0x5a;
        assert!(
            ak_v.check_quote(&nonce, &sel, &a, &q.signature, &q.values)
                .is_err(),
            "quote byte {i} changed and still accepted"
        );
        assert!(
            ak_v.check_quote(&nonce, &sel, &q.attest[..i], &q.signature, &q.values)
                .is_err()
        );
    }
    for i in 0..q.signature.len() {
        let mut s = q.signature.clone();
        s[i] ^= 0x5a;
        assert!(
            ak_v.check_quote(&nonce, &sel, &q.attest, &s, &q.values)
                .is_err(),
            "signature byte {i} changed and still accepted"
        );
        assert!(
            ak_v.check_quote(&nonce, &sel, &q.attest, &q.signature[..i], &q.values)
                .is_err()
        );
    }
    // Keys: any change either is refused or reads as another key, and
    // another key's name differs (so a credential for it would not open).
    for i in 0..ak.public.len() {
        let mut p = ak.public.clone();
        p[i] ^= 0x5a;
        if let Ok(k) = AttestationKeyPublic::read(&p) {
            assert_ne!(k.name(), ak_v.name(), "byte {i}");
        }
        let _ = EndorsementKey::read(&p);
        assert!(AttestationKeyPublic::read(&ak.public[..i]).is_err());
    }
}

/// A CA that signs EK certificates (a TPM manufacturer's, in a test).
fn ek_ca(name: &str) -> (Vec<u8>, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = p.self_signed(&key).unwrap();
    (cert.der().to_vec(), rcgen::Issuer::new(p, key))
}

/// An EK certificate for the key in `spki_der`, signed by `issuer`, valid
/// from the start of year `from` to the start of year `to`.
fn ek_certificate(
    spki_der: &[u8],
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    from: i32,
    to: i32,
) -> Vec<u8> {
    let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_der).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.not_before = rcgen::date_time_ymd(from, 1, 1);
    p.not_after = rcgen::date_time_ymd(to, 1, 1);
    p.signed_by(&spki, issuer).unwrap().der().to_vec()
}

#[test]
fn an_ek_certificate_counts_only_for_its_own_ek_and_from_its_manufacturers_ca() {
    let tpm = Swtpm::start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ek = EndorsementKey::read(&on(&tpm, |t| t.endorsement()).public).unwrap();
    let (ca_der, ca) = ek_ca("TPM manufacturer EK CA");
    let cert = ek_certificate(&ek.public_key_der(), &ca, 2020, 2100);
    // As a manufacturer does: in the TPM's NV memory, read back with the EK.
    tpm.write_ek_certificate(&cert);
    let read = on(&tpm, |t| t.endorsement());
    assert_eq!(read.certificate.as_deref(), Some(cert.as_slice()));
    let signer = ek
        .check_certificate(&cert, std::slice::from_ref(&ca_der), now)
        .unwrap();
    assert!(signer.contains("TPM manufacturer EK CA"), "{signer}");

    let refused = |cert: &[u8], anchors: &[Vec<u8>]| {
        let e = ek.check_certificate(cert, anchors, now).unwrap_err();
        assert!(matches!(e, VerifyError::Certificate(_)), "{e:?}");
        e.to_string()
    };
    // Another CA (also one of the same name).
    let (other_der, _) = ek_ca("TPM manufacturer EK CA");
    let e = refused(&cert, std::slice::from_ref(&other_der));
    assert!(e.contains("not signed by a CA of the EK CA file"), "{e}");
    // The right CA's certificate for another TPM's EK.
    let other_tpm = Swtpm::start();
    let other_ek = EndorsementKey::read(&on(&other_tpm, |t| t.endorsement()).public).unwrap();
    let e = refused(
        &ek_certificate(&other_ek.public_key_der(), &ca, 2020, 2100),
        std::slice::from_ref(&ca_der),
    );
    assert!(e.contains("for another key"), "{e}");
    // Expired, and not a certificate at all.
    let e = refused(
        &ek_certificate(&ek.public_key_der(), &ca, 2000, 2001),
        std::slice::from_ref(&ca_der),
    );
    assert!(e.contains("not valid now"), "{e}");
    let e = refused(b"not a certificate", std::slice::from_ref(&ca_der));
    assert!(e.contains("does not parse"), "{e}");
}
