//! The verifier: webpki's checks (chain to the roots, validity, the name,
//! the serverAuth usage), then the pin.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, SignatureScheme};

use crate::cert_sha256;

/// The peer's certificate verified, but it is not the pinned one. Carried
/// inside rustls's error to the connector, which reports it.
#[derive(Debug, thiserror::Error)]
#[error("certificate sha256 {seen} is not the pinned {expected}")]
pub(crate) struct NotPinned {
    pub(crate) seen: String,
    pub(crate) expected: String,
}

#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pub(crate) webpki: Arc<WebPkiServerVerifier>,
    /// Lower-case hex.
    pub(crate) pin: Option<String>,
    /// SHA-256 of the last certificate that passed every check.
    pub(crate) verified: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The chain first: a certificate of another role (another CA) is
        // reported as such, whatever its hash.
        self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let seen = cert_sha256(end_entity.as_ref());
        if let Some(expected) = &self.pin {
            if *expected != seen {
                return Err(Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(NotPinned {
                        seen,
                        expected: expected.clone(),
                    })),
                )));
            }
        }
        *self.verified.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
