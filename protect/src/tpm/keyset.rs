//! A program's keys at rest as one set that is sealed to the TPM, approved,
//! and moved together: the server's master and CA keys, a host's
//! packet-sealing and store keys.
//!
//! Each key is a file of the program's directory (`ROOT/FILE`, mode 0600)
//! or, once the set is sealed, `ROOT/tpm/NAME.tpm` beside the TPM settings
//! (`site.json`) and the approvals. [`KeySet::reseal`] builds the new
//! `tpm.new/` completely (its `site.json` last) before it switches with
//! renames, and erases the old copies only after the switch: a crash at any
//! instant leaves the old keys or the new ones, and [`recover`] finishes a
//! switch that stopped between its two renames.

use std::path::{Path, PathBuf};

use crate::tpm::authority::{Approvals, Authority};
use crate::tpm::entropy::Entropy;
use crate::tpm::pcr::{PcrSelection, PcrValue, PcrValues};
use crate::tpm::protector::{APPROVALS_FILE, SITE_FILE, SealedStatus, TpmSite};
use crate::tpm::{TpmError, current_pcrs};
use crate::{Encoding, FileProtector, KeyProtector, ProtectedKey, ProtectorSpec};

/// The TCTI used when none is named: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// One key of a set.
#[derive(Debug, Clone, Copy)]
pub struct KeyEntry {
    /// Its name (`master.key`): the sealed copy is `tpm/NAME.tpm`.
    pub name: &'static str,
    /// Its file when not sealed, relative to the root.
    pub file: &'static str,
    /// How the file holds it.
    pub encoding: Encoding,
}

/// Where keys are to be sealed.
#[derive(Debug, Clone)]
pub struct TpmTarget {
    /// The TPM.
    pub tcti: String,
    /// The PCRs.
    pub pcrs: PcrSelection,
    /// The PCR authority's private key file (made when missing).
    pub authority_key: PathBuf,
}

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

/// A program's keys.
#[derive(Debug, Clone)]
pub struct KeySet {
    root: PathBuf,
    keys: &'static [KeyEntry],
    /// The command that approves the current PCR values, given the
    /// authority key's path.
    hint: fn(&Path, &Path) -> String,
}

/// Finishes a switch of `ROOT/tpm` that stopped between its renames and
/// removes what a finished or abandoned one left (`tpm.new`, `tpm.old`).
pub fn recover(root: &Path) -> std::io::Result<()> {
    let tpm = root.join("tpm");
    let new = root.join("tpm.new");
    let old = root.join("tpm.old");
    if !tpm.exists() && old.exists() && new.join(SITE_FILE).exists() {
        std::fs::rename(&new, &tpm)?;
    }
    for leftover in [new, old] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover)?;
        }
    }
    Ok(())
}

/// Whether the keys under `root` are sealed to the TPM.
pub fn is_sealed(root: &Path) -> bool {
    root.join("tpm").join(SITE_FILE).exists()
}

fn io(what: &str, path: &Path, e: std::io::Error) -> TpmError {
    TpmError::Io(format!("cannot {what} {}: {e}", path.display()))
}

impl KeySet {
    /// The keys `keys` under `root`; `hint(root, authority_key)` is the
    /// command that approves the current PCR values (named in errors).
    pub fn new(
        root: impl Into<PathBuf>,
        keys: &'static [KeyEntry],
        hint: fn(&Path, &Path) -> String,
    ) -> Self {
        Self {
            root: root.into(),
            keys,
            hint,
        }
    }

    /// The program's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the sealed keys.
    pub fn tpm_dir(&self) -> PathBuf {
        self.root.join("tpm")
    }

    /// Whether the keys are sealed to the TPM.
    pub fn is_sealed(&self) -> bool {
        is_sealed(&self.root)
    }

    /// Where key `name` is kept now.
    pub fn source(&self, entry: &KeyEntry) -> ProtectorSpec {
        if self.is_sealed() {
            ProtectorSpec::Tpm(self.tpm_dir().join(format!("{}.tpm", entry.name)))
        } else {
            ProtectorSpec::File(self.root.join(entry.file))
        }
    }

