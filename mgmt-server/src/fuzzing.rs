//! The enrollment request's outside input, checked for the fuzz target
//! (`mgmt-server/fuzz`, built with `--cfg fuzzing`) and the unit tests,
//! which run the same check over the committed seeds.
//!
//! An enrollment request is a one-time token, a PKCS#10 request (DER) and
//! a 32-byte X25519 sealing key, from a peer with no certificate. For any
//! bytes: nothing panics; a sealing key is accepted only at 32 bytes and of
//! high order; a CSR is accepted only with a valid self-signature, and the
//! certificate issued for it has exactly the server's name, SANs and usages
//! and the CSR's public key, whatever the CSR asked for.

#![allow(missing_docs)]

use std::sync::OnceLock;

use x509_parser::prelude::FromDer;

use crate::ca::Ca;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        Ca::generate(crate::ca::Role::Host, "fuzz")
            .map(|(ca, _)| ca)
            .unwrap_or_else(|e| panic!("test CA: {e}"))
    })
}

/// Splits fuzz input into (token, CSR DER, sealing key): one length byte
/// and the token, two length bytes (big-endian) and the CSR, the rest.
pub fn split(data: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&t, rest) = data.split_first()?;
    let (token, rest) = rest.split_at_checked(usize::from(t))?;
    let (len, rest) = rest.split_at_checked(2)?;
    let (csr, key) = rest.split_at_checked(usize::from(u16::from_be_bytes([len[0], len[1]])))?;
    Some((token, csr, key))
}

/// The check; returns whether the CSR was signed.
pub fn enrollment_request(data: &[u8]) -> bool {
    let Some((token, csr, key)) = split(data) else {
        return false;
    };
    let _ = String::from_utf8_lossy(token);
    match xdr_wipe::seal::HostPublicKey::from_bytes(key) {
        Ok(k) => assert_eq!(k.as_bytes().as_slice(), key, "the key is the one given"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let sans = vec!["fuzz-host".to_owned(), "127.0.0.1".to_owned()];
    let Ok(issued) = ca().sign_csr(csr, "fuzz-host", sans) else {
        return false;
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert.as_bytes())
        .unwrap_or_else(|e| panic!("issued PEM: {e}"));
    let cert = pem
        .parse_x509()
        .unwrap_or_else(|e| panic!("issued certificate: {e}"));
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .unwrap_or_else(|e| panic!("a CSR the CA signed does not parse: {e}"));
    assert_eq!(
        cert.public_key().raw,
        req.certification_request_info.subject_pki.raw,
        "the certificate holds the CSR's key"
    );
    assert!(!cert.is_ca(), "a CSR got CA rights");
    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .filter_map(|c| c.as_str().ok())
        .collect();
    assert_eq!(cn, vec!["fuzz-host"], "the name is the server's choice");
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        sans,
        vec!["DNSName(fuzz-host)", "IPAddress(7f:00:00:01)"],
        "the SANs are the server's choice"
    );
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        assert!(
            !eku.value.code_signing && !eku.value.any,
            "usages are the server's choice"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/enroll")
    }

    fn encode(token: &[u8], csr: &[u8], key: &[u8]) -> Vec<u8> {
        let mut v = vec![token.len() as u8];
        v.extend_from_slice(token);
        v.extend_from_slice(&(csr.len() as u16).to_be_bytes());
        v.extend_from_slice(csr);
        v.extend_from_slice(key);
        v
    }

    #[test]
    fn seed_corpus_passes_the_check() {
        let (mut seen, mut signed) = (0, 0);
        for e in std::fs::read_dir(seeds()).unwrap() {
            seen += 1;
            signed += usize::from(enrollment_request(
                &std::fs::read(e.unwrap().path()).unwrap(),
            ));
        }
        assert!(seen >= 4 && signed >= 2, "{seen} seeds, {signed} signed");
    }

    /// Writes the seeds: `cargo test -p mgmt-server --lib write_enroll_seeds -- --ignored`.
    #[test]
    #[ignore]
    fn write_enroll_seeds() {
        let d = seeds();
        std::fs::create_dir_all(&d).unwrap();
        let key = xdr_wipe::seal::HostSealingKey::generate().public_key();
        let pair = rcgen::KeyPair::generate().unwrap();
        let mut asked = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        asked.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
        let evil = asked.serialize_request(&pair).unwrap();
        let plain = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&pair)
            .unwrap();
        let mut broken = plain.der().to_vec();
        let n = broken.len();
        broken[n - 3] ^= 1;
        for (name, data) in [
            ("plain", encode(b"gkt_token", plain.der(), key.as_bytes())),
            (
                "asks-for-code-signing",
                encode(b"gkt_token", evil.der(), key.as_bytes()),
            ),
            (
                "bad-signature",
                encode(b"gkt_token", &broken, key.as_bytes()),
            ),
            ("zero-key", encode(b"", plain.der(), &[0u8; 32])),
            ("short", vec![3, b'a']),
        ] {
            std::fs::write(d.join(name), data).unwrap();
        }
    }
}
