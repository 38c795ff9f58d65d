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
use super::{Console, PeerCert, sweep};
use crate::model::Caller;

const COOKIE: &str = "__Host-guestkey-session";
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1000;

/// A login's session.
pub(crate) struct Session {
    /// The login.
    pub(crate) user: String,
    /// Its CSRF token.
    pub(crate) csrf: String,
    /// Its last request.
    pub(crate) last: Instant,
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

fn random_token() -> Option<String> {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(raw.as_mut()).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref()))
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_owned())
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

fn same_origin(parts: &Parts) -> bool {
    parts.method == Method::GET
        || parts.method == Method::HEAD
        || from_here(&parts.headers, &parts.uri)
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
                "This request did not come from a page of this console (its Origin differs), so nothing was done.",
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
        let found = {
            let mut sessions = c.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sweep(&mut sessions, c.idle);
            sessions.get_mut(&hash).map(|s| {
                s.last = Instant::now();
                (s.user.clone(), s.csrf.clone())
            })
        };
        let (user, csrf) = found.ok_or(Refused::SignIn(parts.method.clone()))?;
        // A removed login's sessions end.
        let u = user.clone();
        let exists = c
            .core
            .blocking(move |core| core.console_user_exists(&u))
            .await
            .unwrap_or(false);
        if !exists {
            c.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&hash);
            return Err(Refused::SignIn(parts.method.clone()));
        }
        Ok(Who {
            name: user,
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
    axum::Form(form): axum::Form<HashMap<String, String>>,
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
    let name = form.get("name").map(String::as_str).unwrap_or("").trim();
    let password = form.get("password").map(String::as_str).unwrap_or("");
    if name.is_empty() || password.is_empty() {
        return refused(
            StatusCode::BAD_REQUEST,
            "Give your login name and password.",
        );
    }
    if name.len() > 64 || password.len() > crate::domain::console::MAX_PASSWORD * 4 {
        return refused(StatusCode::BAD_REQUEST, "Wrong login name or password.");
    }
    let Ok(_permit) = c.logins.acquire().await else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "The console is shutting down.",
        );
    };
    let (n, p) = (
        name.to_owned(),
        zeroize::Zeroizing::new(password.to_owned()),
    );
    let checked = c
        .core
        .blocking(move |core| core.check_console_login(&n, &p))
        .await;
    match checked {
        Ok(Some(Caller::Admin(user))) => {
            let (Some(token), Some(csrf)) = (random_token(), random_token()) else {
                return refused(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The OS random number generator failed.",
                );
            };
            {
                let mut sessions = c.sessions.lock().unwrap_or_else(|p| p.into_inner());
                sweep(&mut sessions, c.idle);
                if sessions.len() >= MAX_SESSIONS {
                    if let Some(oldest) =
                        sessions.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k)
                    {
                        sessions.remove(&oldest);
                    }
                }
                sessions.insert(
                    token_hash(&token),
                    Session {
                        user: user.clone(),
                        csrf,
                        last: Instant::now(),
                    },
                );
            }
            let u = user.clone();
            let _ = c
                .core
                .blocking(move |core| core.audit_console_login(&u))
                .await;
            let cookie = format!(
                "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
                c.idle.as_secs()
            );
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = header::HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(_) => {
            let n = name.to_owned();
            let core = c.core.clone();
            let _ = tokio::task::spawn_blocking(move || {
                core.audit_refusal(
                    "unauthenticated",
                    &format!("console:{n}"),
                    "console sign-in with a wrong login name or password",
                );
            })
            .await;
            tracing::warn!(login = %name, "console sign-in refused: wrong login name or password");
            refused(StatusCode::UNAUTHORIZED, "Wrong login name or password.")
        }
        Err(e) => refused(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
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
        c.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
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
