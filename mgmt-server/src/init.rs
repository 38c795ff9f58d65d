//! `guestkey-server init`: creates a data directory.
//!
//! Everything is built in a temporary directory beside the target and
//! renamed into place at the end, so a failed init leaves nothing behind.
//! An existing, non-empty data directory is never touched.
//!
//! A new data directory has one CA per role (hosts, server, admin: see
//! [`crate::roles`]).
//!
//! The composition of a new data directory: imports the leaf modules, the
//! SQLite store, the domain's audit chain and [`crate::roles`]. Used by
//! `guestkey-server`.

use std::path::{Path, PathBuf};

use crate::ca::{Ca, Role};
use crate::database::Database;
use crate::datadir::{DataDir, create_private_dir, write_private_file, write_public_file};
use crate::domain::{audit, now_unix};
use crate::masterkey::{MasterKey, MasterKeySource};
use crate::model::CoreError;
use crate::store::Access;

/// What `init` needs.
pub struct InitOptions {
    /// The data directory to create.
    pub data_dir: PathBuf,
    /// Names and addresses in the server certificate.
    pub sans: Vec<String>,
    /// Where the master key comes from; `None` makes a new one in
    /// `DATA_DIR/master.key`.
    pub master_key_source: Option<MasterKeySource>,
    /// The URL guestkeyctl should use, written to `admin/server`.
    pub server_url: String,
    /// With `master_key_source` `tpm`: the TPM, PCRs and PCR authority to
    /// seal the master key and the CA keys to.
    pub tpm: Option<crate::tpm::TpmTarget>,
    /// A PostgreSQL URL (an empty database), recorded in `DATA_DIR/database`;
    /// `None`: SQLite in the data directory.
    pub database: Option<String>,
    /// `--recovery-shares M-of-N --to R...`: split a recovery key among
    /// custodians at once; `out` `None` means `DATA_DIR/recovery-shares`.
    pub recovery: Option<crate::recovery::SplitOptions>,
}

