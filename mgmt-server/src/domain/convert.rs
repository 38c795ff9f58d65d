//! `volume encrypt`: an existing cleartext volume comes under guestkey.
//!
//! Unlike other volume operations, the admin's call pushes the encryption
//! to the host itself and waits for it, so that a refusal (no such volume,
//! wrong format, already encrypted, a backing file) comes back as the
//! command's error with nothing changed: the record and its new key go. Only
//! when the outcome is unknown (host unreachable, time limit) does the
//! volume stay `pending-encrypt` for the pusher to retry; the host's step is
//! repeatable (an image its key already opens was done).

use std::sync::Arc;

use crate::domain::Core;
use crate::domain::agent::AgentErrorKind;
use crate::model::{Caller, CoreError, VolumeFormat, VolumeInfo};

impl Core {
    /// Encrypts the cleartext volume `name` of `pool` on `host`.
    pub async fn encrypt_volume(
        self: &Arc<Self>,
        caller: Caller,
        host: String,
        pool: String,
        name: String,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, CoreError> {
        let (v, op) = self
            .blocking(move |c| {
                let v = c.record_encryption(&caller, &host, &pool, &name, format)?;
                let op = c
                    .prepare_pushes(std::slice::from_ref(&v))?
                    .pop()
                    .ok_or_else(|| CoreError::Internal("no push prepared".into()))?;
                Ok((v, op))
            })
            .await?;
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                let msg = e.to_string();
                let v2 = v.clone();
                let m2 = msg.clone();
                self.blocking(move |c| c.encrypt_refused(&v2, &m2)).await?;
                return Err(CoreError::FailedPrecondition(msg));
            }
        };
        match self.deliver(&v, op, true).await {
            Ok(done) => {
                let v2 = v.clone();
                self.blocking(move |c| {
                    c.record_pushes(&[(v2.clone(), Ok(done))])?;
                    c.get_volume(&v2.id)
                })
                .await
            }
            Err(e) if e.kind == AgentErrorKind::Refused => {
                let v2 = v.clone();
                let msg = e.message.clone();
                self.blocking(move |c| c.encrypt_refused(&v2, &msg)).await?;
                Err(CoreError::FailedPrecondition(e.message))
            }
            Err(e) => {
                let v2 = v.clone();
                let msg = e.message.clone();
                self.blocking(move |c| c.encrypt_retry_later(&v2, &msg))
                    .await?;
                let tail = if e.kind == AgentErrorKind::Unreachable {
                    " when the host answers"
                } else {
                    ""
                };
                Err(CoreError::FailedPrecondition(format!(
                    "{}; volume {} stays pending-encrypt and is retried{tail}",
                    e.message, v.name
                )))
            }
        }
    }
}
