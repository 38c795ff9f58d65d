//! Names and error texts of TLS connections, shared by the server, the
//! transport and guestkeyctl. A leaf module: no tonic here (the transport's
//! own TLS helpers are `crate::transport::tls`).

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

/// The name TLS checks for `HOST:PORT` or `https://HOST:PORT/...` (one
/// implementation, in guestkey-pinned-tls).
pub use guestkey_pinned_tls::tls_name;
