//! Recovery of the server itself from a database backup and M of N shares.
//!
//! `recovery split` (or `init --recovery-shares M-of-N --to R...`) makes a
//! recovery key, cuts its private half into one share per custodian
//! ([`crate::shares`], each share age-encrypted to its custodian) and keeps
//! in the database, in the `recovery` table:
//! - the master key, sealed to the recovery key's public half;
//! - the bundle: what a data directory holds besides the database (the CA
//!   certificates and keys, the server certificate and key, the admin
//!   credential), wrapped under the master key.
//!
//! The private half is then dropped: nothing on the server opens the record.
//! `recover` takes a database backup (or a PostgreSQL database that
//! survived) and any M shares, gives the recovery key back, opens the master
//! key and the bundle, checks that every stored key unwraps, and builds a
//! new data directory that `run` serves as the lost one did: the hosts
//! trust its certificate, the admin credential works.
//!
//! The composition of recovery: imports the leaf modules, the store, the
//! domain's record and audit chain, and [`crate::database`].

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::ca::Ca;
use crate::database::Database;
use crate::datadir::{
    DataDir, check_owned_dir, create_private_dir, parent_of, sync_dir, write_private_file,
};
use crate::domain::recovery::{open_bundle, open_master, seal_master, wrap_bundle};
use crate::domain::{audit, now_unix};
use crate::masterkey::{MasterKey, MasterKeySource};
use crate::model::CoreError;
use crate::shares::{RecoveryKey, Share, SplitInfo};
use crate::store::{Access, RecoveryRecord, Store};

/// The first line of a bundle's text.
const BUNDLE_MAGIC: &str = "guestkey-recovery-bundle v1";

/// The data directory's public files in the bundle.
pub const PUBLIC: &[&str] = &[
    "ca/ca.pem",
    "ca/server-ca.pem",
    "ca/admin-ca.pem",
    "tls/server.pem",
    "admin/ca.pem",
    "admin/server.sha256",
    "admin/server",
    "admin/admin.pem",
];

/// Keys kept as plain files (0600) in every layout.
pub const KEY_FILES: &[&str] = &["tls/server.key", "admin/admin.key"];

/// The largest share file (or identity file) read: a sealed share is two
/// age chunks, its text padded with zeros (see [`crate::shares::seal`]).
const MAX_SHARE_FILE: u64 = 256 << 10;

