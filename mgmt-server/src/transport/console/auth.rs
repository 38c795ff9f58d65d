//! Who uses the console: an admin certificate, or a login and its session;
//! the CSRF token of each; sign-in and sign-out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::layout::{self, Page};
use super::{Console, PeerCert};
use crate::model::Caller;

const COOKIE: &str = "__Host-guestkey-session";
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: u32 = 1000;
/// Failed sign-ins of one login name within [`FAILURE_WINDOW`] after which
/// its sign-ins are refused until the window ends (an admin certificate
/// still works).
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Login names whose failures are counted at most (the oldest go first).
const FAILURE_NAMES: usize = 10_000;
/// How long a sign-in waits for one of the password checks.
const LOGIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Failed sign-ins by login name: (count, first in the window).
#[derive(Default)]
pub(crate) struct Failures(HashMap<String, (u32, Instant)>);

impl Failures {
    fn prune(&mut self) {
        self.0.retain(|_, (_, at)| at.elapsed() < FAILURE_WINDOW);
    }

    /// Whether sign-ins of `name` are refused now.
    fn locked(&mut self, name: &str) -> bool {
        self.prune();
        self.0.get(name).is_some_and(|(n, _)| *n >= MAX_FAILURES)
    }

    fn failed(&mut self, name: &str) {
        self.prune();
        if self.0.len() >= FAILURE_NAMES && !self.0.contains_key(name) {
            if let Some(oldest) = self
                .0
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                self.0.remove(&oldest);
            }
        }
        self.0
            .entry(name.to_owned())
            .or_insert((0, Instant::now()))
            .0 += 1;
    }

    fn succeeded(&mut self, name: &str) {
        self.0.remove(name);
    }
}

/// How the admin proved who they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// A certificate of the admin CA.
    Certificate,
    /// A login, with its session token's hash.
    Login([u8; 32]),
}

/// The signed-in admin of a request.
#[derive(Clone, Debug)]
pub(crate) struct Who {
    /// Their name (the admin credential's, or the login's).
    pub(crate) name: String,
    /// The token each form carries back.
    pub(crate) csrf: String,
    /// How.
    pub(crate) via: Via,
}

impl Who {
    /// The caller domain calls act as.
    pub(crate) fn caller(&self) -> Caller {
        Caller::Admin(self.name.clone())
    }

    /// Whether a form's `csrf` field is this admin's token.
    pub(crate) fn csrf_ok(&self, sent: &str) -> bool {
        bool::from(sent.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

/// 256 random bits, base64url; wiped when dropped (a session token is a
/// credential until it ends).
fn random_token() -> Option<zeroize::Zeroizing<String>> {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(raw.as_mut()).ok()?;
    Some(zeroize::Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_slice()),
    ))
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn cookie_token(headers: &HeaderMap) -> Option<zeroize::Zeroizing<String>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| zeroize::Zeroizing::new(v.to_owned()))
        })
}

/// The host a request was sent to: HTTP/1.1's Host header, or HTTP/2's
/// :authority (the URI's).
fn request_host(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))
}

/// Whether a POST comes from a page of this console: its Origin (which
/// browsers send with every POST) names this host, and Sec-Fetch-Site, if
/// sent, says same-origin. Without an Origin (not a browser: curl with a
/// certificate) the CSRF token alone decides.
fn from_here(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            request_host(headers, uri).is_some_and(|h| origin == format!("https://{h}"))
        }
    }
}

/// Whether a request may be served: a POST from a page of this console
/// ([`from_here`]); a GET from anywhere only as a top-level navigation (a
/// link followed), so that another site cannot embed the console's pages
/// (an admin certificate goes with every request, whatever SameSite says).
fn same_origin(parts: &Parts) -> bool {
    let h = &parts.headers;
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return match get("sec-fetch-site") {
            Some("cross-site" | "same-site") => {
                get("sec-fetch-mode") == Some("navigate")
                    && get("sec-fetch-dest") == Some("document")
            }
            _ => true,
        };
    }
    from_here(h, &parts.uri)
}

