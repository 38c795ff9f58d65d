//! TLS helpers shared by the server, the pusher and guestkeyctl: peer
//! identification and readable transport errors.

use tonic::Request;

use crate::ca::cert_sha256;

/// SHA-256 of the client's leaf certificate, if it presented one.
pub fn peer_fingerprint<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    certs.first().map(|c| cert_sha256(c.as_ref()))
}

/// An error and all its sources, joined with ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