fn failed(msg: impl Into<String>) -> CoreError {
    CoreError::FailedPrecondition(msg.into())
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CoreError {
    let msg = format!("cannot {what} {}", path.display());
    move |e| CoreError::Internal(format!("{msg}: {e}"))
}

/// SHA-256 (hex) of the bundle's public files as `dir` has them now.
pub fn public_sha256(dir: &DataDir) -> Result<String, CoreError> {
    let mut h = Sha256::new();
    for rel in PUBLIC {
        let path = dir.root().join(rel);
        let data = std::fs::read(&path).map_err(io("read", &path))?;
        h.update(rel.as_bytes());
        h.update((data.len() as u64).to_be_bytes());
        h.update(&data);
    }
    Ok(hex::encode(h.finalize()))
}

/// The bundle's text: every file as `file PATH MODE BASE64`.
fn bundle_of(dir: &DataDir) -> Result<Zeroizing<String>, CoreError> {
    if dir.is_before_roles() {
        return Err(failed(format!(
            "{} was made before certificates had roles: run `guestkey-server migrate-roles` first",
            dir.root().display()
        )));
    }
    let mut out = Zeroizing::new(String::with_capacity(crate::shares::MAX_TEXT));
    out.push_str(BUNDLE_MAGIC);
    out.push('\n');
    let mut add = |rel: &str, mode: u32, data: &[u8]| {
        out.push_str(&format!("file {rel} {mode:o} "));
        B64.encode_string(data, &mut out);
        out.push('\n');
    };
    for rel in PUBLIC {
        let path = dir.root().join(rel);
        let data = std::fs::read(&path).map_err(io("read", &path))?;
        add(rel, 0o644, &data);
    }
    for rel in KEY_FILES {
        let path = dir.root().join(rel);
        let data = Zeroizing::new(std::fs::read(&path).map_err(io("read", &path))?);
        add(rel, 0o600, &data);
    }
    // The CA keys, from wherever they are kept (files or the TPM).
    for (rel, source) in [
        ("ca/ca.key", dir.ca_key_source()),
        ("ca/server-ca.key", dir.server_ca_key_source()),
        ("ca/admin-ca.key", dir.admin_ca_key_source()),
    ] {
        let key = Ca::key_protector(&source)
            .unseal()
            .map_err(|e| CoreError::Ca(e.into()))?;
        add(rel, 0o600, key.expose_secret());
    }
    if out.len() > crate::shares::MAX_TEXT {
        return Err(CoreError::Internal(
            "the data directory's certificates and keys are too large for a recovery bundle".into(),
        ));
    }
    Ok(out)
}

/// A bundle's files: (path, mode, contents).
type Files = Vec<(String, u32, Zeroizing<Vec<u8>>)>;

fn parse_bundle(text: &str) -> Result<Files, CoreError> {
    let altered =
        || CoreError::FailedPrecondition("the recovery bundle is not one guestkey made".into());
    let mut lines = text.lines();
    if lines.next() != Some(BUNDLE_MAGIC) {
        return Err(altered());
    }
    let mut files: Files = vec![];
    for line in lines {
        let mut parts = line.split(' ');
        let (Some("file"), Some(rel), Some(mode), Some(data), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(altered());
        };
        // Only the files guestkey puts there, never a path of another shape.
        let known = PUBLIC.contains(&rel)
            || KEY_FILES.contains(&rel)
            || ["ca/ca.key", "ca/server-ca.key", "ca/admin-ca.key"].contains(&rel);
        let mode = u32::from_str_radix(mode, 8).map_err(|_| altered())?;
        if !known || !(mode == 0o644 || mode == 0o600) || files.iter().any(|(r, ..)| r == rel) {
            return Err(altered());
        }
        let data = Zeroizing::new(B64.decode(data).map_err(|_| altered())?);
        files.push((rel.to_owned(), mode, data));
    }
    if files.len() != PUBLIC.len() + KEY_FILES.len() + 3 {
        return Err(altered());
    }
    Ok(files)
}

/// What a split made.
#[derive(Debug, Clone)]
pub struct SplitReport {
    /// The split's id.
    pub split_id: String,
    /// M.
    pub threshold: u8,
    /// The share files, each with its custodian.
    pub files: Vec<(PathBuf, String)>,
    /// Where they are.
    pub out: PathBuf,
    /// Whether an earlier split was replaced (its shares open nothing now).
    pub replaced: Option<String>,
}

/// What `split` needs.
#[derive(Debug, Clone)]
pub struct SplitOptions {
    /// Shares needed (M).
    pub threshold: u8,
    /// Shares made (N), when given (must be the number of custodians).
    pub shares: Option<u8>,
    /// The custodians' age recipients, one share each.
    pub custodians: Vec<String>,
    /// The directory for the share files (absent or empty; for `init`, an
    /// empty path means `DATA_DIR/recovery-shares`).
    pub out: PathBuf,
}

fn check_custodians(opts: &SplitOptions) -> Result<Vec<age::x25519::Recipient>, CoreError> {
    let n = opts.custodians.len();
    if let Some(want) = opts.shares
        && usize::from(want) != n
    {
        return Err(failed(format!(
            "{}-of-{want} needs {want} custodians, one share each: {n} given with --to",
            opts.threshold
        )));
    }
    let mut parsed: Vec<age::x25519::Recipient> = vec![];
    for c in &opts.custodians {
        let r = crate::shares::parse_recipient(c.trim()).map_err(|e| failed(e.0))?;
        if parsed.iter().any(|p| p.to_string() == r.to_string()) {
            return Err(failed(format!(
                "custodian {r} is given twice: each share goes to another custodian"
            )));
        }
        parsed.push(r);
    }
    Ok(parsed)
}

/// Checks a split's input without making anything: the custodians, M-of-N
/// and the directory for the share files (`init` checks it before it
/// builds, so that a typo in `--to` leaves no installation behind).
pub fn check_split(opts: &SplitOptions) -> Result<(), CoreError> {
    check_custodians(opts)?;
    if opts.out.as_os_str().is_empty() {
        return Ok(());
    }
    check_out(&opts.out, "--shares-out").map(|_| ())
}

/// Whether `out` can take share files: absent under a directory only this
/// user can write, or an empty real directory writable by no one else.
/// True when it exists. `flag` names the option in errors.
fn check_out(out: &Path, flag: &str) -> Result<bool, CoreError> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => check_owned_dir(parent_of(out))
            .map(|_| false)
            .map_err(|e| failed(format!("{e} ({flag} {})", out.display()))),
        Err(e) => Err(io("look at", out)(e)),
        Ok(_) => {
            check_owned_dir(out).map_err(|e| failed(format!("{flag}: {e}")))?;
            if std::fs::read_dir(out)
                .map_err(io("read", out))?
                .next()
                .is_some()
            {
                return Err(CoreError::AlreadyExists(format!(
                    "{} exists and is not empty: give a new or empty directory for the share files",
                    out.display()
                )));
            }
            Ok(true)
        }
    }
}