    /// The protector of key `entry` where it is kept now.
    pub fn protector(&self, entry: &KeyEntry) -> Box<dyn KeyProtector> {
        self.source(entry).protector(entry.encoding, entry.name)
    }

    /// The current TPM settings.
    pub fn site(&self) -> Result<TpmSite, TpmError> {
        TpmSite::load(&self.tpm_dir())
    }

    /// Makes `dir` (a new directory) with an approval of the PCR values the
    /// TPM has now, and returns its settings for the caller to save
    /// (`site.json`, written last, marks the directory complete).
    pub fn prepare_site(&self, dir: &Path, target: &TpmTarget) -> Result<TpmSite, TpmError> {
        private_dir(dir)?;
        let a = open_or_create_authority(&target.authority_key)?;
        let site = TpmSite {
            tcti: target.tcti.clone(),
            pcrs: target.pcrs.clone(),
            authority: a.public(),
            approve_hint: (self.hint)(&self.root, &target.authority_key),
        };
        let now = current_pcrs(&target.tcti, &target.pcrs)?;
        let approval = a.approve(now, "the PCR values when the keys were sealed")?;
        Approvals::add_and_save(&dir.join(APPROVALS_FILE), approval)?;
        Ok(site)
    }

    /// Signs PCR values: `set` names PCRs and their values after an update;
    /// the other PCRs of the selection keep their current values. Returns
    /// the values approved.
    pub fn approve(
        &self,
        authority_key: &Path,
        set: &[(u8, PcrValue)],
        note: &str,
    ) -> Result<PcrValues, TpmError> {
        recover(&self.root).map_err(|e| io("finish a reseal in", &self.root, e))?;
        if !self.is_sealed() {
            return Err(TpmError::Config(format!(
                "the keys in {} are not sealed to a TPM (see `reseal`)",
                self.root.display()
            )));
        }
        let site = self.site()?;
        let a = Authority::open(authority_key)?;
        if a.public() != site.authority {
            return Err(TpmError::Authority(format!(
                "{} is PCR authority {}, but the keys in {} accept approvals of authority {} only",
                authority_key.display(),
                a.public().fingerprint(),
                self.root.display(),
                site.authority.fingerprint()
            )));
        }
        for (p, _) in set {
            if !site.pcrs.pcrs().contains(p) {
                return Err(TpmError::Config(format!(
                    "PCR {p} is not one the keys are sealed for ({}): approve values of those PCRs only, or change them with `reseal --tpm-pcrs`",
                    site.pcrs
                )));
            }
        }
        let mut values = current_pcrs(&site.tcti, &site.pcrs)?;
        for (p, v) in set {
            values = values.with(*p, *v);
        }
        let approval = a.approve(values.clone(), note)?;
        Approvals::add_and_save(&self.tpm_dir().join(APPROVALS_FILE), approval)?;
        Ok(values)
    }

    /// How the sealed key `entry` stands.
    pub fn status(&self, entry: &KeyEntry) -> Result<SealedStatus, TpmError> {
        recover(&self.root).map_err(|e| io("finish a reseal in", &self.root, e))?;
        if !self.is_sealed() {
            return Err(TpmError::Config(format!(
                "the keys in {} are kept in files, not sealed to a TPM",
                self.root.display()
            )));
        }
        let dir = self.tpm_dir();
        self.site()?
            .protector(&dir, &dir.join(format!("{}.tpm", entry.name)))
            .status()
    }

