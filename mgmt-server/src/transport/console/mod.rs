//! The web console: HTML pages over HTTPS on a listener of its own (`[console]
//! listen`; off unless set), rendered on the server (maud), without
//! JavaScript. Every page and action calls the same domain methods as the
//! admin gRPC API, with the signed-in admin as the caller, so the console
//! and `guestkeyctl` cannot drift apart and every action is audited with the
//! admin's name.
//!
//! Who may use it: a browser presenting a certificate of the admin CA (the
//! one `guestkeyctl` uses; no other CA is trusted on this listener), or a
//! login (`guestkeyctl console-user add`) whose argon2id hash the database
//! keeps. A login gets a session: a random token in a `__Host-` cookie
//! (Secure, HttpOnly, SameSite=Strict), kept in the database only by its
//! SHA-256 (so every replica knows it), ending after `session_idle_secs`
//! without a request, 12 hours after its sign-in, at sign-out, or when its
//! login is removed or given a new password. Every form carries a CSRF
//! token (the session's, or for a certificate an HMAC of its fingerprint
//! under a key of this process), and a POST whose Origin is not this
//! console is refused. No page holds key material: the domain
//! calls the console makes return none.
//!
//! May import: `domain`, `model`, `config`. Started by `transport::server`.

mod auth;
mod layout;
mod pages;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use tokio_stream::StreamExt;

use crate::domain::Core;
use crate::model::CoreError;
use crate::transport::tls::ServerIdentity;

pub(crate) use auth::Who;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// An HTTP/1.1 client has this long to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings an idle connection this often, and drops it when a ping
/// goes unanswered this long.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Requests at once on one HTTP/2 connection.
const STREAMS: u32 = 32;
/// A connection is closed (gracefully) after this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest request body (forms are small).
const BODY_LIMIT: usize = 16 * 1024;
/// A session ends this long after its sign-in, however busy.
pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// What the console keeps while it runs.
pub(crate) struct Console {
    core: Arc<Core>,
    /// Key of the CSRF tokens of certificate users.
    csrf_key: zeroize::Zeroizing<[u8; 32]>,
    /// A session ends after this long without a request.
    idle: Duration,
    /// Password checks at once (each takes 19 MiB and tens of ms); the
    /// permit goes with the check itself, so a client that hangs up does
    /// not free it early.
    logins: Arc<tokio::sync::Semaphore>,
    /// Failed sign-ins by login name.
    failures: Mutex<auth::Failures>,
}

/// The fingerprint of the client certificate of a connection, if any.
#[derive(Clone, Debug)]
pub(crate) struct PeerCert(pub(crate) Option<String>);

impl Console {
    /// (idle limit, lifetime) of a session, in ms.
    fn session_times(&self) -> (i64, i64) {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        (ms(self.idle), ms(SESSION_LIFETIME))
    }

    fn new(core: Arc<Core>, idle: Duration) -> Result<Self, CoreError> {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut())
            .map_err(|_| CoreError::Internal("the OS random number generator failed".into()))?;
        Ok(Self {
            core,
            csrf_key: key,
            idle,
            logins: Arc::new(tokio::sync::Semaphore::new(4)),
            failures: Mutex::new(auth::Failures::default()),
        })
    }
}

/// Headers every answer carries: nothing cached, no framing, no script, no
/// referrer.
async fn headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name: header::HeaderName, v: &'static str| {
        h.insert(name, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // same-origin, not no-referrer: under no-referrer a browser sends
    // `Origin: null` with its form posts, and the origin check needs it.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    r
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/static/console.css", get(layout::css))
        .route("/hosts", get(pages::hosts))
        .route("/hosts/{name}/revoke", post(pages::revoke_host))
        .route("/volumes", get(pages::volumes))
        .route("/volumes/{id}", get(pages::volume))
        .route(
            "/volumes/{id}/rekey",
            get(pages::rekey_page).post(pages::rekey),
        )
        .route("/encrypt", get(pages::encrypt_page))
        .route("/encrypt/create", post(pages::create))
        .route("/encrypt/convert", post(pages::convert))
        .route("/policies", get(pages::policies))
        .route("/policies/set", post(pages::set_policy))
        .route("/policies/remove", post(pages::remove_policy))
        .route("/guests", get(pages::guests))
        .route("/pending", get(pages::pending))
        .route("/pending/{id}", post(pages::decide))
        .route("/audit", get(pages::audit))
        .fallback(pages::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(headers))
        .with_state(console)
}

/// Serves the console on `listen` until `stop` fires; returns the address
/// it listens on.
pub async fn serve(
    listen: SocketAddr,
    idle_secs: u64,
    identity: &ServerIdentity,
    core: Arc<Core>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), CoreError> {
    let acceptor = guestkey_pinned_tls::Acceptor::for_browsers(
        &identity.cert_pem,
        &identity.key_pem,
        &identity.admin_ca_pem,
        "the admin CA",
        guestkey_pinned_tls::ClientAuth::Optional,
        "a browser presents an admin certificate (the one guestkeyctl uses) or none, and signs in",
    )
    .map_err(|e| CoreError::Internal(format!("console TLS configuration: {e}")))?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        CoreError::Internal(format!(
            "console.listen: cannot listen on {listen}: {e} (pick another address)"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| CoreError::Internal(e.to_string()))?;
    let app = router(Arc::new(Console::new(
        core,
        Duration::from_secs(idle_secs),
    )?));
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        let mut incoming = acceptor.incoming(listener);
        loop {
            // At most MAX_CONNECTIONS at once: further clients wait in the
            // listener's backlog.
            let permit = tokio::select! {
                p = conns.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            };
            let tls = tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(tls)) => tls,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "console connection failed");
                        continue;
                    }
                    None => break,
                },
                _ = stop.changed() => break,
            };
            let peer = PeerCert(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| crate::ca::cert_sha256(c.as_ref())),
            );
            let app = app.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut b = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                b.http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                b.http2()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(KEEP_ALIVE)
                    .keep_alive_timeout(KEEP_ALIVE)
                    .max_concurrent_streams(STREAMS);
                let conn = b.serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    tower_service_fn(app, peer),
                );
                tokio::pin!(conn);
                let ended = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = tokio::time::sleep(CONNECTION_LIFETIME) => None,
                    _ = stop.changed() => None,
                };
                let r = match ended {
                    Some(r) => r,
                    None => {
                        // Shutdown, or a connection held too long: what is
                        // under way may finish, briefly.
                        conn.as_mut().graceful_shutdown();
                        tokio::time::timeout(Duration::from_secs(5), conn)
                            .await
                            .unwrap_or(Ok(()))
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "console connection ended");
                }
            });
        }
    });
    Ok((local, task))
}

/// The router as a hyper service, each request told its connection's
/// client certificate.
fn tower_service_fn(
    app: Router,
    peer: PeerCert,
) -> hyper_util::service::TowerToHyperService<WithPeer> {
    hyper_util::service::TowerToHyperService::new(WithPeer { app, peer })
}

/// [`tower_service_fn`]'s service.
#[derive(Clone)]
struct WithPeer {
    app: Router,
    peer: PeerCert,
}

impl tower_service::Service<http::Request<hyper::body::Incoming>> for WithPeer {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower_service::Service::<http::Request<hyper::body::Incoming>>::poll_ready(
            &mut self.app,
            cx,
        )
    }

    fn call(&mut self, mut r: http::Request<hyper::body::Incoming>) -> Self::Future {
        r.extensions_mut().insert(self.peer.clone());
        self.app.call(r)
    }
}
