//! guestkeyd's TPM side: `tpm approve` and `tpm status`, the store key
//! made with TPM random bytes, and a locked start (keys that do not unseal)
//! that keeps refusing guestkey's guests at the hook until they do.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use guestkey_protect::tpm::cli::{ApproveFlags, status_text};
use host_daemon::hook::Gate;
use host_daemon::protect::{HostKeys, HostProtectors, keyset};
use host_daemon::state::StateDir;
use host_daemon::store::Store;

#[derive(Subcommand)]
pub(crate) enum TpmCommand {
    /// Sign PCR values with the PCR authority key, so that this host's
    /// sealed keys unseal when the PCRs have them: --current for the
    /// values now (after an update you booted), or --pcr N=SHA256 for an
    /// update's values in advance (the PCRs not named keep their current
    /// values). A running guestkeyd picks the approval up by itself.
    Approve {
        /// The state directory.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
        #[command(flatten)]
        flags: ApproveFlags,
    },
    /// The TPM, PCRs, their current values and whether the keys unseal.
    Status {
        /// The state directory.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
    },
}

/// On a host sealed to the TPM, the store key is made at the first run from
/// TPM and OS random bytes (a file-sealed host's store makes its own).
pub(crate) fn seal_first_store_key(
    dir: &StateDir,
    protectors: &HostProtectors,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let set = keyset(dir.root());
    if !set.is_sealed() {
        return Ok(());
    }
    let tcti = set.site()?.tcti;
    // The data keys of its own re-encryptions mix the TPM's bytes in too.
    match guestkey_protect::tpm::Entropy::with_tpm(&tcti) {
        Ok(e) => host_daemon::image::use_entropy(e),
        Err(e) => tracing::warn!(error = %e, "data keys from the OS generator alone"),
    }
    if protectors.store.exists()? {
        return Ok(());
    }
    match guestkey_protect::tpm::keyset::new_key(&tcti, 32) {
        Ok(k) => protectors.store.create(&k)?,
        // The TPM does not answer now: the store makes its key itself
        // when the TPM is back (sealing needs the TPM anyway).
        Err(e) => tracing::warn!(error = %e, "cannot make the store key with TPM random bytes"),
    }
    Ok(())
}

pub(crate) fn spawn_hook(gate: &Gate, socket: &Path, hook_uid: u32) {
    let gate = gate.clone();
    let socket = socket.to_owned();
    tokio::spawn(async move {
        if let Err(e) = host_daemon::hook::serve(&socket, gate, hook_uid).await {
            tracing::error!(error = %e, socket = %socket.display(), "hook socket failed");
        }
    });
}

/// How often a locked guestkeyd tries its sealed keys again.
const UNLOCK_RETRY: std::time::Duration = std::time::Duration::from_secs(3);

/// The host's keys and store. While a key sealed to the TPM does not open
/// (this boot's PCR values are not approved, another TPM, ...), the hook
/// socket refuses the guests guestkey manages with the reason and the
/// command to run, every other guest starts, and the keys are tried again
/// every few seconds: an approval takes effect without a restart. Returns
/// whether the hook socket is already served.
pub(crate) async fn unlock(
    dir: &StateDir,
    protectors: &HostProtectors,
    gate: &Gate,
    hook_socket: &Path,
    hook_uid: u32,
    managed_list: &Path,
) -> Result<(HostKeys, Store, bool), Box<dyn std::error::Error + Send + Sync>> {
    use guestkey_protect::ProtectError;
    use host_daemon::protect::KeysError;
    use host_daemon::store::StoreError;
    let mut served = false;
    let mut said = String::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let sealed_failure = match HostKeys::load(dir, &*protectors.sealing) {
            Ok(keys) => match Store::open(dir, &*protectors.store) {
                Ok(store) => return Ok((keys, store, served)),
                Err(StoreError::Protector(ProtectError::Sealed(m))) => m,
                Err(e) => return Err(e.into()),
            },
            Err(KeysError::Protector(ProtectError::Sealed(m))) => m,
            Err(e) => return Err(e.into()),
        };
        let reason = format!(
            "guestkeyd on this host cannot unseal its keys, so it gives no disk key: {sealed_failure}"
        );
        if reason != said {
            tracing::error!("{reason}; trying again every {} s", UNLOCK_RETRY.as_secs());
            let managed = std::fs::read_to_string(managed_list)
                .map(|t| {
                    t.lines()
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            gate.lock(reason.clone(), managed);
            said = reason;
            tokio::spawn(host_daemon::grpc::tpm_report::report_tpm(dir.clone()));
        }
        if !served {
            spawn_hook(gate, hook_socket, hook_uid);
            served = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(UNLOCK_RETRY) => {}
            _ = tokio::signal::ctrl_c() => return Err("stopped before its keys were unsealed".into()),
            _ = term.recv() => return Err("stopped before its keys were unsealed".into()),
        }
    }
}

pub(crate) fn tpm_command(
    command: TpmCommand,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match command {
        TpmCommand::Approve { state_dir, flags } => {
            print!("{}", flags.approve(&keyset(&state_dir))?);
            Ok(())
        }
        TpmCommand::Status { state_dir } => {
            let s = keyset(&state_dir).status(&host_daemon::protect::KEYS[0])?;
            print!("{}", status_text(&s, "guestkeyd"));
            Ok(())
        }
    }
}