    /// Moves every key of the set to `to`. The caller holds the program's
    /// lock (nothing may use the keys meanwhile).
    pub fn reseal(&self, to: &ResealTo) -> Result<ResealReport, TpmError> {
        recover(&self.root).map_err(|e| io("finish a reseal in", &self.root, e))?;
        let was_sealed = self.is_sealed();
        if was_sealed {
            // A move from files that stopped before erasing them.
            for k in self.keys {
                let plain = self.root.join(k.file);
                if plain.exists() && self.tpm_dir().join(format!("{}.tpm", k.name)).exists() {
                    erase(&plain)?;
                }
            }
        }
        let from = if was_sealed {
            let site = self.site()?;
            format!("TPM {} (PCRs {})", site.tcti, site.pcrs)
        } else {
            "files".to_owned()
        };
        if matches!(to, ResealTo::Files) && !was_sealed {
            return Err(TpmError::Config(format!(
                "the keys in {} are already in files",
                self.root.display()
            )));
        }
        // 1. Every key, as it is now.
        let mut keys: Vec<(&KeyEntry, ProtectedKey)> = Vec::new();
        for k in self.keys {
            let p = self.protector(k);
            if p.exists()? {
                keys.push((k, p.unseal()?));
            }
        }
        if keys.is_empty() {
            return Err(TpmError::Config(format!(
                "there are no keys in {} to move",
                self.root.display()
            )));
        }
        // 2. The new copies, complete, then the switch.
        let tpm_dir = self.tpm_dir();
        let staged = self.root.join("tpm.new");
        let old = self.root.join("tpm.old");
        let to_text = match to {
            ResealTo::Tpm(target) => {
                let _ = std::fs::remove_dir_all(&staged);
                let built = (|| {
                    let site = self.prepare_site(&staged, target)?;
                    for (k, key) in &keys {
                        site.protector(&staged, &staged.join(format!("{}.tpm", k.name)))
                            .create(key)?;
                    }
                    site.save(&staged)?;
                    sync(&staged)
                })();
                if let Err(e) = built {
                    // Nothing switched: the keys stay where they were.
                    let _ = std::fs::remove_dir_all(&staged);
                    return Err(e);
                }
                if was_sealed {
                    rename(&tpm_dir, &old)?;
                }
                rename(&staged, &tpm_dir)?;
                sync(&self.root)?;
                let _ = std::fs::remove_dir_all(&old);
                if !was_sealed {
                    for (k, _) in &keys {
                        erase(&self.root.join(k.file))?;
                    }
                }
                format!("TPM {} (PCRs {})", target.tcti, target.pcrs)
            }
            ResealTo::Files => {
                for (k, key) in &keys {
                    let p = FileProtector::new(self.root.join(k.file), k.encoding);
                    if p.exists()? {
                        p.replace(key)?;
                    } else {
                        p.create(key)?;
                    }
                }
                rename(&tpm_dir, &old)?;
                sync(&self.root)?;
                let _ = std::fs::remove_dir_all(&old);
                "files".to_owned()
            }
        };
        Ok(ResealReport {
            keys: keys.iter().map(|(k, _)| k.name.to_owned()).collect(),
            from,
            to: to_text,
        })
    }
}

/// The authority key at `path`: opened, or made when there is none.
pub fn open_or_create_authority(path: &Path) -> Result<Authority, TpmError> {
    if path.exists() {
        return Authority::open(path);
    }
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        private_dir(p)?;
    }
    let a = Authority::create(path)?;
    tracing::warn!(
        authority = %a.public().fingerprint(),
        "new PCR authority key {}: keep it off this machine (whoever has it can approve PCR values for these keys)",
        path.display()
    );
    Ok(a)
}

/// A new key from the TPM's and the OS's random bytes.
pub fn new_key(tcti: &str, len: usize) -> Result<ProtectedKey, TpmError> {
    Entropy::with_tpm(tcti)?.key(len)
}

fn private_dir(dir: &Path) -> Result<(), TpmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create", dir, e))
}

fn rename(from: &Path, to: &Path) -> Result<(), TpmError> {
    std::fs::rename(from, to).map_err(|e| {
        TpmError::Io(format!(
            "cannot rename {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

fn sync(path: &Path) -> Result<(), TpmError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("sync", path, e))
}

/// Overwrites a key file that is no longer used, then removes it.
fn erase(path: &Path) -> Result<(), TpmError> {
    use std::io::Write;
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        let _ = f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(0)]);
        let _ = f.sync_all();
    }
    std::fs::remove_file(path).map_err(|e| io("remove", path, e))
}
