//! TLS helpers of the transport: who is calling, the server's identity, and
//! the client side of mutual TLS towards host daemons. Name handling and
//! error chains that the programs use too are in `crate::tls`.

use guestkey_pinned_tls::{Connector, Peer, SetupError};
use tonic::Request;

use crate::ca::cert_sha256;
use crate::model::EnrolledHost;

/// SHA-256 of the client's leaf certificate, if it presented one.
pub fn peer_fingerprint<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    certs.first().map(|c| cert_sha256(c.as_ref()))
}

/// The server's TLS identity and the CAs it trusts. Its certificate (signed
/// by the server CA) is also its client certificate towards host daemons.
pub struct ServerIdentity {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM), wiped on drop.
    pub key_pem: zeroize::Zeroizing<String>,
    /// The hosts CA (PEM): a host's certificate must chain to it.
    pub hosts_ca_pem: String,
    /// The admin CA (PEM): an admin's certificate must chain to it.
    pub admin_ca_pem: String,
}

impl ServerIdentity {
    /// The CAs a client certificate of the admin and host APIs may chain
    /// to (PEM): the hosts CA and the admin CA, never the server CA.
    pub fn client_roots_pem(&self) -> String {
        format!(
            "{}\n{}",
            self.hosts_ca_pem.trim_end(),
            self.admin_ca_pem.trim_end()
        )
    }

    /// The connection to `host`'s host-agent API: our certificate, the
    /// hosts CA only, the host's name for its address, and the certificate
    /// it enrolled with pinned (hosts may share an address's names, and a
    /// revoked host keeps a certificate the CA signed).
    pub(crate) fn host_connector(&self, host: &EnrolledHost) -> Result<Connector, SetupError> {
        Connector::new(
            Peer {
                who: format!("the process at {} (host {})", host.address, host.name),
                roots_pem: self.hosts_ca_pem.clone(),
                roots_from: "the hosts CA (DATA_DIR/ca/ca.pem)".into(),
                name: crate::tls::tls_name(&host.address).unwrap_or_default(),
                pin: Some(host.cert_sha256.clone()),
                hint: format!(
                    "it is not the guestkeyd that enrolled as host {0} (`guestkeyctl host show {0}` shows its certificate's sha256): another host's or a revoked host's key pair may serve at that address; nothing is sent there",
                    host.name
                ),
            },
            Some((&self.cert_pem, &self.key_pem)),
        )
    }
}
