//! TLS helpers of the transport: who is calling, and the client side of
//! mutual TLS towards host daemons. Name handling and error chains that the
//! programs use too are in `crate::tls`.

use tonic::Request;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::ca::cert_sha256;

/// SHA-256 of the client's leaf certificate, if it presented one.
pub fn peer_fingerprint<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    certs.first().map(|c| cert_sha256(c.as_ref()))
}

/// The server's TLS identity: its certificate and key (PEM). It is also
/// its client certificate towards host daemons.
pub struct ServerIdentity {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM), wiped on drop.
    pub key_pem: zeroize::Zeroizing<String>,
    /// The CA certificate (PEM) every peer must chain to.
    pub ca_pem: String,
}

impl ServerIdentity {
    /// TLS settings for calling a host at `address`: our CA only, our
    /// certificate, and the host's certificate checked for its address.
    pub(crate) fn client_config(&self, address: &str) -> ClientTlsConfig {
        let domain = crate::tls::tls_name(address).unwrap_or_default();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, self.key_pem.as_bytes()))
            .domain_name(domain)
    }
}
