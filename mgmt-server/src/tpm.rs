//! The server's keys sealed to its TPM: `init --master-key-source tpm`,
//! `tpm approve`, `tpm status` and `reseal`.
//!
//! Sealed are the master key (it wraps every volume key) and the three CA
//! keys; they live in `DATA_DIR/tpm/` (see [`crate::datadir`]) and open only
//! on this machine's TPM, while its PCRs have values the PCR authority
//! approved (TPM2_PolicyAuthorize, see `guestkey_protect::tpm`). The
//! authority's private key is a file the operator keeps off this machine;
//! `tpm approve` signs the PCR values of an update with it, in advance.
//!
//! `reseal` changes the PCR selection, moves the keys to another TPM, from
//! files to the TPM or back. It builds the new `tpm.new/` beside the old
//! keys and switches with one rename, so a crash at any point leaves the
//! old keys or the new ones ([`DataDir::recover_tpm`] finishes a switch
//! that stopped between its two renames).
//!
//! Composition like [`crate::roles`]: imports the leaf modules, the SQLite
//! store and the domain's audit chain.

use std::path::{Path, PathBuf};

use guestkey_protect::tpm::{
    APPROVALS_FILE, Approvals, Authority, Entropy, PcrSelection, PcrValue, SealedStatus, TpmSite,
    current_pcrs,
};
use guestkey_protect::{Encoding, KeyProtector, ProtectedKey, ProtectorSpec};

use crate::datadir::{DataDir, create_private_dir};
use crate::domain::{KeyRing, audit};
use crate::model::CoreError;
use crate::store::sqlite::SqliteStore;
use crate::store::{Access, Store};

/// The TCTI used when none is named: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Where the keys are to be sealed.
#[derive(Debug, Clone)]
pub struct TpmTarget {
    /// The TPM.
    pub tcti: String,
    /// The PCRs.
    pub pcrs: PcrSelection,
    /// The PCR authority's private key file (made when missing).
    pub authority_key: PathBuf,
}

fn tpm_err(e: guestkey_protect::tpm::TpmError) -> CoreError {
    CoreError::FailedPrecondition(e.to_string())
}

fn protect_err(e: guestkey_protect::ProtectError) -> CoreError {
    CoreError::FailedPrecondition(e.to_string())
}

/// The command that approves the current PCR values of `data_dir`.
pub fn approve_hint(data_dir: &Path, authority_key: &Path) -> String {
    format!(
        "guestkey-server tpm approve --data-dir {} --authority-key {} --current",
        data_dir.display(),
        authority_key.display()
    )
}

/// The authority key at `path`: opened, or made when there is none.
fn authority(path: &Path) -> Result<Authority, CoreError> {
    if path.exists() {
        Authority::open(path).map_err(tpm_err)
    } else {
        if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir(p)
                .map_err(|e| CoreError::Internal(format!("cannot create {}: {e}", p.display())))?;
        }
        let a = Authority::create(path).map_err(tpm_err)?;
        tracing::warn!(
            authority = %a.public().fingerprint(),
            "new PCR authority key {}: keep it off this machine (whoever has it can approve PCR values for this server)",
            path.display()
        );
        Ok(a)
    }
}

/// Makes `tpm_dir` (a new directory) with an approval of the PCR values
/// the TPM has now, and returns its settings; the caller saves them
/// (`site.json`, written last, marks the directory complete). `data_dir`
/// is the data directory's final name (for the command named in errors).
pub fn prepare_site(
    tpm_dir: &Path,
    data_dir: &Path,
    target: &TpmTarget,
) -> Result<TpmSite, CoreError> {
    create_private_dir(tpm_dir)
        .map_err(|e| CoreError::Internal(format!("cannot create {}: {e}", tpm_dir.display())))?;
    let a = authority(&target.authority_key)?;
    let site = TpmSite {
        tcti: target.tcti.clone(),
        pcrs: target.pcrs.clone(),
        authority: a.public(),
        approve_hint: approve_hint(data_dir, &target.authority_key),
    };
    let now = current_pcrs(&target.tcti, &target.pcrs).map_err(tpm_err)?;
    let approval = a
        .approve(now, "the PCR values when the keys were sealed")
        .map_err(tpm_err)?;
    Approvals::add_and_save(&tpm_dir.join(APPROVALS_FILE), approval).map_err(tpm_err)?;
    Ok(site)
}

/// A new master key from the TPM's and the OS's random bytes.
pub fn new_master_key(tcti: &str) -> Result<ProtectedKey, CoreError> {
    Entropy::with_tpm(tcti)
        .and_then(|e| e.key(32))
        .map_err(tpm_err)
}

