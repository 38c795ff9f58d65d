//! Recovery shares and backups of a server's data directory, on real files
//! and SQLite (no network): `init --recovery-shares` and `recovery split`
//! make M-of-N shares, `recover` rebuilds the data directory from a backup
//! and any M of them and refuses every wrong set with nothing made, and
//! `backup` writes a checked private copy, never overwriting. The whole
//! stack (a guest starting on the rebuilt server) is in
//! `tests/tests/recovery.rs`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mgmt_server::backup::backup;
use mgmt_server::database::Database;
use mgmt_server::datadir::DataDir;
use mgmt_server::init::{InitOptions, init};
use mgmt_server::masterkey::MasterKey;
use mgmt_server::recovery::{
    KEY_FILES, PUBLIC, RecoverOptions, SplitOptions, recover, refresh, split, status,
};
use mgmt_server::store::sqlite::SqliteStore;
use mgmt_server::store::{Access, Store};

struct Custodian {
    file: PathBuf,
    recipient: String,
    id: age::x25519::Identity,
}

fn custodians(dir: &Path, n: usize) -> Vec<Custodian> {
    (0..n)
        .map(|i| {
            let id = age::x25519::Identity::generate();
            let file = dir.join(format!("custodian-{i}.key"));
            let text = secrecy::ExposeSecret::expose_secret(&id.to_string()).to_owned();
            std::fs::write(&file, format!("# custodian {i}\n{text}\n")).unwrap();
            Custodian {
                file,
                recipient: id.to_public().to_string(),
                id,
            }
        })
        .collect()
}

fn make(root: &Path, m: u8, c: &[Custodian]) -> (PathBuf, mgmt_server::init::InitReport) {
    let data = root.join("data");
    let report = init(&InitOptions {
        data_dir: data.clone(),
        sans: vec!["localhost".into()],
        master_key_source: None,
        server_url: "https://localhost:7443".into(),
        tpm: None,
        database: None,
        recovery: Some(SplitOptions {
            threshold: m,
            shares: Some(c.len() as u8),
            custodians: c.iter().map(|c| c.recipient.clone()).collect(),
            out: PathBuf::new(),
        }),
    })
    .unwrap();
    (data, report)
}

fn opts(
    root: &Path,
    to: &str,
    backup: &Path,
    shares: &[PathBuf],
    ids: &[&Custodian],
) -> RecoverOptions {
    RecoverOptions {
        data_dir: root.join(to),
        from_sqlite: Some(backup.to_owned()),
        database: None,
        shares: shares.to_vec(),
        identities: ids.iter().map(|c| c.file.clone()).collect(),
    }
}

