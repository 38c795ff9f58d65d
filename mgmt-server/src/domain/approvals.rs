//! Release gates, operator approval (after klefki): a start whose keys
//! need an approval makes a request that waits on the server;
//! `guestkeyctl pending list` shows it (host, guest, volumes, the host's
//! attestation, time waited), `guestkeyctl pending approve|deny ID`
//! decides. An approval is good for one release: the start that uses it.
//! A start waits `limits.approval_wait_secs` and then fails naming the
//! request and the command; the request stays open (a later start of the
//! same guest on the same host finds it) until `limits.approval_valid_secs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::domain::on_demand::Purpose;
use crate::domain::{Core, now_unix};
use crate::model::{Caller, CoreError, ReleaseRequest, RequestState};
use crate::store::Tx;

/// How often a waiting start looks at its request.
const POLL: Duration = Duration::from_millis(200);

/// A new request id: `rq-` and 12 hex digits.
fn new_id() -> Result<String, CoreError> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| CoreError::Internal(format!("no random bytes: {e}")))?;
    Ok(format!("rq-{}", hex::encode(b)))
}

impl Core {
    fn expire_requests(&self, tx: &mut dyn Tx) -> Result<(), CoreError> {
        let before = now_unix() - i64::from(self.limits.approval_valid_secs);
        for id in tx.expire_requests(before)? {
            self.log(
                tx,
                "server",
                "release.expired",
                &id,
                "not decided or used in time",
            )?;
        }
        Ok(())
    }

    /// The open request of `host` for guest `uuid`, or a new one (audited).
    fn open_request(
        &self,
        host: &str,
        uuid: &str,
        name: &str,
        purpose: Purpose,
        volumes: &[String],
    ) -> Result<ReleaseRequest, CoreError> {
        self.write(|tx| {
            self.expire_requests(tx)?;
            if let Some(r) = tx.open_request(host, uuid)? {
                if r.volumes == volumes {
                    return Ok(r);
                }
                // Made for other disks than the guest has now.
                tx.move_request(&r.id, r.state, RequestState::Expired, now_unix(), "", "")?;
                self.log(
                    tx,
                    "server",
                    "release.expired",
                    &r.id,
                    "the guest's gated disks changed",
                )?;
            }
            let r = ReleaseRequest {
                id: new_id()?,
                host: host.to_owned(),
                guest_uuid: uuid.to_owned(),
                guest_name: name.to_owned(),
                volumes: volumes.to_vec(),
                state: RequestState::Pending,
                created_unix: now_unix(),
                decided_unix: 0,
                decided_by: String::new(),
                note: String::new(),
            };
            tx.insert_request(&r)?;
            self.log(
                tx,
                &format!("host:{host}"),
                "release.requested",
                &r.id,
                &format!(
                    "keys of guest {name} ({uuid}) for its {} on host {host}: {}",
                    purpose.as_str(),
                    volumes.join(", ")
                ),
            )?;
            Ok(r)
        })
    }

    /// Waits for an operator's approval of `host`'s request for the keys
    /// of guest `uuid` (the request is made, or the open one found);
    /// returns the request's id once approved. The caller uses the
    /// approval in the transaction that releases. Denied, expired or not
    /// decided in time: an error naming the request and what to run.
    pub(crate) async fn await_approval(
        self: &Arc<Self>,
        host: &str,
        uuid: &str,
        name: &str,
        purpose: Purpose,
        volumes: Vec<String>,
    ) -> Result<String, CoreError> {
        let (h, u, n) = (host.to_owned(), uuid.to_owned(), name.to_owned());
        let r = self
            .blocking(move |c| c.open_request(&h, &u, &n, purpose, &volumes))
            .await?;
        let id = r.id;
        let end = Instant::now() + Duration::from_secs(u64::from(self.limits.approval_wait_secs));
        loop {
            let i = id.clone();
            let r = self
                .blocking(move |c| {
                    c.read(|tx| {
                        tx.request(&i)?
                            .ok_or_else(|| CoreError::Internal(format!("request {i} vanished")))
                    })
                })
                .await?;
            match r.state {
                RequestState::Approved => return Ok(id),
                RequestState::Pending => {}
                RequestState::Denied => {
                    return Err(CoreError::Denied(format!(
                        "request {id} for the keys of guest {} was denied by {}{}",
                        r.guest_name,
                        r.decided_by,
                        if r.note.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.note)
                        }
                    )));
                }
                state => {
                    return Err(CoreError::Denied(format!(
                        "request {id} for the keys of guest {} is {state}: start the guest again to make a new one",
                        r.guest_name
                    )));
                }
            }
            if Instant::now() >= end {
                return Err(CoreError::Unapproved(format!(
                    "the {} of guest {name} waits for an operator's approval: request {id} (host {host}); an admin runs `guestkeyctl pending approve {id}` (or `guestkeyctl pending deny {id}`), then start the guest again",
                    purpose.as_str()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Requests, newest first: the open ones, or all.
    pub fn release_requests(&self, all: bool) -> Result<Vec<ReleaseRequest>, CoreError> {
        self.write(|tx| {
            self.expire_requests(tx)?;
            let mut out = tx.requests(None)?;
            if !all {
                out.retain(|r| r.state == RequestState::Pending);
            }
            Ok(out)
        })
    }

    /// An operator approves or denies a pending request; audited.
    pub fn decide_request(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        note: &str,
    ) -> Result<ReleaseRequest, CoreError> {
        if note.len() > 1024 {
            return Err(CoreError::Invalid(crate::model::InvalidInput {
                what: "note",
                value: format!("{} bytes", note.len()),
                why: "a note holds at most 1024 bytes".into(),
            }));
        }
        self.write(|tx| {
            self.expire_requests(tx)?;
            let r = tx.request(id)?.ok_or_else(|| {
                CoreError::NotFound(format!(
                    "no request {id}: `guestkeyctl pending list` shows the open ones"
                ))
            })?;
            if r.state != RequestState::Pending {
                return Err(CoreError::FailedPrecondition(format!(
                    "request {id} is {}, not pending: nothing to decide",
                    r.state
                )));
            }
            let to = if approve {
                RequestState::Approved
            } else {
                RequestState::Denied
            };
            tx.move_request(
                id,
                RequestState::Pending,
                to,
                now_unix(),
                &caller.actor(),
                note,
            )?;
            let action = if approve {
                "release.approved"
            } else {
                "release.denied"
            };
            self.log(
                tx,
                &caller.actor(),
                action,
                id,
                &format!(
                    "keys of guest {} on host {}{}",
                    r.guest_name,
                    r.host,
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(": {note}")
                    }
                ),
            )?;
            tx.request(id)?
                .ok_or_else(|| CoreError::Internal(format!("request {id} vanished")))
        })
    }
}