/// Signs PCR values for the server in `data_dir`: `set` names PCRs and
/// their values after an update; the other PCRs of the selection keep
/// their current values. Returns the approved values.
pub fn approve(
    data_dir: &Path,
    authority_key: &Path,
    set: &[(u8, PcrValue)],
    note: &str,
) -> Result<guestkey_protect::tpm::PcrValues, CoreError> {
    let dir = DataDir::new(data_dir);
    dir.recover_tpm()
        .map_err(|e| CoreError::Internal(e.to_string()))?;
    if !dir.is_tpm() {
        return Err(CoreError::FailedPrecondition(format!(
            "the keys of {} are not sealed to a TPM (see `guestkey-server reseal --to-tpm`)",
            data_dir.display()
        )));
    }
    let site = TpmSite::load(&dir.tpm_dir()).map_err(tpm_err)?;
    let a = Authority::open(authority_key).map_err(tpm_err)?;
    if a.public() != site.authority {
        return Err(CoreError::FailedPrecondition(format!(
            "{} is PCR authority {}, but the keys of {} accept approvals of authority {} only",
            authority_key.display(),
            a.public().fingerprint(),
            data_dir.display(),
            site.authority.fingerprint()
        )));
    }
    for (p, _) in set {
        if !site.pcrs.pcrs().contains(p) {
            return Err(CoreError::FailedPrecondition(format!(
                "PCR {p} is not one the keys are sealed for ({}): approve values of those PCRs only, or change them with `guestkey-server reseal --pcrs`",
                site.pcrs
            )));
        }
    }
    let mut values = current_pcrs(&site.tcti, &site.pcrs).map_err(tpm_err)?;
    for (p, v) in set {
        values = values.with(*p, *v);
    }
    let approval = a.approve(values.clone(), note).map_err(tpm_err)?;
    Approvals::add_and_save(&dir.tpm_dir().join(APPROVALS_FILE), approval).map_err(tpm_err)?;
    Ok(values)
}

/// The sealed master key's status.
pub fn status(data_dir: &Path) -> Result<SealedStatus, CoreError> {
    let dir = DataDir::new(data_dir);
    dir.recover_tpm()
        .map_err(|e| CoreError::Internal(e.to_string()))?;
    if !dir.is_tpm() {
        return Err(CoreError::FailedPrecondition(format!(
            "the keys of {} are kept in files, not sealed to a TPM",
            data_dir.display()
        )));
    }
    let tpm_dir = dir.tpm_dir();
    let site = TpmSite::load(&tpm_dir).map_err(tpm_err)?;
    site.protector(&tpm_dir, &tpm_dir.join("master.key.tpm"))
        .status()
        .map_err(tpm_err)
}

/// The keys of a data directory: name, file when not sealed, encoding.
const KEYS: [(&str, &str, Encoding); 4] = [
    ("master.key", "master.key", Encoding::Base64),
    ("ca.key", "ca/ca.key", Encoding::Raw),
    ("server-ca.key", "ca/server-ca.key", Encoding::Raw),
    ("admin-ca.key", "ca/admin-ca.key", Encoding::Raw),
];

/// Where `reseal` puts the keys.
#[derive(Debug, Clone)]
pub enum ResealTo {
    /// Sealed to a TPM (the same one with other PCRs, another one, or the
    /// first time, from files).
    Tpm(TpmTarget),
    /// Back into files of mode 0600.
    Files,
}

/// What `reseal` did.
#[derive(Debug)]
pub struct ResealReport {
    /// The keys moved.
    pub keys: Vec<String>,
    /// Where they were.
    pub from: String,
    /// Where they are now.
    pub to: String,
}