/// Why a request is not let in.
pub(crate) enum Refused {
    /// Not signed in: to the sign-in page (or 401 for a POST).
    SignIn(Method),
    /// A cross-site POST.
    CrossSite,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::SignIn(m) if m == Method::GET || m == Method::HEAD => {
                Redirect::to("/login").into_response()
            }
            Refused::SignIn(_) => layout::error_page(
                None,
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "Your session ended (signed out, idle too long, or the server restarted): sign in again and repeat the action.",
            ),
            Refused::CrossSite => layout::error_page(
                None,
                StatusCode::FORBIDDEN,
                "Refused",
                "This request did not come from a page of this console (another site sent it), so nothing was done.",
            ),
        }
    }
}

impl FromRequestParts<Arc<Console>> for Who {
    type Rejection = Refused;

    async fn from_request_parts(
        parts: &mut Parts,
        c: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        if !same_origin(parts) {
            return Err(Refused::CrossSite);
        }
        let peer = parts.extensions.get::<PeerCert>().and_then(|p| p.0.clone());
        if let Some(fp) = peer {
            let core = c.core.clone();
            let f = fp.clone();
            // Only an admin's certificate: the listener trusts the admin CA
            // alone, and the fingerprint must be an admin credential's.
            if let Ok(Some(Caller::Admin(name))) = core.blocking(move |c| c.identify(&f)).await {
                let mut mac = Hmac::<Sha256>::new_from_slice(c.csrf_key.as_ref())
                    .map_err(|_| Refused::SignIn(parts.method.clone()))?;
                mac.update(b"guestkey console csrf\0");
                mac.update(fp.as_bytes());
                let csrf = hex::encode(mac.finalize().into_bytes());
                return Ok(Who {
                    name,
                    csrf,
                    via: Via::Certificate,
                });
            }
        }
        let token = cookie_token(&parts.headers).ok_or(Refused::SignIn(parts.method.clone()))?;
        let hash = token_hash(&token);
        // The session as the database keeps it (shared by the replicas):
        // one idle too long, too old, or made under another password of
        // its login (or before the login was removed) ends here.
        let (idle, life) = c.session_times();
        let found = c
            .core
            .blocking(move |core| core.console_session_check(&hash, idle, life))
            .await
            .ok()
            .flatten();
        let (login, csrf) = found.ok_or(Refused::SignIn(parts.method.clone()))?;
        let Caller::Admin(name) = crate::domain::console::console_caller(&login) else {
            return Err(Refused::SignIn(parts.method.clone()));
        };
        Ok(Who {
            name,
            csrf,
            via: Via::Login(hash),
        })
    }
}

/// The sign-in page.
pub(crate) async fn login_page() -> Response {
    Page::new("Sign in", None, login_form(None)).status(StatusCode::OK)
}

fn login_form(error: Option<&str>) -> maud::Markup {
    maud::html! {
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.narrow method="post" action="/login" {
            label { "Login " input type="text" name="name" autocomplete="username" required autofocus; }
            label { "Password " input type="password" name="password" autocomplete="current-password" required; }
            button type="submit" { "Sign in" }
        }
        p.hint { "Or present your admin certificate (the one guestkeyctl uses) to this address. Logins are made with " code { "guestkeyctl console-user add NAME" } "." }
    }
}

