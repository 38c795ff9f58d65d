//! The connector tonic is given: TCP to the endpoint's host and port, then
//! TLS for the [`Peer`] with [`PinnedVerifier`], optionally presenting a
//! client certificate; its failures said in the peer's terms.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::Peer;
use crate::verify::{NotPinned, PinnedVerifier};

/// The connector could not be built from what it was given.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The roots hold no certificate.
    #[error("{0} holds no PEM certificate")]
    NoRoots(String),
    /// A root does not parse or is not a usable trust anchor.
    #[error("{from} holds a certificate that cannot be a trust anchor: {reason}")]
    BadRoots {
        /// Where the roots come from.
        from: String,
        /// Why.
        reason: String,
    },
    /// The client certificate or key does not parse.
    #[error("the client certificate or its key does not parse: {0}")]
    BadIdentity(String),
    /// Not a DNS name or IP address.
    #[error("{0:?} is not a DNS name or IP address that TLS can check")]
    BadName(String),
    /// Not 64 hex digits.
    #[error("the pinned certificate hash {0:?} is not a SHA-256 (64 hex digits)")]
    BadPin(String),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Rustls(String),
}

/// A connection to the peer failed; the message says who presented what.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection.
    #[error("cannot connect to {address}: {source}")]
    Tcp {
        /// `HOST:PORT`.
        address: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer's certificate verifies but is not the pinned one.
    #[error(
        "{who} presented a certificate that is not the pinned one (sha256 {seen}, expected {expected}): {hint}"
    )]
    NotPinned {
        /// The peer.
        who: String,
        /// SHA-256 of what it presented.
        seen: String,
        /// The pin.
        expected: String,
        /// What to do.
        hint: String,
    },
    /// The peer's certificate is not signed by the roots: another role's
    /// certificate, or another installation's.
    #[error("{who} presented a certificate that {roots_from} did not sign: {hint}")]
    NotSigned {
        /// The peer.
        who: String,
        /// Where the roots come from.
        roots_from: String,
        /// What to do.
        hint: String,
    },
    /// Signed by the roots but refused otherwise: the name, the validity,
    /// the usage.
    #[error("{who} presented a certificate that {roots_from} does not accept ({reason}): {hint}")]
    Refused {
        /// The peer.
        who: String,
        /// Where the roots come from.
        roots_from: String,
        /// rustls's reason.
        reason: String,
        /// What to do.
        hint: String,
    },
    /// Any other TLS failure (an alert from the peer, a closed connection).
    #[error("TLS handshake with {who} failed: {source}")]
    Handshake {
        /// The peer.
        who: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint's URI names no host.
    #[error("the address {0:?} names no host")]
    NoHost(String),
}

struct Inner {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    who: String,
    roots_from: String,
    hint: String,
    verified: Arc<Mutex<Option<String>>>,
}

/// The trust anchors in `pem` (from `from`, for messages): at least one.
pub(crate) fn load_roots(pem: &str, from: &str) -> Result<RootCertStore, SetupError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let bad = |reason: String| SetupError::BadRoots {
            from: from.to_owned(),
            reason,
        };
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(SetupError::NoRoots(from.to_owned()));
    }
    Ok(roots)
}

