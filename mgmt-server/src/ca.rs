//! The server's certificate authorities, one per role: the hosts CA signs
//! each host's certificate at enrollment, the server CA only the server's
//! TLS certificate, the admin CA only admin client certificates. A
//! certificate's role is therefore told by the CA it chains to, and every
//! peer trusts only the CA of the role it expects (a host's key pair cannot
//! pass as the server). Peers are then recognised by the SHA-256 of their
//! certificate, recorded when it was signed, and pinned by clients.
//!
//! Each CA key is kept by a [`guestkey_protect::KeyProtector`] (today the
//! files `ca/ca.key`, `ca/server-ca.key`, `ca/admin-ca.key`, PEM text, mode
//! 0600), so a TPM protector can keep them instead. A leaf module: imports
//! nothing of this crate.

use guestkey_protect::{Encoding, KeyProtector, ProtectedKey, ProtectorSpec};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub use guestkey_pinned_tls::cert_sha256;

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
    /// A stored certificate did not parse.
    #[error("a certificate in the data directory does not parse: {0}")]
    BadCertificate(String),
}

/// The DNS names and IP addresses (as text) of a certificate (PEM): its
/// subject alternative names, what TLS checks.
pub fn subject_alt_names(cert_pem: &str) -> Result<Vec<String>, CaError> {
    use x509_parser::extensions::GeneralName;
    let bad = |why: String| CaError::BadCertificate(why);
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    let Some(sans) = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    else {
        return Ok(vec![]);
    };
    Ok(sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// Validity of leaf certificates.
pub const LEAF_VALIDITY_DAYS: i64 = 397;

/// What a certificate is for; each role has its own CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The management server: serves TLS to admins and hosts, and is the
    /// client of each host's host-agent API.
    Server,
    /// An admin: a client of the admin API only.
    Admin,
    /// A host: serves its host-agent API, and is a client of the host API.
    Host,
}

impl Role {
    /// The CA's name part and the leaves' organisational unit.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Admin => "admin",
            Role::Host => "hosts",
        }
    }

    fn usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Role::Server | Role::Host => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
    }
}

fn leaf_params(
    role: Role,
    common_name: &str,
    sans: Vec<String>,
    days: i64,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.remove(DnType::CommonName);
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.distinguished_name.push(
        DnType::OrganizationalUnitName,
        format!("guestkey {}", role.as_str()),
    );
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = role.usages();
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(days);
    Ok(p)
}

