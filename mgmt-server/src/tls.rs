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

/// The name TLS checks for `HOST:PORT` or `https://HOST:PORT/...`: the host
/// part, without IPv6 brackets. None for a URL that is not https.
pub fn tls_name(url_or_address: &str) -> Option<String> {
    let rest = if url_or_address.contains("://") {
        url_or_address.strip_prefix("https://")?
    } else {
        url_or_address
    };
    let hostport = rest.split('/').next().unwrap_or_default();
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn tls_names() {
        assert_eq!(
            super::tls_name("https://kms.example:7443/x").as_deref(),
            Some("kms.example")
        );
        assert_eq!(
            super::tls_name("127.0.0.1:7444").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(super::tls_name("[::1]:7444").as_deref(), Some("::1"));
        assert_eq!(super::tls_name("http://kms:80"), None);
    }
}
