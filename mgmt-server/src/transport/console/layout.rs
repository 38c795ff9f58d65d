//! The console's page frame, its style sheet, and how values are shown
//! (times, ages, sizes, states).

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Who;
use crate::model::CoreError;

const CSS: &str = r#"
:root { --fg: #1d2330; --muted: #5b6475; --line: #d8dce4; --accent: #1f5fbf; --bad: #b42318; --good: #1a7f37; --warn: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: #f6f7f9; }
header { display: flex; align-items: center; gap: 1.5rem; padding: .6rem 1.5rem; background: #17213a; color: #fff; }
header .brand { font-weight: 700; letter-spacing: .02em; }
header nav a { color: #cfd8ea; text-decoration: none; margin-right: 1rem; }
header nav a.on { color: #fff; border-bottom: 2px solid #8fb3ff; }
header .who { margin-left: auto; color: #cfd8ea; }
header form { display: inline; }
header button { background: none; border: 1px solid #5a6a8c; color: #fff; border-radius: 4px; padding: .15rem .6rem; cursor: pointer; }
main { padding: 1rem 1.5rem 3rem; max-width: 1400px; }
h1 { font-size: 1.4rem; margin: .4rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .6rem; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, monospace; font-size: 12.5px; }
a { color: var(--accent); }
.state { display: inline-block; padding: 0 .45rem; border-radius: 9px; background: #e7ebf2; }
.state.ready, .state.enrolled, .state.running, .state.ok, .state.managed { background: #dcf3e3; color: var(--good); }
.state.failed, .state.revoked, .state.bad, .state.denied { background: #fde4e1; color: var(--bad); }
.state.rekeying, .state.pending-create, .state.pending-encrypt, .state.encrypting, .state.migrating, .state.pending, .state.offered { background: #fff1c7; color: var(--warn); }
.error { background: #fde4e1; color: var(--bad); padding: .6rem .8rem; border-radius: 4px; border: 1px solid #f3b7b0; }
.notice { background: #e6efff; padding: .6rem .8rem; border-radius: 4px; border: 1px solid #b9cdf5; }
.ok-box { background: #dcf3e3; color: var(--good); padding: .6rem .8rem; border-radius: 4px; border: 1px solid #a6dcb5; }
.hint { color: var(--muted); }
form.card, .card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .8rem 1rem; margin: .6rem 0 1rem; }
form.card label, form.narrow label { display: block; margin: .35rem 0; }
form.narrow { max-width: 360px; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 1rem; }
input, select { font: inherit; padding: .2rem .35rem; border: 1px solid #b8bfcc; border-radius: 4px; }
button { font: inherit; padding: .25rem .8rem; border-radius: 4px; border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer; }
button.danger { border-color: var(--bad); background: var(--bad); }
td form { display: inline; }
progress { width: 14rem; height: 1rem; vertical-align: middle; }
dl.kv { display: grid; grid-template-columns: 14rem 1fr; gap: .25rem 1rem; background: #fff; border: 1px solid var(--line); padding: .8rem 1rem; border-radius: 6px; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; }
.filters input { width: 12rem; }
"#;

/// The style sheet.
pub(crate) async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// A page: title, who is signed in, its body, and whether it refreshes
/// itself (while an operation runs).
pub(crate) struct Page<'a> {
    title: &'a str,
    who: Option<&'a Who>,
    body: Markup,
    refresh: Option<u32>,
}

const NAV: [(&str, &str); 7] = [
    ("/hosts", "Hosts"),
    ("/volumes", "Volumes"),
    ("/encrypt", "Encrypt"),
    ("/policies", "Policies"),
    ("/guests", "Guests"),
    ("/pending", "Approvals"),
    ("/audit", "Audit log"),
];

impl<'a> Page<'a> {
    pub(crate) fn new(title: &'a str, who: Option<&'a Who>, body: Markup) -> Self {
        Self {
            title,
            who,
            body,
            refresh: None,
        }
    }

    /// Reloads itself every `secs` seconds.
    pub(crate) fn refresh(mut self, secs: u32) -> Self {
        self.refresh = Some(secs);
        self
    }

    fn render(self, active: &str) -> Markup {
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { (self.title) " · guestkey" }
                    link rel="stylesheet" href="/static/console.css";
                    @if let Some(s) = self.refresh { meta http-equiv="refresh" content=(s); }
                }
                body {
                    header {
                        span.brand { "guestkey" }
                        @if self.who.is_some() {
                            nav {
                                @for (href, label) in NAV {
                                    a href=(href) class=[(href == active).then_some("on")] { (label) }
                                }
                            }
                        }
                        @if let Some(w) = self.who {
                            span.who { "Signed in as " strong { (w.name) } }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(w.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                    main {
                        h1 { (self.title) }
                        (self.body)
                    }
                }
            }
        }
    }

    /// The page with `status`, its section `active` lit in the menu.
    pub(crate) fn at(self, status: StatusCode, active: &str) -> Response {
        let html = self.render(active).into_string();
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response()
    }

    /// The page with `status`.
    pub(crate) fn status(self, status: StatusCode) -> Response {
        self.at(status, "")
    }
}

/// An error page: what went wrong and that nothing was done.
pub(crate) fn error_page(
    who: Option<&Who>,
    status: StatusCode,
    title: &str,
    msg: &str,
) -> Response {
    Page::new(
        title,
        who,
        html! {
            p.error role="alert" { (msg) }
            p { a href="/" { "Back to the console" } }
        },
    )
    .status(status)
}

/// The page for a form whose CSRF token is not the admin's.
pub(crate) fn csrf_refused(who: &Who) -> Response {
    error_page(
        Some(who),
        StatusCode::FORBIDDEN,
        "Refused",
        "This form's security token is not yours (an old page, or a page of another site): nothing was done. Reload the page and try again.",
    )
}

/// The HTTP status of a domain error.
pub(crate) fn status_of(e: &CoreError) -> StatusCode {
    match e {
        CoreError::Invalid(_) | CoreError::Xml(_) => StatusCode::BAD_REQUEST,
        CoreError::NotFound(_) => StatusCode::NOT_FOUND,
        CoreError::AlreadyExists(_) | CoreError::FailedPrecondition(_) => StatusCode::CONFLICT,
        CoreError::Denied(_) | CoreError::Unattested(_) | CoreError::Unapproved(_) => {
            StatusCode::FORBIDDEN
        }
        CoreError::Exhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed action's page: the domain's message, nothing changed.
pub(crate) fn refused(who: &Who, what: &str, e: &CoreError) -> Response {
    error_page(
        Some(who),
        status_of(e),
        what,
        &format!("{e}. Nothing was changed."),
    )
}

/// A Unix time as UTC.
pub(crate) fn time(unix: i64) -> String {
    if unix <= 0 {
        return "–".into();
    }
    crate::model::names::format_utc(unix).unwrap_or_else(|| unix.to_string())
}

/// A duration in seconds, roughly ("3 d 4 h", "12 min").
pub(crate) fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes in powers of 1024.
pub(crate) fn size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// A state as a coloured label.
pub(crate) fn state(s: &str) -> Markup {
    html! { span class=(format!("state {s}")) { (s) } }
}