/// Makes `out` ready for share files: created (0700) if absent, else an
/// empty real directory; either way writable by no one else. True when it
/// was created here.
fn prepare_out(out: &Path) -> Result<bool, CoreError> {
    if check_out(out, "--out")? {
        return Ok(false);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(out)
        .map_err(io("create", out))?;
    Ok(true)
}

/// Makes a new split: the recovery key, its shares in `opts.out` (one age
/// file per custodian), the record in the database (replacing an earlier
/// one). `master` is the data directory's master key.
pub fn split(
    dir: &DataDir,
    store: &dyn Store,
    master: &MasterKey,
    opts: &SplitOptions,
) -> Result<SplitReport, CoreError> {
    let recipients = check_custodians(opts)?;
    let out = &opts.out;
    let bundle = bundle_of(dir)?;
    let key = RecoveryKey::generate();
    let info = SplitInfo {
        split_id: uuid::Uuid::new_v4().to_string(),
        recipient: key.recipient(),
        threshold: opts.threshold,
        custodians: recipients.iter().map(ToString::to_string).collect(),
        created: now_unix(),
    };
    let texts = key.split(&info).map_err(|e| failed(e.0))?;
    drop(key);
    let mut rec = RecoveryRecord {
        split_id: info.split_id.clone(),
        threshold: info.threshold,
        shares: u8::try_from(texts.len()).unwrap_or(u8::MAX),
        created: info.created,
        recipient: info.recipient.clone(),
        custodians: info.custodians.clone(),
        master_key_id: master.id().to_owned(),
        sealed_master: seal_master(master, &info.recipient)?,
        bundle: vec![],
        bundle_sha256: public_sha256(dir)?,
    };
    wrap_bundle(master, &mut rec, bundle.as_bytes());

    // The share files first, in their place, synced; then the record. A
    // failure before the commit removes them and leaves the old split in
    // force; after it they are never removed (they are the only shares of
    // the split in force). A crash in between leaves files of a split the
    // database does not record: `recover` says so, and the split is made
    // again into an empty directory.
    let made_out = prepare_out(out)?;
    let n = texts.len();
    let mut written: Vec<PathBuf> = vec![];
    let result = (|| {
        let mut files = vec![];
        for (i, (text, r)) in texts.iter().zip(&recipients).enumerate() {
            let sealed = crate::shares::seal(text, std::slice::from_ref(r))
                .map_err(|e| CoreError::Internal(e.0))?;
            let name = format!("share-{}-of-{n}.age", i + 1);
            let path = out.join(&name);
            write_private_file(&path, &sealed).map_err(io("write", &path))?;
            written.push(path.clone());
            files.push((path, r.to_string()));
        }
        sync_dir(out).map_err(io("sync", out))?;
        if made_out {
            sync_dir(parent_of(out)).map_err(io("sync", parent_of(out)))?;
        }
        let mut tx = store.begin(Access::Write)?;
        if tx.master_key_id()?.as_deref() != Some(master.id()) {
            return Err(failed(
                "the master key given is not the one the database records",
            ));
        }
        let replaced = tx.recovery()?.map(|r| r.split_id);
        tx.put_recovery(&rec)?;
        let audit_key = audit::ensure_key(&mut *tx, master)?;
        audit::append(
            &mut *tx,
            &audit_key,
            "server",
            "recovery.split",
            &rec.split_id,
            &format!(
                "{}-of-{n} to {}{}",
                rec.threshold,
                rec.custodians.join(", "),
                replaced
                    .as_deref()
                    .map(|r| format!("; replaces split {r}"))
                    .unwrap_or_default()
            ),
        )?;
        tx.commit()?;
        Ok((files, replaced))
    })();
    if result.is_err() {
        for f in &written {
            let _ = std::fs::remove_file(f);
        }
        if made_out {
            let _ = std::fs::remove_dir(out);
        }
    }
    let (files, replaced) = result?;
    Ok(SplitReport {
        split_id: rec.split_id,
        threshold: rec.threshold,
        files,
        out: out.clone(),
        replaced,
    })
}

/// Re-wraps the bundle from the data directory as it is now (after
/// `migrate-roles` or a new server certificate); the shares stay valid.
/// False when no split was made.
pub fn refresh(
    dir: &DataDir,
    store: &dyn Store,
    source: &MasterKeySource,
) -> Result<bool, CoreError> {
    let mut tx = store.begin(Access::Write)?;
    let Some(rec) = tx.recovery()? else {
        return Ok(false);
    };
    let expected = tx.master_key_id()?.unwrap_or_default();
    let master = crate::domain::keyring::load_matching(source, &expected)?;
    // The record must be the one written with this master key before
    // anything is sealed to the recovery key it names.
    drop(open_bundle(&master, &rec)?);
    let bundle = bundle_of(dir)?;
    let mut rec = RecoveryRecord {
        master_key_id: master.id().to_owned(),
        sealed_master: seal_master(&master, &rec.recipient)?,
        bundle: vec![],
        bundle_sha256: public_sha256(dir)?,
        ..rec
    };
    wrap_bundle(&master, &mut rec, bundle.as_bytes());
    tx.put_recovery(&rec)?;
    let audit_key = audit::ensure_key(&mut *tx, &master)?;
    audit::append(
        &mut *tx,
        &audit_key,
        "server",
        "recovery.refreshed",
        &rec.split_id,
        "the bundle of certificates and keys taken from the data directory again",
    )?;
    tx.commit()?;
    Ok(true)
}

/// What `recovery status` shows.
#[derive(Debug, Clone)]
pub struct RecoveryStatus {
    /// The record (its ciphertext too).
    pub record: RecoveryRecord,
    /// Whether the sealed master key is the one in use.
    pub master_current: bool,
    /// Whether the bundle's public files are the data directory's now.
    pub bundle_current: bool,
}

/// The recovery record of the data directory's database, if any.
pub fn status(dir: &DataDir, store: &dyn Store) -> Result<Option<RecoveryStatus>, CoreError> {
    let mut tx = store.begin(Access::Read)?;
    let Some(record) = tx.recovery()? else {
        return Ok(None);
    };
    let master_current = tx.master_key_id()?.as_deref() == Some(record.master_key_id.as_str());
    let bundle_current = public_sha256(dir).ok().as_deref() == Some(&record.bundle_sha256);
    Ok(Some(RecoveryStatus {
        record,
        master_current,
        bundle_current,
    }))
}

/// What `recover` needs.
#[derive(Debug, Clone)]
pub struct RecoverOptions {
    /// The new data directory (absent or empty).
    pub data_dir: PathBuf,
    /// A copy of the SQLite database (`guestkey.db`), copied in.
    pub from_sqlite: Option<PathBuf>,
    /// Or: the PostgreSQL database that survived, recorded in the new
    /// directory.
    pub database: Option<String>,
    /// Share files: age files of custodians (with `identities`) or the
    /// texts custodians decrypted themselves.
    pub shares: Vec<PathBuf>,
    /// age identity files that open the share files.
    pub identities: Vec<PathBuf>,
}

/// What `recover` did.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The master key's id.
    pub master_key_id: String,
    /// The split whose shares were used, and their indexes.
    pub split_id: String,
    /// The shares' indexes.
    pub indexes: Vec<u8>,
    /// Volume keys checked (each unwraps).
    pub keys: usize,
    /// The database now in use.
    pub database: String,
}

