//! The console's pages and actions. Each page reads through the domain as
//! the admin API does; each action checks the form's CSRF token, then makes
//! the same domain call as the matching `guestkeyctl` command, with the
//! signed-in admin as the caller (so the audit log names them). A refused
//! action shows the domain's message and changes nothing.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

use super::layout::{self, Page, age, size, state, time};
use super::{Console, Who};
use crate::domain::now_unix;
use crate::domain::pools::Offer;
use crate::model::{
    CoreError, HostState, InvalidInput, Policy, PolicyScope, RekeyKind, RekeyPlacement,
    VolumeFormat, VolumeState,
};

type Form = axum::Form<HashMap<String, String>>;

/// A form's field, trimmed; empty when missing.
fn field<'a>(f: &'a HashMap<String, String>, name: &str) -> &'a str {
    f.get(name).map_or("", |v| v.trim())
}

/// Runs a domain call on a blocking thread.
async fn call<T, F>(c: &Console, f: F) -> Result<T, CoreError>
where
    T: Send + 'static,
    F: FnOnce(&crate::domain::Core) -> Result<T, CoreError> + Send + 'static,
{
    c.core.blocking(f).await
}

/// The CSRF check of an action: the refusal page if it fails.
fn csrf_refusal(who: &Who, f: &HashMap<String, String>) -> Option<Response> {
    (!who.csrf_ok(field(f, "csrf"))).then(|| layout::csrf_refused(who))
}

/// A form's field parsed as a domain value (its error names the field).
fn parsed<T>(f: &HashMap<String, String>, name: &str) -> Result<T, CoreError>
where
    T: std::str::FromStr<Err = InvalidInput>,
{
    field(f, name).parse().map_err(CoreError::Invalid)
}

/// An action's answer: on to the page `to` names when it went through,
/// else its refusal.
fn answer<T>(
    who: &Who,
    what: &str,
    r: Result<T, CoreError>,
    to: impl FnOnce(T) -> String,
) -> Response {
    match r {
        Ok(v) => Redirect::to(&to(v)).into_response(),
        Err(e) => layout::refused(who, what, &e),
    }
}

fn csrf(who: &Who) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

/// `/`: the hosts page.
pub(crate) async fn home(who: Who) -> Response {
    let _ = who;
    Redirect::to("/hosts").into_response()
}

/// Anything else.
pub(crate) async fn not_found(who: Who) -> Response {
    layout::error_page(
        Some(&who),
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
    )
}

