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
use std::time::Duration;

use crate::core::{Caller, Core, CoreError};
use crate::volumes::VolumeInfo;

/// Longest wait for the host to copy the volume.
const ENCRYPT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Encrypts the cleartext volume `name` of `pool` on `host`.
pub async fn encrypt_volume(
    core: Arc<Core>,
    caller: Caller,
    host: String,
    pool: String,
    name: String,
    format: String,
) -> Result<VolumeInfo, CoreError> {
    let c = core.clone();
    let (v, op) = tokio::task::spawn_blocking(move || {
        let v = c.encrypt_volume(&caller, &host, &pool, &name, &format)?;
        let op = c
            .prepare_pushes(std::slice::from_ref(&v))?
            .pop()
            .ok_or_else(|| CoreError::Internal("no push prepared".into()))?;
        Ok::<_, CoreError>((v, op))
    })
    .await
    .map_err(|e| CoreError::Internal(e.to_string()))??;
    let op = match op {
        Ok(op) => op,
        Err(e) => {
            core.encrypt_refused(&v, &e)?;
            return Err(CoreError::FailedPrecondition(e));
        }
    };
    let host = core.enrolled_host(&v.host)?;
    let client = match crate::push::agent_client(&core, &host, Some(ENCRYPT_TIMEOUT)).await {
        Ok(c) => c,
        Err(e) => {
            core.encrypt_retry_later(&v, &e)?;
            return Err(CoreError::FailedPrecondition(format!(
                "{e}; volume {} stays pending-encrypt and is retried when the host answers",
                v.name
            )));
        }
    };
    match crate::push::send_volume_op(client, op).await {
        Ok(done) => {
            core.record_pushes(&[(v.clone(), Ok(done))])?;
            core.get_volume(&v.id)
        }
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ) =>
        {
            let msg = crate::push::describe_status(&host, &s);
            core.encrypt_refused(&v, &msg)?;
            Err(CoreError::FailedPrecondition(msg))
        }
        Err(s) => {
            let msg = crate::push::describe_status(&host, &s);
            core.encrypt_retry_later(&v, &msg)?;
            Err(CoreError::FailedPrecondition(format!(
                "{msg}; volume {} stays pending-encrypt and is retried",
                v.name
            )))
        }
    }
}
