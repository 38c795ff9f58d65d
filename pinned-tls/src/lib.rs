//! guestkey's mutual TLS: the client side ([`Connector`]) and the
//! server side's handshakes ([`Acceptor`]).
//!
//! Every guestkey certificate has one role, told by the CA that signed it:
//! the hosts CA signs host certificates, the server CA only the server's,
//! the admin CA only admin certificates. A client therefore trusts exactly
//! one role's CA for its peer, checks the peer's name, and, where it knows
//! it, pins the one certificate it expects (its SHA-256):
//!
//! - `guestkeyctl` and `guestkeyd` trust the server CA and pin the server's
//!   certificate (the admin credential's `server.sha256`, the host's
//!   `server.sha256` from its enrollment);
//! - the server trusts the hosts CA towards a host and pins the certificate
//!   that host enrolled with, so that another host's key pair, or a revoked
//!   host's, serving at the host's address is refused.
//!
//! tonic's own `ClientTlsConfig` can check a chain and a name only, so
//! [`Connector`] makes the connection itself (TCP, then TLS with
//! tokio-rustls and a [`rustls`] verifier that wraps webpki's and adds the
//! pin) and is handed to tonic with `Endpoint::connect_with_connector`;
//! the endpoint's URI is then the plain form of the URL ([`endpoint_uri`]):
//! the TLS is the connector's. Failures are [`ConnectError`]s that say who
//! presented what and what to do.
//!
//! [`Acceptor`] runs the TLS handshakes of both gRPC servers (the
//! management server's, guestkeyd's host-agent API) in place of tonic's, so
//! that a refused client reads the alert that says why (see its module).
//!
//! Imports nothing of guestkey's (and not tonic); used by the gRPC clients
//! of `mgmt-server` (the host-agent client, `guestkeyctl`) and of
//! `host-daemon` (enrollment, reports, `trust-server`), and by both
//! servers.

#![forbid(unsafe_code)]

mod accept;
mod connect;
mod verify;

pub use accept::{Acceptor, ClientAuth, Incoming};
pub use connect::{ConnectError, Connector, Probe, SetupError};

use sha2::{Digest, Sha256};

/// The peer a [`Connector`] reaches, and what it must present.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Who the peer is, for messages: `the server`, `host kvm-a at
    /// 10.0.0.7:7444`.
    pub who: String,
    /// The certificates (PEM) its chain must end at: one role's CA.
    pub roots_pem: String,
    /// Where those come from, for messages: `the server CA in
    /// /x/admin/ca.pem`.
    pub roots_from: String,
    /// The name its certificate must carry: a DNS name or an IP address.
    pub name: String,
    /// SHA-256 (hex) of the one certificate accepted; `None` accepts any
    /// certificate the roots signed for the name (enrollment, and
    /// `guestkeyd trust-server`, which learn the pin over that channel).
    pub pin: Option<String>,
    /// What to tell the user when the peer's certificate is refused.
    pub hint: String,
}

/// Hex SHA-256 of a DER certificate: how guestkey names and pins
/// certificates.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The name TLS checks for `HOST:PORT` or `https://HOST:PORT/...`: the host
/// part, without IPv6 brackets. None for a URL that is not https.
pub fn tls_name(url_or_address: &str) -> Option<String> {
    let rest = if url_or_address.contains("://") {
        url_or_address.strip_prefix("https://")?
    } else {
        url_or_address
    };
    let hostport = rest.split('/').next().unwrap_or_default();
    let host = if hostport.starts_with('[') {
        hostport.split_once(']').map_or(hostport, |(h, _)| h)
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
    };
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

/// The URI to give tonic's `Endpoint` for `https://HOST:PORT` (or a bare
/// `HOST:PORT`) when a [`Connector`] makes the connection: `http://HOST:PORT`.
/// tonic refuses an `https` endpoint without TLS settings of its own; the
/// connector does the TLS. None for a URL that is not https.
pub fn endpoint_uri(url_or_address: &str) -> Option<String> {
    let rest = if url_or_address.contains("://") {
        url_or_address.strip_prefix("https://")?
    } else {
        url_or_address
    };
    Some(format!("http://{}", rest.trim_end_matches('/')))
}

/// The [`ConnectError`] somewhere in `e`'s chain of sources (tonic wraps
/// the connector's error twice).
pub fn find_connect_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests;
