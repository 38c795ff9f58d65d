//! The host's keys sealed to its TPM, reported to the management server
//! (`guestkeyctl host show` shows them): the TCTI, the PCR selection, the
//! authority, the PCR values read now, and whether they unseal. Sent when
//! guestkeyd starts, also while its keys do not unseal (a locked host says
//! why from afar), over the same pinned mutual-TLS link as the other
//! reports; nothing secret is in it.

use std::time::Duration;

use guestkey_proto::host::{PcrReading, TpmReport, host_api_client::HostApiClient};

use super::link::ServerLink;
use crate::protect::{KEYS, keyset};
use crate::state::StateDir;

/// Sends one report (a host whose keys are in files sends none); failures
/// are logged, the next start reports again.
pub async fn report_tpm(dir: StateDir) {
    if !keyset(dir.root()).is_sealed() {
        return;
    }
    let link = match ServerLink::from_state(&dir) {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "TPM report not sent");
            return;
        }
    };
    let root = dir.root().to_owned();
    let status = match tokio::task::spawn_blocking(move || keyset(&root).status(&KEYS[0])).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the TPM status to report");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "the TPM status task failed");
            return;
        }
    };
    let report = TpmReport {
        tcti: status.tcti.clone(),
        pcrs: status.pcrs.clone(),
        authority: status.authority.clone(),
        current: status
            .current
            .iter()
            .map(|(p, v)| PcrReading {
                pcr: u32::from(p),
                sha256: v.to_string(),
            })
            .collect(),
        approvals: u32::try_from(status.approvals).unwrap_or(u32::MAX),
        unseals: status.unseals,
    };
    let sent = async {
        let channel = link
            .connect(Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        HostApiClient::new(channel)
            .report_tpm(report)
            .await
            .map_err(|e| e.message().to_owned())
    };
    match sent.await {
        Ok(_) => tracing::info!(
            unseals = status.unseals,
            "TPM status reported to the server"
        ),
        Err(e) => tracing::warn!(error = %e, "TPM status not reported to the server"),
    }
}