fn read_small(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, CoreError> {
    let f = std::fs::File::open(path).map_err(io(&format!("open {what}"), path))?;
    let mut out = Zeroizing::new(Vec::with_capacity(MAX_SHARE_FILE as usize + 1));
    f.take(MAX_SHARE_FILE + 1)
        .read_to_end(&mut out)
        .map_err(io(&format!("read {what}"), path))?;
    if out.len() as u64 > MAX_SHARE_FILE {
        return Err(failed(format!(
            "{what} {} is over {MAX_SHARE_FILE} bytes: not one",
            path.display()
        )));
    }
    Ok(out)
}

fn read_shares(opts: &RecoverOptions) -> Result<Vec<Share>, CoreError> {
    let mut identities: Vec<Box<dyn age::Identity + Send + Sync>> = vec![];
    for p in &opts.identities {
        let data = read_small(p, "identity file")?;
        identities.extend(
            crate::shares::read_identities(&data, &p.display().to_string())
                .map_err(|e| failed(e.0))?,
        );
    }
    let ids: Vec<&dyn age::Identity> = identities
        .iter()
        .map(|i| i.as_ref() as &dyn age::Identity)
        .collect();
    let mut shares = vec![];
    for p in &opts.shares {
        let data = read_small(p, "share file")?;
        let origin = p.display().to_string();
        let text = if crate::shares::is_age(&data) {
            if ids.is_empty() {
                return Err(failed(format!(
                    "{origin} is encrypted to its custodian: give the custodian's identity file with --identity, or the text the custodian decrypted (`age -d -i KEY {origin}`)"
                )));
            }
            crate::shares::open(&data, &ids, &origin).map_err(|e| failed(e.0))?
        } else {
            let t = std::str::from_utf8(&data)
                .map_err(|_| failed(format!("{origin} is not a recovery share")))?;
            let mut s = Zeroizing::new(String::with_capacity(t.len()));
            s.push_str(t);
            s
        };
        shares.push(Share::parse(&text, &origin).map_err(|e| failed(e.0))?);
    }
    Ok(shares)
}

/// Rebuilds a data directory from a database and M shares. Builds it in a
/// temporary directory beside the target and renames it into place: a
/// refusal leaves nothing, and the backup is never written.
pub fn recover(opts: &RecoverOptions) -> Result<Recovered, CoreError> {
    let target = &opts.data_dir;
    let present = std::fs::symlink_metadata(target).ok();
    if present.as_ref().is_some_and(|m| !m.is_dir())
        || (present.is_some()
            && std::fs::read_dir(target)
                .map_err(io("read", target))?
                .next()
                .is_some())
    {
        return Err(CoreError::AlreadyExists(format!(
            "{} exists and is not an empty directory (or is a link): recover into a new directory",
            target.display()
        )));
    }
    match (&opts.from_sqlite, &opts.database) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(failed(
                "give the database: --from-sqlite BACKUP (a copy of guestkey.db) or --database postgres://...",
            ));
        }
        _ => {}
    }
    // The shares first: a wrong set refuses before anything is made.
    let shares = read_shares(opts)?;
    let key = crate::shares::combine(&shares).map_err(|e| failed(e.0))?;
    let split_id = shares[0].info.split_id.clone();
    let indexes: Vec<u8> = shares.iter().map(|s| s.index).collect();

    // Built beside the target, in a directory only this user can write (no
    // one may swap a file in it); a staging directory a crashed run left is
    // removed first (it may hold keys).
    let parent = parent_of(target);
    create_private_dir(parent).map_err(io("create", parent))?;
    check_owned_dir(parent)
        .map_err(|e| failed(format!("{e} (--data-dir {})", target.display())))?;
    let tmp = parent.join(format!(
        ".{}.recovering",
        target
            .file_name()
            .map_or("guestkey".into(), |n| n.to_string_lossy())
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = build(&tmp, opts, &key, &split_id, &indexes).and_then(|r| {
        if target.exists() {
            std::fs::remove_dir(target).map_err(io("replace the empty directory", target))?;
        }
        std::fs::rename(&tmp, target).map_err(io("move the new data directory to", target))?;
        sync_dir(parent).map_err(io("sync", parent))?;
        Ok(Recovered {
            database: Database::of(&DataDir::new(target), None)?.shown(),
            ..r
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn build(
    tmp: &Path,
    opts: &RecoverOptions,
    key: &RecoveryKey,
    split_id: &str,
    indexes: &[u8],
) -> Result<Recovered, CoreError> {
    let dir = DataDir::new(tmp);
    // Not recursive: fails if anything is there.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(tmp)
        .map_err(io("create", tmp))?;
    let database = match (&opts.from_sqlite, &opts.database) {
        (Some(backup), _) => {
            // Opened without following a link, checked by what was opened.
            let mut src = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(backup)
                .map_err(|e| {
                    failed(format!(
                        "cannot open {} ({e}): give a copy of guestkey.db (a regular file, not a link)",
                        backup.display()
                    ))
                })?;
            if !src.metadata().map_err(io("read", backup))?.is_file() {
                return Err(failed(format!(
                    "{} is not a regular file: give a copy of guestkey.db",
                    backup.display()
                )));
            }
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.db())
                .map_err(io("create", &dir.db()))?;
            std::io::copy(&mut src, &mut dst).map_err(io("copy", backup))?;
            dst.sync_all().map_err(io("sync", &dir.db()))?;
            Database::Sqlite(dir.db())
        }
        (None, Some(url)) => Database::parse(url, &dir)?,
        (None, None) => unreachable!("checked by recover"),
    };
    let store = database.open()?;
    let mut tx = store.begin(Access::Write)?;
    let Some(rec) = tx.recovery()? else {
        return Err(failed(format!(
            "{} holds no recovery record: recovery shares were never split for it (or it predates the split)",
            database.shown()
        )));
    };
    if rec.split_id != split_id || rec.recipient != key.recipient() {
        return Err(failed(format!(
            "the shares are of split {split_id}, but {} records split {} (made {}): give shares of that split, or the backup that goes with these shares",
            database.shown(),
            rec.split_id,
            crate::model::names::format_utc(rec.created).unwrap_or_default()
        )));
    }
    let master = open_master(&rec, key)?;
    let recorded = tx.master_key_id()?.unwrap_or_default();
    if recorded != master.id() {
        return Err(CoreError::FailedPrecondition(format!(
            "the recovery record holds master key {}, but the database records {recorded}: the database was altered",
            master.id()
        )));
    }
    // Every stored key must unwrap, or this is not the database the
    // shares go with.
    let rows = tx.all_volume_keys()?;
    for (volume, generation, w) in &rows {
        master
            .unwrap_key(volume, *generation, &w.master_key_id, &w.wrapped)
            .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    }
    // And the verifiers' halves of split keys.
    for (volume, generation, w) in &tx.all_key_halves()? {
        let name = crate::domain::halves::wrap_name(volume);
        master
            .unwrap_key(&name, *generation, &w.master_key_id, &w.wrapped)
            .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    }
    let bundle = open_bundle(&master, &rec)?;
    let text = std::str::from_utf8(&bundle)
        .map_err(|_| CoreError::FailedPrecondition("the recovery bundle is not text".into()))?;
    for (rel, mode, data) in parse_bundle(text)? {
        let path = tmp.join(&rel);
        if let Some(p) = path.parent() {
            create_private_dir(p).map_err(io("create", p))?;
        }
        if mode == 0o600 {
            write_private_file(&path, &data).map_err(io("write", &path))?;
        } else {
            crate::datadir::write_public_file(&path, &data).map_err(io("write", &path))?;
        }
    }
    master.store_new(&MasterKeySource::File(dir.master_key()))?;
    if let Database::Postgres(url) = &database {
        let file = dir.database_file();
        write_private_file(&file, format!("{url}\n").as_bytes()).map_err(io("write", &file))?;
    }
    let audit_key = audit::ensure_key(&mut *tx, &master)?;
    audit::append(
        &mut *tx,
        &audit_key,
        "server",
        "server.recovered",
        split_id,
        &format!(
            "master key {} recovered with shares {} of split {split_id} ({}-of-{})",
            master.id(),
            indexes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            rec.threshold,
            rec.shares
        ),
    )?;
    tx.commit()?;
    Ok(Recovered {
        master_key_id: master.id().to_owned(),
        split_id: split_id.to_owned(),
        indexes: indexes.to_vec(),
        keys: rows.len(),
        database: String::new(),
    })
}