/// Hosts: state, attestation and TPM, keys held, last inventory; revoke.
pub(crate) async fn hosts(State(c): State<Arc<Console>>, who: Who) -> Response {
    let (hosts, held) = match call(&c, |core| Ok((core.list_hosts()?, core.held_keys()?))).await {
        Ok(h) => h,
        Err(e) => return layout::refused(&who, "Hosts", &e),
    };
    let now = now_unix();
    let body = html! {
        table {
            thead { tr { th { "Host" } th { "State" } th { "Address" } th { "Attestation" } th { "TPM sealing" } th.num { "Volumes" } th.num { "Keys held" } th { "Last inventory" } th {} } }
            tbody {
                @for h in &hosts {
                    tr id=(format!("host-{}", h.name)) {
                        td { strong { (h.name) } @if !h.group.is_empty() { br; span.hint { "group " (h.group) } } }
                        td { (state(h.state.as_str())) }
                        td.mono { (h.address) }
                        td {
                            @match &h.attestation {
                                None => span.hint { "no TPM" },
                                Some(a) => {
                                    @match &a.last {
                                        None => span.hint { "not attested yet" },
                                        Some(l) if l.ok && a.fresh_until_unix > now => { (state("ok")) " " (time(l.at_unix)) }
                                        Some(l) if l.ok => { span.state { "stale" } " " (time(l.at_unix)) }
                                        Some(l) => { (state("bad")) " " (l.detail) }
                                    }
                                }
                            }
                        }
                        td {
                            @match &h.tpm {
                                None => span.hint { "–" },
                                Some(t) => { @if t.unseals { (state("ok")) } @else { (state("bad")) } " " span.mono { (t.pcrs) } }
                            }
                        }
                        td.num { (h.volume_count) }
                        td.num {
                            @match held.get(&h.name) {
                                Some(keys) if !keys.is_empty() => {
                                    details {
                                        summary { (h.held_keys) }
                                        @for (v, g) in keys { span.mono { (v) " gen " (g) } br; }
                                    }
                                }
                                _ => { (h.held_keys) }
                            }
                        }
                        td { (time(h.inventory_reported_unix)) }
                        td {
                            @if h.state != HostState::Revoked {
                                form method="post" action=(format!("/hosts/{}/revoke", h.name)) {
                                    (csrf(&who))
                                    label { input type="checkbox" name="confirm" value="yes"; " I am sure" }
                                    " "
                                    button.danger type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if hosts.is_empty() { p.hint { "No hosts yet: " code { "guestkeyctl host add NAME --address HOST:PORT" } } }
        p.hint { "Keys held: the volume ids and key generations the host last reported holding (ids only: no key ever reaches this page). Revoking a host stops every key release to it and refuses its certificate." }
    };
    Page::new("Hosts", Some(&who), body).at(StatusCode::OK, "/hosts")
}

/// Revokes a host (the form's confirmation box ticked).
pub(crate) async fn revoke_host(
    State(c): State<Arc<Console>>,
    who: Who,
    Path(name): Path<String>,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    if field(&f, "confirm") != "yes" {
        return layout::error_page(
            Some(&who),
            StatusCode::BAD_REQUEST,
            "Revoke host",
            &format!("Tick \"I am sure\" to revoke host {name}. Nothing was changed."),
        );
    }
    let caller = who.caller();
    let r = call(&c, move |core| core.revoke_host(&caller, &name)).await;
    answer(&who, "Revoke host", r, |_| "/hosts".into())
}

fn progress_of(v: &crate::model::VolumeInfo) -> Markup {
    html! {
        @if let Some(p) = &v.progress {
            @if p.total_bytes > 0 {
                progress max=(p.total_bytes) value=(p.done_bytes) {}
                " " (p.phase) " " (u128::from(p.done_bytes) * 100 / u128::from(p.total_bytes)) " %"
            } @else {
                progress {} " " (p.phase)
            }
        }
    }
}

/// Volumes: every volume with its crypto state.
pub(crate) async fn volumes(State(c): State<Arc<Console>>, who: Who) -> Response {
    let vols = match call(&c, |core| core.list_volumes(None)).await {
        Ok(v) => v,
        Err(e) => return layout::refused(&who, "Volumes", &e),
    };
    let busy = vols.iter().any(|v| {
        matches!(
            v.state,
            VolumeState::Rekeying
                | VolumeState::PendingCreate
                | VolumeState::PendingEncrypt
                | VolumeState::Encrypting
        )
    });
    let body = html! {
        p { a href="/encrypt" { "Encrypt a volume" } " (create one encrypted, or convert a cleartext one)" }
        table {
            thead { tr { th { "Volume" } th { "Host" } th { "Pool" } th { "Format" } th.num { "Size" } th.num { "Key generation" } th { "Release" } th { "State" } } }
            tbody {
                @for v in &vols {
                    tr id=(format!("volume-{}", v.name)) {
                        td { a href=(format!("/volumes/{}", v.id)) { (v.name) } }
                        td { (v.host) }
                        td { (v.pool) }
                        td { (v.format.as_str()) }
                        td.num { (size(v.capacity_bytes)) }
                        td.num { (v.key_generation) }
                        td { (v.release.as_str()) }
                        td { (state(v.state.as_str())) " " (progress_of(v)) }
                    }
                }
            }
        }
        @if vols.is_empty() { p.hint { "No volumes yet." } }
    };
    let page = Page::new("Volumes", Some(&who), body);
    let page = if busy { page.refresh(2) } else { page };
    page.at(StatusCode::OK, "/volumes")
}

/// One volume: its crypto inventory, its rekey's progress, its history.
pub(crate) async fn volume(
    State(c): State<Arc<Console>>,
    who: Who,
    Path(id): Path<String>,
) -> Response {
    let (v, h) = match call(&c, move |core| core.volume_history(&id)).await {
        Ok(x) => x,
        Err(e) => return layout::refused(&who, "Volume", &e),
    };
    let now = now_unix();
    let running = matches!(
        v.state,
        VolumeState::Rekeying
            | VolumeState::PendingCreate
            | VolumeState::PendingEncrypt
            | VolumeState::Encrypting
            | VolumeState::PendingDelete
    );
    let body = html! {
        dl.kv {
            dt { "State" } dd id="volume-state" { (state(v.state.as_str())) " " (progress_of(&v)) }
            @if let Some(o) = &v.rekey { dt { "Rekey under way" } dd { (o.kind.as_str()) " to generation " (v.key_generation + 1) } }
            @if !v.last_error.is_empty() { dt { "Last error" } dd.error { (v.last_error) } }
            dt { "Id" } dd.mono { (v.id) }
            dt { "Host / pool" } dd { (v.host) " / " (v.pool) }
            dt { "Path" } dd.mono { (v.path) }
            dt { "Format" } dd { (v.format.as_str()) @if v.split { " (split key: half at a verifier)" } }
            dt { "Size" } dd { (size(v.capacity_bytes)) }
            dt { "Key generation" } dd id="volume-generation" { (v.key_generation) }
            dt { "Key age" } dd { @if h.key_created > 0 { (age(now - h.key_created)) " (made " (time(h.key_created)) ")" } @else { "–" } }
            dt { "Last shallow rekey" } dd { (time(h.last_shallow)) }
            dt { "Last deep rekey" } dd { (time(h.last_deep)) }
            dt { "Rotation policy" } dd {
                @match &h.policy {
                    Some(p) => { (p.scope.as_str()) " " (p.target) ": " (p.mode.as_str()) " when older than " (age(i64::try_from(p.max_key_age_secs).unwrap_or(i64::MAX))) }
                    None => span.hint { "none (" a href="/policies" { "set one" } ")" },
                }
            }
            dt { "Next rekey due" } dd { @if h.next_due > 0 { (time(h.next_due)) @if h.next_due <= now { " " (state("overdue")) } } @else { "–" } }
            dt { "Release needs" } dd { (v.release.as_str()) }
            dt { "Hosts that held a key" } dd { @if h.holders.is_empty() { "–" } @else { (h.holders.join(", ")) } span.hint { " (from the audit log)" } }
        }
        @if v.state == VolumeState::Ready {
            p { a href=(format!("/volumes/{}/rekey", v.id)) { "Re-encrypt now…" } }
        }
        h2 { "History" }
        table {
            thead { tr { th { "#" } th { "Time" } th { "Who" } th { "What" } th { "Detail" } } }
            tbody {
                @for r in h.records.iter().rev() {
                    tr { td.num { (r.seq) } td { (time(r.time_ms / 1000)) } td { (r.actor) } td.mono { (r.action) } td { (r.detail) } }
                }
            }
        }
    };
    let title = format!("Volume {}", v.name);
    let page = Page::new(&title, Some(&who), body);
    let page = if running { page.refresh(2) } else { page };
    page.at(StatusCode::OK, "/volumes")
}

/// The confirmation step of "re-encrypt now".
pub(crate) async fn rekey_page(
    State(c): State<Arc<Console>>,
    who: Who,
    Path(id): Path<String>,
) -> Response {
    let v = match call(&c, move |core| core.get_volume(&id)).await {
        Ok(v) => v,
        Err(e) => return layout::refused(&who, "Re-encrypt", &e),
    };
    let title = format!("Re-encrypt {}", v.name);
    let body = html! {
        form.card method="post" action=(format!("/volumes/{}/rekey", v.id)) {
            (csrf(&who))
            p { "Volume " strong { (v.name) } " on host " (v.host) " is at key generation " (v.key_generation) "." }
            label { input type="radio" name="kind" value="deep" checked; " Deep: a new data key; every block is rewritten (online if a guest runs), the old key destroyed" }
            label { input type="radio" name="kind" value="shallow"; " Shallow: a new passphrase in a new keyslot, the old one removed (the data key stays)" }
            label { "Limit (MiB/s, empty: none) " input type="number" name="mib_per_sec" min="1" max="1048576"; }
            label { input type="checkbox" name="confirm" value="yes"; " Re-encrypt volume " (v.name) " now" }
            button.danger type="submit" { "Re-encrypt" }
        }
        p { a href=(format!("/volumes/{}", v.id)) { "Cancel" } }
    };
    Page::new(&title, Some(&who), body).at(StatusCode::OK, "/volumes")
}

/// Starts a rekey (confirmed).
pub(crate) async fn rekey(
    State(c): State<Arc<Console>>,
    who: Who,
    Path(id): Path<String>,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    let bad = |msg: String| {
        layout::error_page(
            Some(&who),
            StatusCode::BAD_REQUEST,
            "Re-encrypt",
            &format!("{msg}. Nothing was changed."),
        )
    };
    if field(&f, "confirm") != "yes" {
        return bad("Tick the box that confirms the re-encryption".into());
    }
    let kind: RekeyKind = match field(&f, "kind").parse() {
        Ok(k) => k,
        Err(e) => return bad(format!("{e}")),
    };
    let bandwidth = match field(&f, "mib_per_sec") {
        "" => 0,
        t => match t.parse::<u64>() {
            Ok(n) if (1..=1 << 20).contains(&n) => n << 20,
            _ => {
                return bad(format!(
                    "limit {t:?}: give whole MiB/s from 1 to 1048576, or nothing"
                ));
            }
        },
    };
    let caller = who.caller();
    let target = id.clone();
    let r = call(&c, move |core| {
        core.request_rekey(&caller, &target, kind, RekeyPlacement::Any, bandwidth)
    })
    .await;
    answer(&who, "Re-encrypt", r, |v| format!("/volumes/{}", v.id))
}

/// "Encrypt this volume": a new encrypted volume, or a cleartext one of a
/// managed pool converted.
pub(crate) async fn encrypt_page(State(c): State<Arc<Console>>, who: Who) -> Response {
    let hosts = call(&c, |core| core.list_hosts()).await.unwrap_or_default();
    let enrolled: Vec<String> = hosts
        .into_iter()
        .filter(|h| h.state == HostState::Enrolled)
        .map(|h| h.name)
        .collect();
    let pools = call(&c, |core| core.list_managed_pools(None))
        .await
        .unwrap_or_default();
    let mut offered = vec![];
    let mut unread = vec![];
    for p in pools {
        match c.core.describe_pool(p.host.clone(), p.pool.clone()).await {
            Ok(view) => offered.push(view),
            Err(e) => unread.push((p.host, p.pool, e.to_string())),
        }
    }
    let body = html! {
        h2 { "Create an encrypted volume" }
        form.card method="post" action="/encrypt/create" {
            (csrf(&who))
            label { "Host " select name="host" required { @for h in &enrolled { option value=(h) { (h) } } } }
            label { "Storage pool " input type="text" name="pool" value="default" required; }
            label { "Name " input type="text" name="name" required maxlength="64" pattern="[A-Za-z0-9][A-Za-z0-9._-]*"; }
            label { "Size " input type="text" name="size" placeholder="10G" required; span.hint { " bytes, or with K, M, G, T (powers of 1024)" } }
            label { "Format " select name="format" { option value="qcow2" { "qcow2 (LUKS inside qcow2)" } option value="raw" { "raw (LUKS)" } } }
            button type="submit" { "Create encrypted" }
        }
        h2 { "Encrypt a cleartext volume" }
        p.hint { "Every cleartext volume of a managed pool (" code { "guestkeyctl pool manage --host H POOL" } ") is offered here." }
        @for (host, pool, e) in &unread { p.error { "Pool " (pool) " of host " (host) ": " (e) } }
        table {
            thead { tr { th { "Host" } th { "Pool" } th { "Volume" } th { "Format" } th.num { "Size" } th { "Used by" } th {} } }
            tbody {
                @for view in &offered {
                    @for e in &view.volumes {
                        @if let Offer::Cleartext { offered: true, command, adopt } = &e.offer {
                            tr id=(format!("offer-{}", e.name)) {
                                td { (view.host) } td { (view.pool) } td { (e.name) } td { (e.format) }
                                td.num { (size(e.capacity_bytes)) }
                                td { @for u in &e.used_by { (u.domain) @if u.running { " (running)" } " " } }
                                td {
                                    @if adopt.is_some() {
                                        span.hint { "a guest defined outside guestkey uses it: " code { (command) } }
                                    } @else {
                                        form method="post" action="/encrypt/convert" {
                                            (csrf(&who))
                                            input type="hidden" name="host" value=(view.host);
                                            input type="hidden" name="pool" value=(view.pool);
                                            input type="hidden" name="name" value=(e.name);
                                            input type="hidden" name="format" value=(e.format);
                                            button type="submit" { "Encrypt" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Page::new("Encrypt a volume", Some(&who), body).at(StatusCode::OK, "/encrypt")
}

/// Creates an encrypted volume (`volume create`).
pub(crate) async fn create(
    State(c): State<Arc<Console>>,
    who: Who,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    let checked = crate::model::names::parse_size(field(&f, "size"))
        .map_err(CoreError::Invalid)
        .and_then(|size| Ok((size, parsed::<VolumeFormat>(&f, "format")?)));
    let (size, format) = match checked {
        Ok(x) => x,
        Err(e) => return layout::refused(&who, "Create volume", &e),
    };
    let (host, pool, name) = (
        field(&f, "host").to_owned(),
        field(&f, "pool").to_owned(),
        field(&f, "name").to_owned(),
    );
    let caller = who.caller();
    let r = call(&c, move |core| {
        core.create_volume(&caller, &host, &pool, &name, size, format)
    })
    .await;
    answer(&who, "Create volume", r, |v| format!("/volumes/{}", v.id))
}

/// Encrypts a cleartext volume (`volume encrypt`): waits a moment for the
/// host, then shows the volume (its page follows the rest).
pub(crate) async fn convert(
    State(c): State<Arc<Console>>,
    who: Who,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    let format: VolumeFormat = match parsed(&f, "format") {
        Ok(x) => x,
        Err(e) => return layout::refused(&who, "Encrypt volume", &e),
    };
    let name = field(&f, "name").to_owned();
    let core = c.core.clone();
    let (host, pool, n) = (
        field(&f, "host").to_owned(),
        field(&f, "pool").to_owned(),
        name.clone(),
    );
    let caller = who.caller();
    let mut task =
        tokio::spawn(async move { core.encrypt_volume(caller, host, pool, n, format).await });
    match tokio::time::timeout(std::time::Duration::from_secs(3), &mut task).await {
        Ok(Ok(Ok(v))) => Redirect::to(&format!("/volumes/{}", v.id)).into_response(),
        Ok(Ok(Err(e))) => layout::refused(&who, "Encrypt volume", &e),
        Ok(Err(e)) => layout::refused(&who, "Encrypt volume", &CoreError::Internal(e.to_string())),
        // Still copying: the volume's page shows its progress.
        Err(_) => Redirect::to(&format!("/volumes/{name}")).into_response(),
    }
}

/// Rotation policies: list, set, remove.
pub(crate) async fn policies(State(c): State<Arc<Console>>, who: Who) -> Response {
    let ps = match call(&c, |core| core.list_policies()).await {
        Ok(p) => p,
        Err(e) => return layout::refused(&who, "Policies", &e),
    };
    let body = html! {
        table {
            thead { tr { th { "Scope" } th { "Target" } th { "Rekey when older than" } th { "Mode" } th { "After a migration" } th {} } }
            tbody {
                @for p in &ps {
                    tr {
                        td { (p.scope.as_str()) } td.mono { (p.target) }
                        td { (age(i64::try_from(p.max_key_age_secs).unwrap_or(i64::MAX))) }
                        td { (p.mode.as_str()) }
                        td { @if p.after_migration_secs == 0 { "at once" } @else { (age(i64::try_from(p.after_migration_secs).unwrap_or(i64::MAX))) } }
                        td {
                            form method="post" action="/policies/remove" {
                                (csrf(&who))
                                input type="hidden" name="scope" value=(p.scope.as_str());
                                input type="hidden" name="target" value=(p.target);
                                button.danger type="submit" { "Remove" }
                            }
                        }
                    }
                }
            }
        }
        @if ps.is_empty() { p.hint { "No rotation policies: keys are rotated only when asked." } }
        h2 { "Set a policy" }
        form.card method="post" action="/policies/set" {
            (csrf(&who))
            label { "Scope " select name="scope" { option value="pool" { "every pool of this name" } option value="volume" { "one volume (name or id)" } } }
            label { "Target " input type="text" name="target" required; }
            label { "Rekey when older than " input type="text" name="max_key_age" placeholder="90d" required; span.hint { " a number with s, m, h or d" } }
            label { "Mode " select name="mode" { option value="shallow" { "shallow" } option value="deep" { "deep" } } }
            label { "Deep rekey after a migration " input type="text" name="after_migration" placeholder="at once"; }
            button type="submit" { "Set policy" }
        }
    };
    Page::new("Rotation policies", Some(&who), body).at(StatusCode::OK, "/policies")
}

fn duration(what: &'static str, text: &str) -> Result<u64, CoreError> {
    crate::model::names::parse_duration(text).map_err(|e| {
        CoreError::Invalid(InvalidInput {
            what,
            value: text.to_owned(),
            why: e.why,
        })
    })
}

/// Sets a policy (`policy set`).
pub(crate) async fn set_policy(
    State(c): State<Arc<Console>>,
    who: Who,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    let parsed = (|| -> Result<Policy, CoreError> {
        Ok(Policy {
            scope: parsed(&f, "scope")?,
            target: field(&f, "target").to_owned(),
            max_key_age_secs: duration("max key age", field(&f, "max_key_age"))?,
            mode: parsed(&f, "mode")?,
            after_migration_secs: match field(&f, "after_migration") {
                "" => 0,
                t => duration("after migration", t)?,
            },
        })
    })();
    let p = match parsed {
        Ok(p) => p,
        Err(e) => return layout::refused(&who, "Set policy", &e),
    };
    let caller = who.caller();
    let r = call(&c, move |core| core.set_policy(&caller, &p)).await;
    answer(&who, "Set policy", r, |_| "/policies".into())
}

/// Removes a policy (`policy remove`).
pub(crate) async fn remove_policy(
    State(c): State<Arc<Console>>,
    who: Who,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    let scope: PolicyScope = match parsed(&f, "scope") {
        Ok(s) => s,
        Err(e) => return layout::refused(&who, "Remove policy", &e),
    };
    let target = field(&f, "target").to_owned();
    let caller = who.caller();
    let r = call(&c, move |core| core.remove_policy(&caller, scope, &target)).await;
    answer(&who, "Remove policy", r, |_| "/policies".into())
}

/// Guests, and the migrations in flight.
pub(crate) async fn guests(State(c): State<Arc<Console>>, who: Who) -> Response {
    let gs = match call(&c, |core| core.list_guests(None)).await {
        Ok(g) => g,
        Err(e) => return layout::refused(&who, "Guests", &e),
    };
    let moving: Vec<_> = gs.iter().filter(|g| g.migrating_to.is_some()).collect();
    let body = html! {
        h2 { "Migrations in flight" }
        @if moving.is_empty() { p.hint { "None." } } @else {
            table {
                thead { tr { th { "Guest" } th { "From" } th { "To" } } }
                tbody { @for g in &moving { tr { td { (g.name) } td { (g.host) } td { (g.migrating_to.as_deref().unwrap_or("")) } } } }
            }
        }
        h2 { "Guests" }
        table {
            thead { tr { th { "Guest" } th { "Host" } th { "State" } th { "Waiting for the host" } th { "Last error" } th { "UUID" } } }
            tbody {
                @for g in &gs {
                    tr {
                        td { (g.name) } td { (g.host) } td { (state(g.state.as_str())) }
                        td { @if let Some(p) = g.pending { (p.as_str()) } @else { "–" } }
                        td { (g.last_error) }
                        td.mono { (g.uuid) }
                    }
                }
            }
        }
        @if gs.is_empty() { p.hint { "No guests defined through guestkey." } }
    };
    Page::new("Guests", Some(&who), body).at(StatusCode::OK, "/guests")
}

/// Starts whose keys wait for an operator's approval.
pub(crate) async fn pending(State(c): State<Arc<Console>>, who: Who) -> Response {
    let rs = match call(&c, |core| core.release_requests(false)).await {
        Ok(r) => r,
        Err(e) => return layout::refused(&who, "Approvals", &e),
    };
    let body = html! {
        table {
            thead { tr { th { "Request" } th { "Host" } th { "Guest" } th { "Volumes" } th { "Asked" } th {} } }
            tbody {
                @for r in &rs {
                    tr {
                        td.mono { (r.id) } td { (r.host) } td { (r.guest_name) } td { (r.volumes.join(", ")) } td { (time(r.created_unix)) }
                        td {
                            form method="post" action=(format!("/pending/{}", r.id)) {
                                (csrf(&who))
                                input type="text" name="note" placeholder="note (optional)" maxlength="1024";
                                " "
                                button type="submit" name="decision" value="approve" { "Approve" }
                                " "
                                button.danger type="submit" name="decision" value="deny" { "Deny" }
                            }
                        }
                    }
                }
            }
        }
        @if rs.is_empty() { p.hint { "No start waits for an approval." } }
    };
    Page::new("Pending approvals", Some(&who), body).at(StatusCode::OK, "/pending")
}

/// Approves or denies a request (`pending approve|deny`).
pub(crate) async fn decide(
    State(c): State<Arc<Console>>,
    who: Who,
    Path(id): Path<String>,
    axum::Form(f): Form,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &f) {
        return r;
    }
    let approve = match field(&f, "decision") {
        "approve" => true,
        "deny" => false,
        other => {
            return layout::error_page(
                Some(&who),
                StatusCode::BAD_REQUEST,
                "Approvals",
                &format!("decision {other:?}: use Approve or Deny. Nothing was changed."),
            );
        }
    };
    let note = field(&f, "note").to_owned();
    let caller = who.caller();
    let r = call(&c, move |core| {
        core.decide_request(&caller, &id, approve, &note)
    })
    .await;
    answer(&who, "Approvals", r, |_| "/pending".into())
}

/// Records the audit page searches (the newest ones).
const AUDIT_WINDOW: u64 = 5_000;
/// Records it shows at most.
const AUDIT_SHOWN: usize = 500;

/// The audit log, verified, filtered.
pub(crate) async fn audit(
    State(c): State<Arc<Console>>,
    who: Who,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let action = field(&q, "action").to_owned();
    let actor = field(&q, "actor").to_owned();
    let subject = field(&q, "subject").to_owned();
    let text = field(&q, "text").to_owned();
    if [&action, &actor, &subject, &text]
        .iter()
        .any(|s| s.len() > 256)
    {
        return layout::error_page(
            Some(&who),
            StatusCode::BAD_REQUEST,
            "Audit log",
            "A filter has at most 256 characters.",
        );
    }
    let s2 = subject.clone();
    let r = call(&c, move |core| {
        let verified = core.verify_audit(None)?;
        let records = if s2.is_empty() {
            let head = verified.records;
            core.list_audit(head.saturating_sub(AUDIT_WINDOW), AUDIT_WINDOW as u32)?
        } else {
            core.audit_of(&s2, AUDIT_WINDOW as u32)?
        };
        Ok((verified, records))
    })
    .await;
    let (v, records) = match r {
        Ok(x) => x,
        Err(e) => return layout::refused(&who, "Audit log", &e),
    };
    let shown: Vec<_> = records
        .iter()
        .rev()
        .filter(|r| action.is_empty() || r.action.starts_with(action.as_str()))
        .filter(|r| actor.is_empty() || r.actor.contains(actor.as_str()))
        .filter(|r| {
            text.is_empty() || r.detail.contains(text.as_str()) || r.subject.contains(text.as_str())
        })
        .take(AUDIT_SHOWN)
        .collect();
    let body = html! {
        @if v.ok {
            p.ok-box id="audit-verified" { "Verified: " (v.records) " records, hash chain and MACs intact, " (v.checkpoints) " signed heads match." }
        } @else {
            p.error id="audit-verified" role="alert" { "Verification FAILED at record " (v.first_bad_seq) ": " (v.problem) }
        }
        form.filters method="get" action="/audit" {
            label { "Action starts with " input type="text" name="action" value=(action) placeholder="key."; }
            " "
            label { "Actor " input type="text" name="actor" value=(actor) placeholder="admin:"; }
            " "
            label { "Subject " input type="text" name="subject" value=(subject) placeholder="volume id, host"; }
            " "
            label { "Text " input type="text" name="text" value=(text); }
            " "
            button type="submit" { "Filter" }
        }
        p.hint { "The newest " (AUDIT_WINDOW) " records (of the subject, when one is given) are searched; at most " (AUDIT_SHOWN) " shown, newest first. " code { "guestkeyctl audit" } " reads all of them." }
        table {
            thead { tr { th { "#" } th { "Time" } th { "Actor" } th { "Action" } th { "Subject" } th { "Detail" } } }
            tbody {
                @for r in &shown {
                    tr { td.num { (r.seq) } td { (time(r.time_ms / 1000)) } td { (r.actor) } td.mono { (r.action) } td.mono { (r.subject) } td { (r.detail) } }
                }
            }
        }
    };
    Page::new("Audit log", Some(&who), body).at(StatusCode::OK, "/audit")
}