/// Moves every key of the data directory to `to`; the server must be
/// stopped. Nothing is lost at any instant: the new copies are complete
/// before the switch, and the old ones go after it.
pub fn reseal(data_dir: &Path, to: &ResealTo) -> Result<ResealReport, CoreError> {
    let dir = DataDir::new(data_dir);
    if !dir.db().exists() {
        return Err(CoreError::FailedPrecondition(format!(
            "{} is not a guestkey data directory (no guestkey.db)",
            data_dir.display()
        )));
    }
    let _lock = dir
        .hold("stop it first: reseal moves the keys it holds")
        .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    dir.recover_tpm()
        .map_err(|e| CoreError::Internal(e.to_string()))?;
    let was_tpm = dir.is_tpm();
    if was_tpm {
        // A move from files that stopped before erasing them.
        for (name, file, enc) in KEYS {
            let plain = dir.root().join(file);
            if plain.exists() && dir.tpm_dir().join(format!("{name}.tpm")).exists() {
                erase(&plain, enc)?;
            }
        }
    }
    let from = if was_tpm {
        let site = TpmSite::load(&dir.tpm_dir()).map_err(tpm_err)?;
        format!("TPM {} (PCRs {})", site.tcti, site.pcrs)
    } else {
        "files".to_owned()
    };
    if matches!(to, ResealTo::Files) && !was_tpm {
        return Err(CoreError::FailedPrecondition(format!(
            "the keys of {} are already in files",
            data_dir.display()
        )));
    }
    // 1. Every key, as it is now.
    let mut keys = Vec::new();
    for (name, file, enc) in KEYS {
        let source = current_source(&dir, name, file, was_tpm);
        let p = source.protector(enc, name);
        if p.exists().map_err(protect_err)? {
            keys.push((name, file, enc, p.unseal().map_err(protect_err)?));
        }
    }
    if !keys.iter().any(|(n, ..)| *n == "master.key") {
        return Err(CoreError::FailedPrecondition(format!(
            "{} keeps its master key elsewhere (env: or prompt): reseal moves only keys kept in the data directory",
            data_dir.display()
        )));
    }
    // 2. The new copies, complete, then the switch.
    let tpm_dir = dir.tpm_dir();
    let staged = dir.root().join("tpm.new");
    let old = dir.root().join("tpm.old");
    let to_text = match to {
        ResealTo::Tpm(target) => {
            let _ = std::fs::remove_dir_all(&staged);
            let site = prepare_site(&staged, data_dir, target)?;
            for (name, _, _, key) in &keys {
                site.protector(&staged, &staged.join(format!("{name}.tpm")))
                    .create(key)
                    .map_err(protect_err)?;
            }
            site.save(&staged).map_err(tpm_err)?;
            sync(&staged)?;
            if was_tpm {
                rename(&tpm_dir, &old)?;
            }
            rename(&staged, &tpm_dir)?;
            sync(dir.root())?;
            let _ = std::fs::remove_dir_all(&old);
            if !was_tpm {
                for (_, file, enc, _) in &keys {
                    erase(&dir.root().join(file), *enc)?;
                }
            }
            format!("TPM {} (PCRs {})", target.tcti, target.pcrs)
        }
        ResealTo::Files => {
            for (_, file, enc, key) in &keys {
                let p = guestkey_protect::FileProtector::new(dir.root().join(file), *enc);
                if p.exists().map_err(protect_err)? {
                    p.replace(key).map_err(protect_err)?;
                } else {
                    p.create(key).map_err(protect_err)?;
                }
            }
            rename(&tpm_dir, &old)?;
            sync(dir.root())?;
            let _ = std::fs::remove_dir_all(&old);
            "files".to_owned()
        }
    };
    // 3. The audit record.
    let names: Vec<String> = keys.iter().map(|(n, ..)| (*n).to_owned()).collect();
    let store = SqliteStore::open(&dir.db())?;
    let ring = KeyRing::load(dir.default_master_key_source(), &store)?;
    ring.ensure_audit_key(&store)?;
    let mut tx = store.begin(Access::Write)?;
    let key = ring.audit_key(&mut *tx)?;
    audit::append(
        &mut *tx,
        &key,
        "server",
        "server.keys-resealed",
        "",
        &format!("{} moved from {from} to {to_text}", names.join(", ")),
    )?;
    tx.commit()?;
    Ok(ResealReport {
        keys: names,
        from,
        to: to_text,
    })
}

fn current_source(dir: &DataDir, name: &str, file: &str, tpm: bool) -> ProtectorSpec {
    if tpm {
        ProtectorSpec::Tpm(dir.tpm_dir().join(format!("{name}.tpm")))
    } else {
        ProtectorSpec::File(dir.root().join(file))
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), CoreError> {
    std::fs::rename(from, to).map_err(|e| {
        CoreError::Internal(format!(
            "cannot rename {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

fn sync(path: &Path) -> Result<(), CoreError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| CoreError::Internal(format!("cannot sync {}: {e}", path.display())))
}

/// Overwrites a key file that is no longer used, then removes it.
fn erase(path: &Path, _enc: Encoding) -> Result<(), CoreError> {
    use std::io::Write;
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(0)]);
        let _ = f.sync_all();
    }
    std::fs::remove_file(path)
        .map_err(|e| CoreError::Internal(format!("cannot remove {}: {e}", path.display())))
}
