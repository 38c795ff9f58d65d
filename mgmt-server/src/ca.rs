//! The server's certificate authority: it signs the server's TLS
//! certificate, the admin client certificate and, at enrollment, each host's
//! certificate. Peers are then recognised by the SHA-256 of their
//! certificate, recorded when it was signed.
//!
//! The CA key is kept by a [`guestkey_protect::KeyProtector`] (today the
//! file `ca/ca.key`, PEM text, mode 0600), so a TPM protector can keep it
//! instead. A leaf module: imports nothing of this crate.

use guestkey_protect::{Encoding, KeyProtector, ProtectedKey, ProtectorSpec};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// Certificates and keys in PEM.
pub struct IssuedPem {
    /// Certificate.
    pub cert: String,
    /// Private key (absent when signing a CSR: the key stays with its owner).
    pub key: Option<zeroize::Zeroizing<String>>,
    /// SHA-256 of the DER certificate, hex.
    pub sha256: String,
}

/// Certificate errors.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA key's protector could not store or hand out the key.
    #[error(transparent)]
    Protect(#[from] guestkey_protect::ProtectError),
    /// The CA key is not PEM text.
    #[error("the CA key from {0} is not PEM text")]
    NotText(String),
    /// rcgen failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A CSR did not parse or its signature is wrong.
    #[error("the certificate signing request is not a valid PKCS#10 request: {0}")]
    BadCsr(rcgen::Error),
    /// A stored CA file did not parse.
    #[error("the CA files in the data directory do not parse: {0}")]
    BadCaFiles(rcgen::Error),
}

/// Hex SHA-256 of a DER certificate.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Validity of leaf certificates.
pub const LEAF_VALIDITY_DAYS: i64 = 397;

fn leaf_params(
    common_name: &str,
    sans: Vec<String>,
    days: i64,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.remove(DnType::CommonName);
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(days);
    Ok(p)
}

/// The CA: certificate and signing key.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `guestkey CA (<label>)`.
    pub fn generate(label: &str) -> Result<(Self, zeroize::Zeroizing<String>), CaError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.remove(DnType::CommonName);
        p.distinguished_name
            .push(DnType::CommonName, format!("guestkey CA ({label})"));
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(3650);
        let cert = p.self_signed(&key)?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok((
            Self {
                cert_pem: cert.pem(),
                issuer: Issuer::new(p, key),
            },
            key_pem,
        ))
    }

    /// The protector of the CA key named by `source` (PEM bytes as they are).
    pub fn key_protector(source: &ProtectorSpec) -> Box<dyn KeyProtector> {
        source.protector(Encoding::Raw, "guestkey CA key")
    }

    /// Loads the CA from its certificate (PEM) and the key its protector
    /// keeps.
    pub fn load(cert_pem: &str, key_source: &ProtectorSpec) -> Result<Self, CaError> {
        let key = Self::key_protector(key_source).unseal()?;
        let key_pem = std::str::from_utf8(key.expose_secret())
            .map_err(|_| CaError::NotText(key_source.to_string()))?;
        Self::from_pem(cert_pem, key_pem)
    }

    /// Stores a new CA key (PEM) where `key_source` names; never overwrites.
    pub fn store_key(key_pem: &str, key_source: &ProtectorSpec) -> Result<(), CaError> {
        let key = ProtectedKey::copy_from_secret_slice(key_pem.as_bytes());
        Ok(Self::key_protector(key_source).create(&key)?)
    }

    /// Loads the CA from its PEM files' contents.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::BadCaFiles)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::BadCaFiles)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key pair and certificate for `common_name` with `sans`.
    pub fn issue(
        &self,
        common_name: &str,
        sans: Vec<String>,
        days: i64,
    ) -> Result<IssuedPem, CaError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(common_name, sans, days)?.signed_by(&key, &self.issuer)?;
        Ok(IssuedPem {
            sha256: cert_sha256(cert.der()),
            cert: cert.pem(),
            key: Some(zeroize::Zeroizing::new(key.serialize_pem())),
        })
    }

    /// Signs a host's CSR. Only the public key is taken from the request:
    /// name, SANs, usages and validity are the server's choice.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        common_name: &str,
        sans: Vec<String>,
    ) -> Result<IssuedPem, CaError> {
        let mut csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(CaError::BadCsr)?;
        csr.params = leaf_params(common_name, sans, LEAF_VALIDITY_DAYS)?;
        let cert = csr.signed_by(&self.issuer)?;
        Ok(IssuedPem {
            sha256: cert_sha256(cert.der()),
            cert: cert.pem(),
            key: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_requests_are_not_trusted() {
        let (ca, _) = Ca::generate("test").unwrap();
        let host_key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        asked.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        let csr = asked.serialize_request(&host_key).unwrap();
        let issued = ca
            .sign_csr(csr.der(), "kvm-01", vec!["kvm-01".into()])
            .unwrap();
        let der = rustls_pemfile_der(&issued.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec!["DNSName(kvm-01)"]);
        assert!(ca.sign_csr(b"not a csr", "x", vec![]).is_err());
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