/// What `init` made.
pub struct InitReport {
    /// The admin credential directory.
    pub admin_dir: PathBuf,
    /// Master key id (public).
    pub master_key_id: String,
    /// Where the master key is.
    pub master_key_source: MasterKeySource,
    /// The recovery shares made, if asked for.
    pub recovery: Option<crate::recovery::SplitReport>,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CoreError {
    let msg = format!("cannot {what} {}", path.display());
    move |e| CoreError::Internal(format!("{msg}: {e}"))
}

/// Creates the data directory.
pub fn init(opts: &InitOptions) -> Result<InitReport, CoreError> {
    let target = &opts.data_dir;
    if target.exists() {
        let empty = std::fs::read_dir(target)
            .map_err(io("read", target))?
            .next()
            .is_none();
        if !empty || !target.is_dir() {
            return Err(CoreError::AlreadyExists(format!(
                "{} already exists and is not empty: guestkey-server init never touches an existing data directory (use `run`, or pick a new directory)",
                target.display()
            )));
        }
    }
    if let Some(split) = &opts.recovery {
        crate::recovery::check_split(split)?;
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(parent).map_err(io("create", parent))?;
    let tmp = parent.join(format!(
        ".{}.init-{}",
        target
            .file_name()
            .map_or("guestkey".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = build(&tmp, opts).and_then(|report| {
        if target.exists() {
            std::fs::remove_dir(target).map_err(io("replace the empty directory", target))?;
        }
        std::fs::rename(&tmp, target).map_err(io("move the new data directory to", target))?;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|mut r| {
        r.admin_dir = DataDir::new(target).admin_dir();
        match &r.master_key_source {
            MasterKeySource::File(p) if p.starts_with(&tmp) => {
                r.master_key_source =
                    MasterKeySource::File(target.join(p.strip_prefix(&tmp).unwrap_or(p)));
            }
            MasterKeySource::Tpm(p) if p.starts_with(&tmp) => {
                r.master_key_source =
                    MasterKeySource::Tpm(target.join(p.strip_prefix(&tmp).unwrap_or(p)));
            }
            _ => {}
        }
        if let Some(split) = &mut r.recovery {
            let moved = |p: &Path| {
                p.strip_prefix(&tmp)
                    .map_or_else(|_| p.to_owned(), |rest| target.join(rest))
            };
            split.out = moved(&split.out);
            for (f, _) in &mut split.files {
                *f = moved(f);
            }
        }
        r
    })
}

fn build(tmp: &Path, opts: &InitOptions) -> Result<InitReport, CoreError> {
    let dir = DataDir::new(tmp);
    for sub in ["ca", "tls", "admin"] {
        create_private_dir(&tmp.join(sub)).map_err(io("create", &tmp.join(sub)))?;
    }
    // Master key: made here unless the operator supplies one.
    let (master, source) = match &opts.master_key_source {
        Some(MasterKeySource::Tpm(p)) if p.as_os_str().is_empty() => {
            let target = opts.tpm.as_ref().ok_or_else(|| {
                CoreError::FailedPrecondition(
                    "--master-key-source tpm needs --tpm-authority-key FILE: the PCR authority key that approves this server's PCR values (made there if missing; keep it off this machine)".into(),
                )
            })?;
            // The settings first: the CA keys below are sealed because
            // they are there.
            let tpm_dir = dir.tpm_dir();
            let site = crate::tpm::prepare_site(&tpm_dir, &opts.data_dir, target)?;
            // The CA and certificate keys made below mix the TPM's bytes in.
            crate::ca::use_entropy(
                guestkey_protect::tpm::Entropy::with_tpm(&target.tcti)
                    .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?,
            );
            site.save(&tpm_dir)
                .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
            let key = crate::tpm::new_master_key(&target.tcti)?;
            let mk = MasterKey::from_protected(&key, "the TPM")?;
            let source = MasterKeySource::Tpm(tpm_dir.join("master.key.tpm"));
            mk.store_new(&source)?;
            (mk, source)
        }
        Some(MasterKeySource::Tpm(p)) => {
            return Err(CoreError::FailedPrecondition(format!(
                "--master-key-source tpm:{} names a sealed key file: for a new data directory use `tpm` (its keys are sealed in DATA_DIR/tpm/)",
                p.display()
            )));
        }
        _ if opts.tpm.is_some() => {
            return Err(CoreError::FailedPrecondition(
                "--tpm-* options need --master-key-source tpm".into(),
            ));
        }
        None => {
            let mk = MasterKey::generate()?;
            let source = MasterKeySource::File(dir.master_key());
            mk.store_new(&source)?;
            (mk, source)
        }
        Some(source @ MasterKeySource::File(p)) if !p.exists() => {
            let mk = MasterKey::generate()?;
            mk.store_new(source)?;
            (mk, source.clone())
        }
        Some(s) => (MasterKey::load(s)?, s.clone()),
    };

    let label = opts
        .sans
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    // The hosts CA signs host certificates at enrollment.
    let (hosts_ca, hosts_ca_key) = Ca::generate(Role::Host, &label)?;
    write_public_file(&dir.ca_cert(), hosts_ca.cert_pem().as_bytes())
        .map_err(io("write", &dir.ca_cert()))?;
    Ca::store_key(&hosts_ca_key, &dir.ca_key_source())?;
    let roles = crate::roles::write_role_files(&dir, &label, opts.sans.clone())?;
    let admin_dir = dir.admin_dir();
    write_public_file(
        &admin_dir.join("server"),
        format!("{}\n", opts.server_url).as_bytes(),
    )
    .map_err(io("write", &admin_dir))?;

    let database = match opts.database.as_deref() {
        Some(text) => Database::parse(text, &dir)?,
        None => Database::Sqlite(dir.db()),
    };
    match &database {
        Database::Sqlite(db) => write_private_file(db, b"").map_err(io("create", db))?,
        Database::Postgres(url) => {
            let file = dir.database_file();
            write_private_file(&file, format!("{url}\n").as_bytes()).map_err(io("write", &file))?;
        }
    }
    let store = database.open()?;
    let mut tx = store.begin(Access::Write)?;
    if let Some(id) = tx.master_key_id()? {
        return Err(CoreError::AlreadyExists(format!(
            "{} already holds a guestkey installation (master key {id}): init needs an empty database; give another one, or drop and create this one again if that installation is gone",
            database.shown()
        )));
    }
    tx.set_master_key_id(master.id())?;
    tx.insert_admin(&roles.admin_sha256, "admin", now_unix())?;
    let audit_key = audit::ensure_key(&mut *tx, &master)?;
    audit::append(
        &mut *tx,
        &audit_key,
        "server",
        "server.initialised",
        "",
        &format!("master key {}", master.id()),
    )?;
    tx.commit()?;
    let recovery = match &opts.recovery {
        Some(split) => {
            let mut split = split.clone();
            if split.out.as_os_str().is_empty() {
                split.out = tmp.join("recovery-shares");
            }
            Some(crate::recovery::split(
                &dir,
                store.as_ref(),
                &master,
                &split,
            )?)
        }
        None => None,
    };
    Ok(InitReport {
        admin_dir,
        master_key_id: master.id().to_owned(),
        master_key_source: source,
        recovery,
    })
}