#[test]
fn m_shares_rebuild_the_data_directory_and_fewer_build_nothing() {
    let root = guestkey_testkit::temp_dir("recovery");
    let _gone = guestkey_testkit::cleanup::Made::dir(&root);
    let c = custodians(&root, 3);
    let (data, report) = make(&root, 2, &c);
    let split = report.recovery.unwrap();
    assert_eq!(split.files.len(), 3);
    assert!(split.out.starts_with(&data), "{}", split.out.display());
    for (f, _) in &split.files {
        assert!(f.exists(), "{}", f.display());
    }
    let dir = DataDir::new(&data);
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    let master = MasterKey::load(&dir.default_master_key_source()).unwrap();
    {
        let mut tx = store.begin(Access::Read).unwrap();
        let rec = tx.recovery().unwrap().unwrap();
        assert_eq!(rec.master_key_id, master.id());
        assert_eq!(rec.custodians.len(), 3);
    }
    drop(store);
    // A master key rotation keeps the shares working.
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    let r =
        mgmt_server::domain::rotate::rotate(store.as_ref(), &dir.default_master_key_source(), None)
            .unwrap();
    let st = status(&dir, store.as_ref()).unwrap().unwrap();
    assert!(st.master_current && st.bundle_current);
    drop(store);
    let backup = root.join("backup.db");
    std::fs::copy(dir.db(), &backup).unwrap();
    let before = std::fs::read(&backup).unwrap();
    let shares: Vec<PathBuf> = split.files.iter().map(|(f, _)| f.clone()).collect();

    // Refusals first: each leaves nothing.
    let e = recover(&opts(&root, "new", &backup, &shares[..1], &[&c[0]]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 share(s)") && e.contains("2 needed"), "{e}");
    let e = recover(&opts(
        &root,
        "new",
        &backup,
        &[shares[0].clone(), shares[0].clone()],
        &[&c[0]],
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("twice"), "{e}");
    let e = recover(&opts(&root, "new", &backup, &shares[..2], &[&c[2]]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("none of the identities"), "{e}");
    let e = recover(&opts(&root, "new", &backup, &shares[..2], &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--identity"), "{e}");
    assert!(!root.join("new").exists());
    assert_eq!(std::fs::read(&backup).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".recover-")), "{names:?}");

    // Any two: the same directory again.
    let got = recover(&opts(
        &root,
        "new",
        &backup,
        &[shares[2].clone(), shares[0].clone()],
        &[&c[0], &c[2]],
    ))
    .unwrap();
    assert_eq!(got.master_key_id, r.new_id);
    assert_eq!(got.indexes, vec![3, 1]);
    let new = DataDir::new(root.join("new"));
    for rel in PUBLIC.iter().chain(KEY_FILES) {
        assert_eq!(
            std::fs::read(data.join(rel)).unwrap(),
            std::fs::read(new.root().join(rel)).unwrap(),
            "{rel}"
        );
    }
    for rel in [
        "ca/ca.key",
        "ca/server-ca.key",
        "ca/admin-ca.key",
        "master.key",
        "tls/server.key",
    ] {
        let mode = std::fs::metadata(new.root().join(rel))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{rel}");
    }
    assert_eq!(
        MasterKey::load(&new.default_master_key_source())
            .unwrap()
            .id(),
        r.new_id
    );
    let conn = rusqlite::Connection::open(new.db()).unwrap();
    let recovered: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'server.recovered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(recovered, 1);
    drop(conn);
    // The target now exists: a second recovery into it is refused.
    let e = recover(&opts(&root, "new", &backup, &shares[..2], &[&c[0], &c[1]]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an empty directory"), "{e}");
}

#[test]
fn shares_of_another_split_or_a_forged_record_are_refused() {
    let root = guestkey_testkit::temp_dir("recovery2");
    let _gone = guestkey_testkit::cleanup::Made::dir(&root);
    let c = custodians(&root, 2);
    let (data, report) = make(&root, 2, &c);
    let old: Vec<PathBuf> = report
        .recovery
        .unwrap()
        .files
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    let dir = DataDir::new(&data);
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    let master = MasterKey::load(&dir.default_master_key_source()).unwrap();
    // A new split replaces the old one: the old shares open nothing.
    let again = split(
        &dir,
        store.as_ref(),
        &master,
        &SplitOptions {
            threshold: 2,
            shares: None,
            custodians: c.iter().map(|c| c.recipient.clone()).collect(),
            out: root.join("second"),
        },
    )
    .unwrap();
    assert!(again.replaced.is_some());
    // Bad custodians: refused, nothing made.
    for (bad, want) in [
        (
            vec!["age1nope".to_owned(), c[0].recipient.clone()],
            "age X25519",
        ),
        (
            vec![c[0].recipient.clone(), c[0].recipient.clone()],
            "twice",
        ),
        (vec![c[0].recipient.clone()], "2 <= M <= N"),
    ] {
        let e = split(
            &dir,
            store.as_ref(),
            &master,
            &SplitOptions {
                threshold: 2,
                shares: None,
                custodians: bad,
                out: root.join("third"),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{e}");
        assert!(!root.join("third").exists());
    }
    drop(store);
    let backup = root.join("backup.db");
    std::fs::copy(dir.db(), &backup).unwrap();
    let ids: Vec<&Custodian> = c.iter().collect();
    let e = recover(&opts(&root, "new", &backup, &old, &ids))
        .unwrap_err()
        .to_string();
    assert!(e.contains("records split"), "{e}");
    // Mixed: one old share, one new.
    let new: Vec<PathBuf> = again.files.iter().map(|(f, _)| f.clone()).collect();
    let e = recover(&opts(
        &root,
        "new",
        &backup,
        &[old[0].clone(), new[1].clone()],
        &ids,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("different splits"), "{e}");
    // A decrypted share whose point was altered.
    let sealed = std::fs::read(&new[1]).unwrap();
    let ident =
        mgmt_server::shares::read_identities(&std::fs::read(&c[1].file).unwrap(), "x").unwrap();
    let idr: Vec<&dyn age::Identity> = ident
        .iter()
        .map(|i| i.as_ref() as &dyn age::Identity)
        .collect();
    let text = mgmt_server::shares::open(&sealed, &idr, "share").unwrap();
    let line = text.lines().find(|l| l.starts_with("share: ")).unwrap();
    let mut bytes = B64.decode(&line[7..]).unwrap();
    bytes[3] ^= 0x40;
    let forged = root.join("forged.txt");
    std::fs::write(
        &forged,
        text.replace(line, &format!("share: {}", B64.encode(&bytes))),
    )
    .unwrap();
    let e = recover(&opts(
        &root,
        "new",
        &backup,
        &[new[0].clone(), forged],
        &ids,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("altered or forged"), "{e}");
    // The plaintext a custodian decrypted works as well as the file.
    let plain = root.join("plain.txt");
    std::fs::write(&plain, text.as_str()).unwrap();
    // A bundle altered in the database: refused, nothing made.
    let conn = rusqlite::Connection::open(&backup).unwrap();
    let mut blob: Vec<u8> = conn
        .query_row("SELECT bundle FROM recovery", [], |r| r.get(0))
        .unwrap();
    let n = blob.len();
    blob[n - 30] ^= 1;
    conn.execute("UPDATE recovery SET bundle = ?1", [&blob])
        .unwrap();
    drop(conn);
    let e = recover(&opts(
        &root,
        "new",
        &backup,
        &[new[0].clone(), plain.clone()],
        &ids,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("was altered in the database"), "{e}");
    assert!(!root.join("new").exists());
    std::fs::copy(dir.db(), &backup).unwrap();
    recover(&opts(
        &root,
        "new",
        &backup,
        &[new[0].clone(), plain],
        &ids[..1],
    ))
    .unwrap();
}

/// What `age -d` prints for a share file: its text and the zeros it is
/// padded with.
fn raw_plaintext(file: &Path, c: &Custodian) -> Vec<u8> {
    let data = std::fs::read(file).unwrap();
    let d = age::Decryptor::new_buffered(&data[..]).unwrap();
    let mut r = d
        .decrypt(std::iter::once(&c.id as &dyn age::Identity))
        .unwrap();
    let mut out = vec![];
    std::io::Read::read_to_end(&mut r, &mut out).unwrap();
    out
}

fn sql(db: &Path, statement: &str, param: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute(statement, [param]).unwrap();
}

fn record(db: &Path) -> (String, Vec<u8>, Vec<u8>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT master_key_id, sealed_master, bundle FROM recovery",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

#[test]
fn a_record_pointed_at_another_recovery_key_gets_nothing_sealed_to_it() {
    let root = guestkey_testkit::temp_dir("recovery3");
    let _gone = guestkey_testkit::cleanup::Made::dir(&root);
    let c = custodians(&root, 2);
    let (data, _) = make(&root, 2, &c);
    let dir = DataDir::new(&data);
    let source = dir.default_master_key_source();
    let attacker = age::x25519::Identity::generate().to_public().to_string();
    let (original, _, _) = (
        rusqlite::Connection::open(dir.db())
            .unwrap()
            .query_row("SELECT recipient FROM recovery", [], |r| {
                r.get::<_, String>(0)
            })
            .unwrap(),
        0,
        0,
    );
    let before = record(&dir.db());

    // Someone who can write the database (not read the data directory)
    // names their own recovery key, and makes `status` ask for a refresh.
    sql(&dir.db(), "UPDATE recovery SET recipient = ?1", &attacker);
    sql(&dir.db(), "UPDATE recovery SET bundle_sha256 = ?1", "00");
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    let st = status(&dir, store.as_ref()).unwrap().unwrap();
    assert!(!st.bundle_current);
    let e = refresh(&dir, store.as_ref(), &source)
        .unwrap_err()
        .to_string();
    assert!(e.contains("was altered in the database"), "{e}");
    let e = mgmt_server::domain::rotate::rotate(store.as_ref(), &source, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("was altered in the database"), "{e}");
    // Nothing was sealed anew: the record and the master key are as before.
    assert_eq!(record(&dir.db()), before);
    assert_eq!(
        MasterKey::load(&source).unwrap().id(),
        before.0,
        "the master key was not rotated"
    );
    drop(store);

    // Put back, both work again.
    sql(&dir.db(), "UPDATE recovery SET recipient = ?1", &original);
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    let e = refresh(&dir, store.as_ref(), &source)
        .unwrap_err()
        .to_string();
    assert!(e.contains("was altered"), "the digest is bound too: {e}");
    drop(store);
    let sha = mgmt_server::recovery::public_sha256(&dir).unwrap();
    sql(&dir.db(), "UPDATE recovery SET bundle_sha256 = ?1", &sha);
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    assert!(refresh(&dir, store.as_ref(), &source).unwrap());
    mgmt_server::domain::rotate::rotate(store.as_ref(), &source, None).unwrap();
}

#[test]
fn shares_as_custodians_hold_them_and_paths_others_can_write() {
    let root = guestkey_testkit::temp_dir("recovery4");
    let _gone = guestkey_testkit::cleanup::Made::dir(&root);
    let c = custodians(&root, 2);

    // init checks its custodians before it builds anything: an identity
    // given as a recipient is refused without being echoed.
    let secret = c[0].id.to_string();
    let secret = secrecy::ExposeSecret::expose_secret(&secret).to_owned();
    let bad = InitOptions {
        data_dir: root.join("data"),
        sans: vec!["localhost".into()],
        master_key_source: None,
        server_url: "https://localhost:7443".into(),
        tpm: None,
        database: None,
        recovery: Some(SplitOptions {
            threshold: 2,
            shares: Some(2),
            custodians: vec![secret.clone(), c[1].recipient.clone()],
            out: PathBuf::new(),
        }),
    };
    let e = init(&bad).err().unwrap().to_string();
    assert!(
        e.contains("age identity") && !e.contains(&secret[15..]),
        "{e}"
    );
    assert!(!root.join("data").exists());
    // Share files into a directory others can write: refused, nothing made.
    let shared = root.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut bad = bad;
    bad.recovery.as_mut().unwrap().custodians[0] = c[0].recipient.clone();
    bad.recovery.as_mut().unwrap().out = shared.join("shares");
    let e = init(&bad).err().unwrap().to_string();
    assert!(e.contains("writable by others"), "{e}");
    assert!(!root.join("data").exists() && !shared.join("shares").exists());

    let (data, _) = make(&root, 2, &c);
    let dir = DataDir::new(&data);
    // A split into an empty directory that exists (a mounted stick): the
    // files go into it.
    let stick = root.join("stick");
    std::fs::create_dir(&stick).unwrap();
    std::fs::set_permissions(&stick, std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = Database::of(&dir, None).unwrap().open().unwrap();
    let master = MasterKey::load(&dir.default_master_key_source()).unwrap();
    let opts = |out: PathBuf| SplitOptions {
        threshold: 2,
        shares: None,
        custodians: c.iter().map(|c| c.recipient.clone()).collect(),
        out,
    };
    let e = split(&dir, store.as_ref(), &master, &opts(shared.join("s")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("writable by others"), "{e}");
    assert!(!shared.join("s").exists());
    let e = split(&dir, store.as_ref(), &master, &opts(shared.clone()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("writable by others"), "{e}");
    let made = split(&dir, store.as_ref(), &master, &opts(stick.clone())).unwrap();
    let files: Vec<PathBuf> = made.files.iter().map(|(f, _)| f.clone()).collect();
    assert!(files.iter().all(|f| f.parent() == Some(stick.as_path())));
    drop(store);
    let backup = root.join("backup.db");
    std::fs::copy(dir.db(), &backup).unwrap();

    // One share as `age -d` printed it (zeros and all), one re-armored
    // by its custodian (`age -a`).
    let raw = root.join("raw.txt");
    let plain = raw_plaintext(&files[0], &c[0]);
    assert!(plain.ends_with(&[0]));
    std::fs::write(&raw, &plain).unwrap();
    let armored = root.join("armored.age");
    {
        let plain = raw_plaintext(&files[1], &c[1]);
        let f = std::fs::File::create(&armored).unwrap();
        let w = age::armor::ArmoredWriter::wrap_output(f, age::armor::Format::AsciiArmor).unwrap();
        let e = age::Encryptor::with_recipients(std::iter::once(
            &c[1].id.to_public() as &dyn age::Recipient
        ))
        .unwrap();
        let mut w2 = e.wrap_output(w).unwrap();
        std::io::Write::write_all(&mut w2, &plain).unwrap();
        w2.finish().unwrap().finish().unwrap();
    }
    assert!(
        std::fs::read(&armored)
            .unwrap()
            .starts_with(b"-----BEGIN AGE")
    );

    // Recovery into a directory others can write, or from a link: refused.
    let o = |to: PathBuf, from: &Path| RecoverOptions {
        data_dir: to,
        from_sqlite: Some(from.to_owned()),
        database: None,
        shares: vec![raw.clone(), armored.clone()],
        identities: vec![c[1].file.clone()],
    };
    let e = recover(&o(shared.join("new"), &backup))
        .unwrap_err()
        .to_string();
    assert!(e.contains("writable by others"), "{e}");
    assert!(std::fs::read_dir(&shared).unwrap().next().is_none());
    let link = root.join("backup-link.db");
    std::os::unix::fs::symlink(&backup, &link).unwrap();
    let e = recover(&o(root.join("new"), &link))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a link"), "{e}");
    assert!(!root.join("new").exists());
    let got = recover(&o(root.join("new"), &backup)).unwrap();
    assert_eq!(got.indexes, vec![1, 2]);
}

// `guestkey-server backup`.

fn server(root: &Path) -> DataDir {
    let data = root.join("data");
    init(&InitOptions {
        data_dir: data.clone(),
        sans: vec!["localhost".into()],
        master_key_source: None,
        server_url: "https://localhost:7443".into(),
        database: None,
        tpm: None,
        recovery: None,
    })
    .unwrap();
    DataDir::new(&data)
}

#[test]
fn a_backup_is_a_checked_private_copy_and_nothing_is_overwritten() {
    let root = guestkey_testkit::temp_dir("backup");
    let _gone = guestkey_testkit::cleanup::Made::dir(&root);
    let dir = server(&root);
    let out = root.join("backups");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
    let file = out.join("guestkey.db");
    let r = backup(&dir, &file).unwrap();
    assert_eq!(r.path, file);
    assert!(r.split.is_none());
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.len(), r.bytes);
    let copy = SqliteStore::open_read_only(&file).unwrap();
    let mut tx = copy.begin(Access::Read).unwrap();
    assert_eq!(tx.master_key_id().unwrap().unwrap(), r.master_key_id);
    drop(tx);

    // Refused, nothing changed: an existing file, a shared directory,
    // a symbolic link to a directory, a data directory without a
    // database. No temporary file stays behind.
    let before = std::fs::read(&file).unwrap();
    let err = backup(&dir, &file).unwrap_err().to_string();
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), before);
    let shared = root.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = backup(&dir, &shared.join("b.db")).unwrap_err().to_string();
    assert!(err.contains("writable by others"), "{err}");
    std::os::unix::fs::symlink(&out, root.join("link")).unwrap();
    let err = backup(&dir, &root.join("link").join("c.db"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    let err = backup(&DataDir::new(root.join("none")), &out.join("d.db"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no database"), "{err}");
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("guestkey.db")]);
    assert!(std::fs::read_dir(&shared).unwrap().next().is_none());
}