/// Signs in: a session for a login whose password matches.
pub(crate) async fn login(
    State(c): State<Arc<Console>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    axum::Form(mut form): axum::Form<HashMap<String, String>>,
) -> Response {
    let refused = |status: StatusCode, msg: &str| {
        Page::new("Sign in", None, login_form(Some(msg))).status(status)
    };
    // A sign-in form posted from elsewhere (login CSRF).
    if !from_here(&headers, &uri) {
        return refused(
            StatusCode::FORBIDDEN,
            "This sign-in did not come from this console's page.",
        );
    }
    let name = form.get("name").map_or("", |n| n.trim()).to_owned();
    // The password moves out of the form, to be wiped after its check.
    let password = zeroize::Zeroizing::new(form.remove("password").unwrap_or_default());
    if name.is_empty() || password.is_empty() {
        return refused(
            StatusCode::BAD_REQUEST,
            "Give your login name and password.",
        );
    }
    // Only a well-formed name is counted and written down: a password
    // typed into the name field stays out of the logs.
    let counted = crate::model::Name::parse("login name", &name)
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "(not a login name)".to_owned());
    if password.len() > crate::domain::console::MAX_PASSWORD * 4 {
        return refused(StatusCode::BAD_REQUEST, "Wrong login name or password.");
    }
    let locked = c
        .failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .locked(&counted);
    if locked {
        return refused(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed sign-ins of this login in the last 15 minutes: wait, or use an admin certificate.",
        );
    }
    let permit = match tokio::time::timeout(LOGIN_WAIT, c.logins.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many sign-ins at once: try again in a moment.",
            );
        }
    };
    let n = name.clone();
    let checked = c
        .core
        .blocking(move |core| {
            // Held until the check ends, even if the client hangs up.
            let _permit = permit;
            core.check_console_login(&n, &password)
        })
        .await;
    match checked {
        Ok(Some((Caller::Admin(_), tag))) => {
            c.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .succeeded(&counted);
            let (Some(token), Some(mut csrf)) = (random_token(), random_token()) else {
                return refused(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The server could not make a session; see its log.",
                );
            };
            let session = crate::store::ConsoleSession {
                token_hash: token_hash(token.as_str()).to_vec(),
                login: name.clone(),
                tag: tag.to_vec(),
                csrf: std::mem::take(&mut *csrf),
                started_ms: crate::domain::now_unix_ms(),
                last_ms: crate::domain::now_unix_ms(),
            };
            let (idle, life) = c.session_times();
            let opened = c
                .core
                .blocking(move |core| core.open_console_session(&session, idle, life, MAX_SESSIONS))
                .await;
            if let Err(e) = opened {
                tracing::error!(error = %e, "console session not recorded");
                return refused(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The server could not make a session; see its log.",
                );
            }
            let u = name.clone();
            let _ = c
                .core
                .blocking(move |core| core.audit_console_login(&u))
                .await;
            // A browser-session cookie: the server ends the session when it
            // is idle too long.
            let cookie = zeroize::Zeroizing::new(format!(
                "{COOKIE}={}; Path=/; Secure; HttpOnly; SameSite=Strict",
                token.as_str()
            ));
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = header::HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(_) => {
            c.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .failed(&counted);
            let core = c.core.clone();
            let who = counted.clone();
            // Named only when it is a login: whatever else was typed in the
            // name field (a password, by mistake) is not written down.
            let shown = tokio::task::spawn_blocking(move || {
                let shown = if core.console_user_exists(&who).unwrap_or(false) {
                    who
                } else {
                    "(not a login)".to_owned()
                };
                core.audit_refusal(
                    "unauthenticated",
                    "console",
                    &format!("console sign-in of {shown} with a wrong password"),
                );
                shown
            })
            .await
            .unwrap_or_default();
            tracing::warn!(login = %shown, "console sign-in refused: wrong login name or password");
            refused(StatusCode::UNAUTHORIZED, "Wrong login name or password.")
        }
        Err(e) => {
            tracing::error!(error = %e, "console sign-in failed");
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server could not check the sign-in; see its log.",
            )
        }
    }
}

/// Signs out: the session ends.
pub(crate) async fn logout(
    State(c): State<Arc<Console>>,
    who: Who,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    if !who.csrf_ok(form.get("csrf").map(String::as_str).unwrap_or("")) {
        return layout::csrf_refused(&who);
    }
    if let Via::Login(hash) = who.via {
        let closed = c
            .core
            .blocking(move |core| core.close_console_session(&hash))
            .await;
        if let Err(e) = closed {
            tracing::error!(error = %e, "console session not ended");
        }
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        header::HeaderValue::from_static(
            "__Host-guestkey-session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}
