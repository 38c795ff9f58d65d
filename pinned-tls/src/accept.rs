//! The server side: TLS handshakes for a gRPC server (tonic's
//! `serve_with_incoming`), each on its own task, with client certificates
//! checked against one set of roots.
//!
//! tonic's own TLS acceptor drops a connection whose handshake failed at
//! once. Under TLS 1.3 the client has finished its side of the handshake
//! and sent its first request before the server checked its certificate,
//! so that request is still unread when the socket closes: the kernel
//! answers with a reset, and the client often sees "broken pipe" or
//! "connection closed" instead of the alert that says its certificate was
//! refused. [`Acceptor`] sends the alert, closes its sending side, and
//! reads (and discards) what the client still sends for a moment before it
//! closes, so the client reads the alert. It also logs each refusal with
//! the peer's address and `hint`, so the operator of the refusing side
//! sees who was turned away and why.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;

use crate::SetupError;
use crate::connect::{load_identity, load_roots};

/// Handshakes under way at once; further connections wait in the
/// listener's backlog.
const HANDSHAKES: usize = 256;
/// How long a client has for its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused client's connection is drained before it closes.
const LINGER: Duration = Duration::from_secs(1);
/// At most this much is read from a refused client.
const LINGER_BYTES: usize = 1 << 20;

/// Whether a client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client presents one the roots signed.
    Required,
    /// A client may present none (enrollment); one it presents must chain
    /// to the roots.
    Optional,
}

/// Accepts TLS connections for one server identity.
#[derive(Clone)]
pub struct Acceptor {
    tls: TlsAcceptor,
    hint: Arc<str>,
}

impl Acceptor {
    /// A server presenting `cert_pem` (its chain) and `key_pem`, accepting
    /// client certificates that `client_roots_pem` (from
    /// `client_roots_from`, for messages) signed, speaking HTTP/2. `hint`
    /// ends each logged refusal: what a refused client should do.
    pub fn new(
        cert_pem: &str,
        key_pem: &str,
        client_roots_pem: &str,
        client_roots_from: &str,
        client_auth: ClientAuth,
        hint: &str,
    ) -> Result<Self, SetupError> {
        Self::build(
            cert_pem,
            key_pem,
            client_roots_pem,
            client_roots_from,
            client_auth,
            hint,
            vec![b"h2".to_vec()],
        )
    }

    /// As [`Acceptor::new`], for browsers: HTTP/2 or HTTP/1.1.
    pub fn for_browsers(
        cert_pem: &str,
        key_pem: &str,
        client_roots_pem: &str,
        client_roots_from: &str,
        client_auth: ClientAuth,
        hint: &str,
    ) -> Result<Self, SetupError> {
        Self::build(
            cert_pem,
            key_pem,
            client_roots_pem,
            client_roots_from,
            client_auth,
            hint,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
    }

    fn build(
        cert_pem: &str,
        key_pem: &str,
        client_roots_pem: &str,
        client_roots_from: &str,
        client_auth: ClientAuth,
        hint: &str,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Self, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = load_roots(client_roots_pem, client_roots_from)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let verifier = match client_auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| SetupError::Rustls(e.to_string()))?;
        let (chain, key) = load_identity(cert_pem, key_pem)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| SetupError::BadIdentity(e.to_string()))?;
        // gRPC is HTTP/2; a browser may speak HTTP/1.1.
        config.alpn_protocols = alpn;
        Ok(Self {
            tls: TlsAcceptor::from(Arc::new(config)),
            hint: hint.into(),
        })
    }

    /// The connections of `listener` whose handshake went through, for
    /// tonic's `serve_with_incoming`. The stream owns the listener and the
    /// handshakes under way: dropping it closes the port and ends them.
    pub fn incoming(self, listener: TcpListener) -> Incoming {
        Incoming {
            listener,
            acceptor: self,
            handshakes: JoinSet::new(),
            backoff: None,
        }
    }

    /// The handshake with `peer`; a refused one is logged and drained.
    async fn handshake(&self, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
        let _ = tcp.set_nodelay(true);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp).into_fallible()).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err((e, tcp))) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    // rustls refused what the client sent: its certificate
                    // above all.
                    tracing::warn!(%peer, "refused a TLS client: {e}: {}", self.hint);
                } else {
                    tracing::debug!(%peer, "a TLS handshake failed: {e}");
                }
                linger(tcp).await;
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "a TLS handshake took longer than {HANDSHAKE_TIMEOUT:?}");
                None
            }
        }
    }
}

/// The accepted connections of one listener (see [`Acceptor::incoming`]).
pub struct Incoming {
    listener: TcpListener,
    acceptor: Acceptor,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
    /// After a failed accept (out of descriptors): when to try again.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<TlsStream<TcpStream>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(b) = this.backoff.as_mut() {
            if b.as_mut().poll(cx).is_ready() {
                this.backoff = None;
            }
        }
        while this.backoff.is_none() && this.handshakes.len() < HANDSHAKES {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    let a = this.acceptor.clone();
                    this.handshakes
                        .spawn(async move { a.handshake(tcp, peer).await });
                }
                Poll::Ready(Err(e)) => {
                    // Out of descriptors, or a connection gone before it
                    // was accepted: not the listener's end.
                    tracing::warn!("accepting a connection failed: {e}");
                    let mut b = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
                    let _ = b.as_mut().poll(cx);
                    this.backoff = Some(b);
                }
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => return Poll::Ready(Some(Ok(tls))),
                // Refused, timed out, or its task failed: the next one.
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Closes `tcp` so that what was sent on it (the alert) is read: sending
/// side first, then reading until the client closes, for a bounded time and
/// amount, so that no unread data makes the kernel reset the connection.
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 8192];
        let mut read = 0;
        while read < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
