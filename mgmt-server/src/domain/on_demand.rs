//! Keys released when QEMU needs them: a host keeps no key of a volume
//! whose release is not `auto` (the server sends it none at a guest's
//! definition or a migration's preparation), and asks for them each time
//! it starts the guest or receives it (`HostApi.ReleaseKeys`, from the
//! hook). Each key goes out through its volume's gates (for `attested`, a
//! quote of the host taken now with its own nonce; for `approved`, an
//! operator's approval of this request), audited, sealed to the host.
//!
//! Everything the first look decided (the host enrolled with this
//! certificate, the guest its own or migrating to it, the gated volumes the
//! approval names) is checked again in the transaction that releases, after
//! the waits: a host revoked, a migration ended or a disk added meanwhile
//! gets nothing. The approval is used in that same transaction, so a
//! release that fails leaves it for the next start.

use std::sync::Arc;

use crate::domain::Core;
use crate::domain::agent::SealedKey;
use crate::domain::hosts::enrolled_in;
use crate::domain::release::seal_for;
use crate::model::{CoreError, EnrolledHost, RequestState};
use crate::store::{GuestKey, Tx};

/// Why a host asks for a guest's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The guest starts (also a restore, an autostart).
    Start,
    /// The guest comes to this host in a migration.
    Migration,
}

impl Purpose {
    /// For messages: "start", "incoming migration".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Migration => "incoming migration",
        }
    }
}

/// What a release for `host` of guest `uuid`'s keys involves, as the store
/// says now.
struct Look {
    host: EnrolledHost,
    owner: String,
    name: String,
    purpose: Purpose,
    /// The keys the host does not keep (policy not `auto`).
    keys: Vec<GuestKey>,
    /// Names of the volumes among them whose release needs an approval,
    /// sorted.
    approve: Vec<String>,
}

fn look(tx: &mut dyn Tx, host: &str, uuid: &str) -> Result<Look, CoreError> {
    let g = tx.guest(uuid)?.ok_or_else(|| {
        CoreError::NotFound(format!(
            "the server has no guest {uuid}: define it with `guestkeyctl guest define`"
        ))
    })?;
    if g.state.is_undefined() {
        return Err(CoreError::FailedPrecondition(format!(
            "guest {} is undefined at the server: no key of it goes out",
            g.name
        )));
    }
    let purpose = if g.host == host {
        Purpose::Start
    } else if g.migrating_to.as_deref() == Some(host) {
        Purpose::Migration
    } else {
        return Err(CoreError::Denied(format!(
            "guest {} belongs to host {}{}: no key of it goes to host {host}",
            g.name,
            g.host,
            g.migrating_to
                .as_deref()
                .map(|t| format!(" (migrating to {t})"))
                .unwrap_or_default()
        )));
    };
    let keys: Vec<GuestKey> = tx
        .guest_keys(&g.uuid, &g.host)?
        .into_iter()
        .filter(|k| k.release != crate::model::ReleasePolicy::Auto)
        .collect();
    let mut approve = Vec::new();
    for k in keys.iter().filter(|k| k.release.needs_approval()) {
        approve.push(
            tx.volume(&k.volume_id)?
                .map(|v| v.name)
                .unwrap_or_else(|| k.volume_id.clone()),
        );
    }
    approve.sort();
    Ok(Look {
        host: enrolled_in(tx, host)?,
        owner: g.host,
        name: g.name,
        purpose,
        keys,
        approve,
    })
}

impl Core {
    /// The keys of guest `uuid`'s disks that `host` does not keep at
    /// rest, released now through their gates and sealed to `host`: the
    /// guest's own host (a start), or the destination of the migration the
    /// server is driving (its incoming QEMU).
    pub async fn release_on_demand(
        self: &Arc<Self>,
        host: &str,
        uuid: &str,
    ) -> Result<Vec<SealedKey>, CoreError> {
        let (h, u) = (host.to_owned(), uuid.to_owned());
        let first = self
            .blocking(move |c| c.read(|tx| look(tx, &h, &u)))
            .await?;
        let attest = first.keys.iter().any(|k| k.release.needs_attestation());
        // The quote first: the operator sees its outcome with the request.
        if attest {
            self.attest(&first.host).await?;
        }
        let request = if first.approve.is_empty() {
            None
        } else {
            let id = self
                .await_approval(
                    &first.host.name,
                    uuid,
                    &first.name,
                    first.purpose,
                    first.approve.clone(),
                )
                .await?;
            // The quote before the wait may have gone stale.
            if attest {
                self.attest(&first.host).await?;
            }
            Some(id)
        };
        let (h, u) = (host.to_owned(), uuid.to_owned());
        self.blocking(move |c| {
            c.write(|tx| {
                let now = look(tx, &h, &u)?;
                if now.host.cert_sha256 != first.host.cert_sha256
                    || now.purpose != first.purpose
                    || now.owner != first.owner
                {
                    return Err(CoreError::Denied(format!(
                        "host {h} or guest {} changed while its keys were asked for (a new certificate, a revocation, a migration that ended): start it again",
                        now.name
                    )));
                }
                match &request {
                    Some(id) => {
                        let r = tx.request(id)?.ok_or_else(|| {
                            CoreError::Internal(format!("request {id} vanished"))
                        })?;
                        if r.volumes != now.approve {
                            return Err(CoreError::Denied(format!(
                                "the gated disks of guest {} changed since request {id} was approved ({} then, {} now): start it again for a new request",
                                now.name,
                                r.volumes.join(", "),
                                now.approve.join(", ")
                            )));
                        }
                        if !tx.move_request(
                            id,
                            RequestState::Approved,
                            RequestState::Used,
                            crate::domain::now_unix(),
                            "",
                            "",
                        )? {
                            return Err(CoreError::Denied(format!(
                                "request {id} was used by another start of guest {}: start it again for a new request",
                                now.name
                            )));
                        }
                    }
                    None if !now.approve.is_empty() => {
                        return Err(CoreError::FailedPrecondition(format!(
                            "a disk of guest {} came to need an operator's approval while its keys were asked for: start it again",
                            now.name
                        )));
                    }
                    None => {}
                }
                c.take_releases(&now.host.name, now.keys.len() as u32)?;
                let why = match (now.purpose, &request) {
                    (p, Some(id)) => format!(" for the {} of guest {}, approved in {id}", p.as_str(), now.name),
                    (p, None) => format!(" for the {} of guest {}", p.as_str(), now.name),
                };
                let mut out = Vec::with_capacity(now.keys.len());
                for k in &now.keys {
                    let packet =
                        c.release(tx, &k.volume_id, k.format, k.generation, &now.host, &why)?;
                    out.push(seal_for(&packet, &now.host).map_err(CoreError::Internal)?);
                }
                Ok(out)
            })
        })
        .await
    }
}