/// A CA: certificate and signing key. It signs certificates of its one
/// role.
pub struct Ca {
    role: Role,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// Where new certificate keys get their randomness: ring's generator, or
/// P-256 scalars from [`guestkey_protect::tpm::Entropy`] once
/// [`use_entropy`] was called (a data directory sealed to the TPM: `init`,
/// `migrate-roles`).
static ENTROPY: std::sync::OnceLock<guestkey_protect::tpm::Entropy> = std::sync::OnceLock::new();

/// New certificate keys mix in `e`'s bytes from now on (set once).
pub fn use_entropy(e: guestkey_protect::tpm::Entropy) {
    let _ = ENTROPY.set(e);
}

fn new_key_pair() -> Result<KeyPair, rcgen::Error> {
    match ENTROPY.get() {
        Some(e) => {
            let der = e
                .p256_pkcs8()
                .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
            KeyPair::try_from(der.as_slice())
        }
        None => KeyPair::generate(),
    }
}

impl Ca {
    /// A new self-signed CA of `role`, named `guestkey <role> CA (<label>)`.
    pub fn generate(
        role: Role,
        label: &str,
    ) -> Result<(Self, zeroize::Zeroizing<String>), CaError> {
        let key = new_key_pair()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.remove(DnType::CommonName);
        p.distinguished_name.push(
            DnType::CommonName,
            format!("guestkey {} CA ({label})", role.as_str()),
        );
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(3650);
        let cert = p.self_signed(&key)?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok((
            Self {
                role,
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

    /// Loads the CA of `role` from its certificate (PEM) and the key its
    /// protector keeps.
    pub fn load(role: Role, cert_pem: &str, key_source: &ProtectorSpec) -> Result<Self, CaError> {
        let key = Self::key_protector(key_source).unseal()?;
        let key_pem = std::str::from_utf8(key.expose_secret())
            .map_err(|_| CaError::NotText(key_source.to_string()))?;
        Self::from_pem(role, cert_pem, key_pem)
    }

    /// Stores a new CA key (PEM) where `key_source` names; never overwrites.
    pub fn store_key(key_pem: &str, key_source: &ProtectorSpec) -> Result<(), CaError> {
        let key = ProtectedKey::copy_from_secret_slice(key_pem.as_bytes());
        Ok(Self::key_protector(key_source).create(&key)?)
    }

    /// Loads the CA of `role` from its PEM files' contents.
    pub fn from_pem(role: Role, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::BadCaFiles)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::BadCaFiles)?;
        Ok(Self {
            role,
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The role of the certificates it signs.
    pub fn role(&self) -> Role {
        self.role
    }

    /// A new key pair and certificate of this CA's role for `common_name`
    /// with `sans`.
    pub fn issue(
        &self,
        common_name: &str,
        sans: Vec<String>,
        days: i64,
    ) -> Result<IssuedPem, CaError> {
        let key = new_key_pair()?;
        let cert =
            leaf_params(self.role, common_name, sans, days)?.signed_by(&key, &self.issuer)?;
        Ok(IssuedPem {
            sha256: cert_sha256(cert.der()),
            cert: cert.pem(),
            key: Some(zeroize::Zeroizing::new(key.serialize_pem())),
        })
    }

    /// Signs a host's CSR (a certificate of this CA's role: the hosts CA's
    /// is the only one that signs CSRs). Only the public key is taken from
    /// the request: name, SANs, usages and validity are the server's choice.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        common_name: &str,
        sans: Vec<String>,
    ) -> Result<IssuedPem, CaError> {
        let mut csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(CaError::BadCsr)?;
        csr.params = leaf_params(self.role, common_name, sans, LEAF_VALIDITY_DAYS)?;
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
        let (ca, _) = Ca::generate(Role::Host, "test").unwrap();
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
        assert_eq!(subject_alt_names(&issued.cert).unwrap(), vec!["kvm-01"]);
        let both = ca
            .issue(
                "s",
                vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
                1,
            )
            .unwrap();
        assert_eq!(
            subject_alt_names(&both.cert).unwrap(),
            vec!["localhost", "127.0.0.1", "::1"]
        );
        assert!(ca.sign_csr(b"not a csr", "x", vec![]).is_err());
    }

    /// Admin certificates are for client authentication only: they cannot
    /// serve TLS. Server and host certificates do both (the server calls
    /// hosts; hosts call the server).
    #[test]
    fn each_role_gets_its_usages_and_its_unit() {
        use x509_parser::extensions::ParsedExtension;
        for (role, server_auth) in [
            (Role::Server, true),
            (Role::Host, true),
            (Role::Admin, false),
        ] {
            let (ca, _) = Ca::generate(role, "test").unwrap();
            let issued = ca.issue("x", vec![], 10).unwrap();
            let der = rustls_pemfile_der(&issued.cert);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let eku = cert
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::ExtendedKeyUsage(u) => Some(u.clone()),
                    _ => None,
                })
                .unwrap();
            assert_eq!(eku.server_auth, server_auth, "{role:?}");
            assert!(eku.client_auth, "{role:?}");
            assert!(
                cert.subject()
                    .to_string()
                    .contains(&format!("guestkey {}", role.as_str())),
                "{}",
                cert.subject()
            );
            let (_, ca_cert) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
            let ca_cert = ca_cert.parse_x509().unwrap();
            assert!(
                ca_cert
                    .subject()
                    .to_string()
                    .contains(&format!("guestkey {} CA", role.as_str()))
            );
        }
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
