//! Keys released when QEMU needs them: a host keeps no key of a volume
//! whose release is not `auto` (the server sends it none at a guest's
//! definition or a migration's preparation), and asks for them each time
//! it starts the guest or receives it (`HostApi.ReleaseKeys`, from the
//! hook). Each key goes out through its volume's gates (for `attested`, a
//! quote of the host taken now with its own nonce), audited, sealed to the
//! host. A stolen host, or one whose software changed, gets nothing by its
//! certificate alone, even if its own TPM still unseals its store.

use std::sync::Arc;

use crate::domain::Core;
use crate::domain::agent::SealedKey;
use crate::domain::hosts::enrolled_in;
use crate::domain::release::seal_for;
use crate::model::{CoreError, ReleasePolicy};
use crate::store::GuestKey;

/// Why a host asks for a guest's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The guest starts (also a restore, an autostart).
    Start,
    /// The guest comes to this host in a migration.
    Migration,
}

/// The keys a host does not keep: those whose release is not `auto`.
fn gated(keys: Vec<GuestKey>) -> Vec<GuestKey> {
    keys.into_iter()
        .filter(|k| k.release != ReleasePolicy::Auto)
        .collect()
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
        let (enrolled, owner, name, attest, approve, purpose) = self
            .blocking(move |c| {
                c.read(|tx| {
                    let g = tx.guest(&u)?.ok_or_else(|| {
                        CoreError::NotFound(format!(
                            "the server has no guest {u}: define it with `guestkeyctl guest define`"
                        ))
                    })?;
                    if g.state.is_undefined() {
                        return Err(CoreError::FailedPrecondition(format!(
                            "guest {} is undefined at the server: no key of it goes out",
                            g.name
                        )));
                    }
                    let purpose = if g.host == h {
                        Purpose::Start
                    } else if g.migrating_to.as_deref() == Some(h.as_str()) {
                        Purpose::Migration
                    } else {
                        return Err(CoreError::Denied(format!(
                            "guest {} belongs to host {}{}: no key of it goes to host {h}",
                            g.name,
                            g.host,
                            g.migrating_to
                                .as_deref()
                                .map(|t| format!(" (migrating to {t})"))
                                .unwrap_or_default()
                        )));
                    };
                    let keys = gated(tx.guest_keys(&g.uuid, &g.host)?);
                    let attest = keys.iter().any(|k| k.release.needs_attestation());
                    let approve: Vec<String> = keys
                        .iter()
                        .filter(|k| k.release.needs_approval())
                        .map(|k| k.volume_id.clone())
                        .collect();
                    let mut names = Vec::with_capacity(approve.len());
                    for id in &approve {
                        names.push(tx.volume(id)?.map(|v| v.name).unwrap_or_else(|| id.clone()));
                    }
                    Ok((enrolled_in(tx, &h)?, g.host, g.name, attest, names, purpose))
                })
            })
            .await?;
        // The quote first: the operator sees its outcome with the request.
        if attest {
            self.attest(&enrolled).await?;
        }
        if !approve.is_empty() {
            let id = self
                .await_approval(&enrolled.name, uuid, &name, approve)
                .await?;
            tracing::info!(request = %id, guest = %uuid, "release approved");
            // A quote from before a long wait may have gone stale.
            if attest {
                self.attest(&enrolled).await?;
            }
        }
        let u = uuid.to_owned();
        self.blocking(move |c| {
            c.write(|tx| {
                let keys = gated(tx.guest_keys(&u, &owner)?);
                c.take_releases(&enrolled.name, keys.len() as u32)?;
                let why = match purpose {
                    Purpose::Start => format!(" for the start of guest {name}"),
                    Purpose::Migration => format!(" for the incoming migration of guest {name}"),
                };
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    let packet = c.release(
                        tx,
                        &k.volume_id,
                        k.format,
                        k.generation,
                        &enrolled,
                        &why,
                        k.release,
                    )?;
                    out.push(seal_for(&packet, &enrolled).map_err(CoreError::Internal)?);
                }
                Ok(out)
            })
        })
        .await
    }
}