/// A certificate chain and its private key, from PEM.
pub(crate) fn load_identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), SetupError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SetupError::BadIdentity(e.to_string()))?;
    if chain.is_empty() {
        return Err(SetupError::BadIdentity("no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| SetupError::BadIdentity(e.to_string()))?;
    Ok((chain, key))
}

/// Makes TLS connections to one [`Peer`]; give it to tonic's
/// `Endpoint::connect_with_connector` (cloning is cheap).
#[derive(Clone)]
pub struct Connector(Arc<Inner>);

impl Connector {
    /// A connector to `peer`, presenting `identity` (certificate chain and
    /// private key, PEM) if given.
    pub fn new(peer: Peer, identity: Option<(&str, &str)>) -> Result<Self, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = load_roots(&peer.roots_pem, &peer.roots_from)?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| SetupError::Rustls(e.to_string()))?;
        let pin = match &peer.pin {
            None => None,
            Some(p) => {
                let p = p.trim().to_ascii_lowercase();
                if p.len() != 64 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(SetupError::BadPin(p));
                }
                Some(p)
            }
        };
        let verified = Arc::new(Mutex::new(None));
        let verifier = Arc::new(PinnedVerifier {
            webpki,
            pin,
            verified: verified.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let (chain, key) = load_identity(cert_pem, key_pem)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| SetupError::BadIdentity(e.to_string()))?
            }
        };
        // gRPC is HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(peer.name.clone())
            .map_err(|_| SetupError::BadName(peer.name.clone()))?;
        Ok(Self(Arc::new(Inner {
            config: Arc::new(config),
            name,
            who: peer.who,
            roots_from: peer.roots_from,
            hint: peer.hint,
            verified,
        })))
    }

    /// SHA-256 (hex) of the certificate the last successful handshake
    /// verified: what a client that learns the pin over this channel
    /// compares the answer with.
    pub fn verified_sha256(&self) -> Option<String> {
        self.0
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Connects to `host:port` and completes the TLS handshake.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|source| ConnectError::Tcp {
                address: if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                },
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(self.0.config.clone())
            .connect(self.0.name.clone(), tcp)
            .await
            .map_err(|e| self.0.classify(e))
    }

    /// Whether the peer at `host:port` accepts this client's certificate,
    /// told apart from a lost connection. Under TLS 1.3 a client finishes
    /// its side of the handshake before the server has checked the client's
    /// certificate, so a refusal arrives afterwards, as an alert, and a
    /// client that sent a request meanwhile may see the connection reset
    /// or closed instead (HTTP/2 clients report it so). This sends nothing:
    /// it reads for up to `wait`, and a refusal is then the alert.
    pub async fn probe(
        &self,
        host: &str,
        port: u16,
        wait: std::time::Duration,
    ) -> Result<Probe, ConnectError> {
        use tokio::io::AsyncReadExt as _;
        let mut s = self.connect(host, port).await?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(wait, s.read(&mut b)).await {
            Err(_) | Ok(Ok(1..)) => Ok(Probe::Accepted),
            Ok(Ok(0)) => Ok(Probe::Closed),
            Ok(Err(e)) => match e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::AlertReceived(a)) => Ok(Probe::Refused(format!("{a:?}"))),
                _ => Ok(Probe::Closed),
            },
        }
    }
}

/// What [`Connector::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The peer kept the connection open without an alert: it accepted
    /// the handshake, this client's certificate included.
    Accepted,
    /// The peer sent this fatal alert (`UnknownCA`, `BadCertificate`, ...).
    Refused(String),
    /// The peer closed the connection without saying why.
    Closed,
}

impl Inner {
    /// The handshake's failure in the peer's terms.
    fn classify(&self, e: std::io::Error) -> ConnectError {
        let tls = e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>());
        let who = self.who.clone();
        let hint = self.hint.clone();
        match tls {
            Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
                match other.0.downcast_ref::<NotPinned>() {
                    Some(p) => ConnectError::NotPinned {
                        who,
                        seen: p.seen.clone(),
                        expected: p.expected.clone(),
                        hint,
                    },
                    None => ConnectError::Refused {
                        who,
                        roots_from: self.roots_from.clone(),
                        reason: other.to_string(),
                        hint,
                    },
                }
            }
            // A CA of the same name as one of the roots (another
            // installation's CA of this role) shows as a bad signature.
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            )) => ConnectError::NotSigned {
                who,
                roots_from: self.roots_from.clone(),
                hint,
            },
            Some(rustls::Error::InvalidCertificate(c)) => ConnectError::Refused {
                who,
                roots_from: self.roots_from.clone(),
                reason: c.to_string(),
                hint,
            },
            _ => ConnectError::Handshake { who, source: e },
        }
    }
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, ConnectError>> + Send>>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| ConnectError::NoHost(uri.to_string()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            this.connect(&host, port).await.map(TokioIo::new)
        })
    }
}
