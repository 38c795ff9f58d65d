//! The schema: migrations applied in order, `PRAGMA user_version`
//! recording how many ran. Never edit a released migration: append one.
//!
//! Volume keys are stored only wrapped (see `crate::masterkey`). The audit
//! table is append-only: triggers refuse UPDATE and DELETE, and its rows
//! form a hash chain (see `crate::domain::audit`).

use rusqlite::Connection;

use crate::model::StoreError;

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran. Never edit a released migration: append a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE admins (
        cert_sha256 TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        created     INTEGER NOT NULL
    );
    CREATE TABLE hosts (
        name               TEXT PRIMARY KEY,
        address            TEXT NOT NULL,
        state              TEXT NOT NULL CHECK (state IN ('pending-enrollment', 'enrolled', 'revoked')),
        token_hash         BLOB,
        token_expires      INTEGER,
        created            INTEGER NOT NULL,
        enrolled           INTEGER,
        cert_sha256        TEXT UNIQUE,
        sealing_public_key BLOB
    );
    CREATE TABLE volumes (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        host         TEXT NOT NULL REFERENCES hosts(name),
        pool         TEXT NOT NULL,
        format       TEXT NOT NULL CHECK (format IN ('qcow2', 'raw')),
        capacity     INTEGER NOT NULL CHECK (capacity > 0),
        secret_uuid  TEXT NOT NULL UNIQUE,
        generation   INTEGER NOT NULL,
        state        TEXT NOT NULL,
        last_error   TEXT NOT NULL DEFAULT '',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt INTEGER NOT NULL DEFAULT 0,
        created      INTEGER NOT NULL
    );
    -- a deleted volume's name may be used again
    CREATE UNIQUE INDEX volumes_live_name ON volumes(name) WHERE state != 'deleted';
    CREATE INDEX volumes_host ON volumes(host);
    CREATE INDEX volumes_pending ON volumes(state, next_attempt);
    CREATE TABLE volume_keys (
        volume_id     TEXT NOT NULL REFERENCES volumes(id),
        generation    INTEGER NOT NULL,
        master_key_id TEXT NOT NULL,
        wrapped       BLOB NOT NULL,
        created       INTEGER NOT NULL,
        PRIMARY KEY (volume_id, generation)
    );
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        time_ms   INTEGER NOT NULL,
        actor     TEXT NOT NULL,
        action    TEXT NOT NULL,
        subject   TEXT NOT NULL,
        detail    TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    ",
    // 2: guests, and where each volume lives on its host
    "
    ALTER TABLE volumes ADD COLUMN path TEXT NOT NULL DEFAULT '';
    CREATE TABLE guests (
        uuid         TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        host         TEXT NOT NULL REFERENCES hosts(name),
        xml          TEXT NOT NULL,
        state        TEXT NOT NULL,
        pending      TEXT NOT NULL DEFAULT '' CHECK (pending IN ('', 'define', 'undefine', 'start', 'stop')),
        last_error   TEXT NOT NULL DEFAULT '',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt INTEGER NOT NULL DEFAULT 0,
        created      INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX guests_live_name ON guests(host, name) WHERE state != 'undefined';
    CREATE INDEX guests_pending ON guests(pending, next_attempt);
    CREATE TABLE guest_disks (
        guest_uuid TEXT NOT NULL REFERENCES guests(uuid),
        volume_id  TEXT NOT NULL REFERENCES volumes(id),
        target     TEXT NOT NULL,
        PRIMARY KEY (guest_uuid, volume_id)
    );
    ",
    // 3: what each host last reported holding (ids only, never keys)
    "
    CREATE TABLE host_inventory (
        host       TEXT NOT NULL REFERENCES hosts(name),
        volume_id  TEXT NOT NULL,
        generation INTEGER NOT NULL,
        guest_uuid TEXT NOT NULL,
        PRIMARY KEY (host, volume_id, generation, guest_uuid)
    );
    ALTER TABLE hosts ADD COLUMN inventory_reported INTEGER NOT NULL DEFAULT 0;
    ",
    // 4: the kind of a pending rekey
    "
    ALTER TABLE volumes ADD COLUMN rekey_kind TEXT NOT NULL DEFAULT '' CHECK (rekey_kind IN ('', 'shallow', 'deep'));
    ",
    // 5: key rotation policies, per pool name or per volume
    "
    CREATE TABLE policies (
        scope                TEXT NOT NULL CHECK (scope IN ('pool', 'volume')),
        target               TEXT NOT NULL,
        max_key_age_secs     INTEGER NOT NULL CHECK (max_key_age_secs > 0),
        mode                 TEXT NOT NULL CHECK (mode IN ('shallow', 'deep')),
        after_migration_secs INTEGER,
        PRIMARY KEY (scope, target)
    );
    ",
    "
    ALTER TABLE hosts ADD COLUMN libvirt_uri TEXT NOT NULL DEFAULT '';
    ALTER TABLE hosts ADD COLUMN migration_uri TEXT NOT NULL DEFAULT '';
    ALTER TABLE volumes ADD COLUMN rekey_due INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE volumes ADD COLUMN rekey_bandwidth INTEGER NOT NULL DEFAULT 0 CHECK (rekey_bandwidth >= 0);
    ALTER TABLE volumes ADD COLUMN rekey_placement TEXT NOT NULL DEFAULT '' CHECK (rekey_placement IN ('', 'online', 'offline'));
    DROP INDEX volumes_live_name;
    CREATE UNIQUE INDEX volumes_live_name ON volumes(name) WHERE state NOT IN ('deleted', 'decrypted');
    CREATE TABLE guest_migrations (
        guest_uuid TEXT PRIMARY KEY REFERENCES guests(uuid),
        from_host  TEXT NOT NULL REFERENCES hosts(name),
        to_host    TEXT NOT NULL REFERENCES hosts(name),
        started    INTEGER NOT NULL,
        live       INTEGER NOT NULL DEFAULT 0,
        unsafe     INTEGER NOT NULL DEFAULT 0
    );
    ",
    // 7: audit records MACed under a key kept wrapped under the master key;
    // bounded retries (a pending operation that keeps failing ends in 'failed')
    "
    ALTER TABLE audit ADD COLUMN mac TEXT NOT NULL DEFAULT '';
    CREATE TABLE audit_keys (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        master_key_id TEXT NOT NULL,
        wrapped       BLOB NOT NULL,
        created       INTEGER NOT NULL
    );
    ALTER TABLE volumes ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE volumes ADD COLUMN failed_op TEXT NOT NULL DEFAULT ''
        CHECK (failed_op IN ('', 'create', 'encrypt', 'rekey', 'decrypt', 'delete'));
    ALTER TABLE guests ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ",
    // 8: look-ups by name and by path use an index again (migration 6 made
    // the partial unique index on live names cover fewer states than the
    // queries ask for, so SQLite scanned the table)
    "
    CREATE INDEX volumes_name ON volumes(name);
    CREATE INDEX volumes_path ON volumes(path) WHERE path != '';
    ",
    // 9: what a host reports of its keys sealed to its TPM (JSON of
    // model::HostTpm; '' when it reported nothing)
    "
    ALTER TABLE hosts ADD COLUMN tpm TEXT NOT NULL DEFAULT '';
    ",
    // 10: release gates. A host's TPM identity (EK, AK; the AK is used
    // only once pinned, after its proof of residence) and its last
    // attestation; its allowlist of PCR values; what each volume's key
    // release needs.
    "
    CREATE TABLE host_attestation (
        host           TEXT PRIMARY KEY REFERENCES hosts(name),
        ek_public      BLOB NOT NULL,
        ek_certificate BLOB,
        ak_public      BLOB NOT NULL,
        challenge_hash BLOB,
        pinned         INTEGER NOT NULL DEFAULT 0,
        last_at        INTEGER NOT NULL DEFAULT 0,
        last_ok        INTEGER NOT NULL DEFAULT 0,
        last_detail    TEXT NOT NULL DEFAULT '',
        last_differing TEXT NOT NULL DEFAULT '',
        clock          INTEGER,
        reset_count    INTEGER,
        restart_count  INTEGER
    );
    CREATE TABLE attestation_allow (
        scope   TEXT NOT NULL CHECK (scope IN ('host', 'group')),
        target  TEXT NOT NULL,
        pcr     INTEGER NOT NULL CHECK (pcr BETWEEN 0 AND 23),
        sha256  TEXT NOT NULL CHECK (length(sha256) = 64),
        version INTEGER NOT NULL,
        added   INTEGER NOT NULL,
        PRIMARY KEY (scope, target, pcr, sha256)
    );
    CREATE TABLE attestation_versions (
        scope   TEXT NOT NULL CHECK (scope IN ('host', 'group')),
        target  TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (scope, target)
    );
    ALTER TABLE hosts ADD COLUMN host_group TEXT NOT NULL DEFAULT '';
    ALTER TABLE volumes ADD COLUMN release_policy TEXT NOT NULL DEFAULT 'auto'
        CHECK (release_policy IN ('auto', 'attested', 'approved', 'attested+approved'));
    CREATE TABLE release_requests (
        id         TEXT PRIMARY KEY,
        host       TEXT NOT NULL REFERENCES hosts(name),
        guest_uuid TEXT NOT NULL,
        guest_name TEXT NOT NULL,
        volumes    TEXT NOT NULL,
        state      TEXT NOT NULL
            CHECK (state IN ('pending', 'approved', 'denied', 'used', 'expired')),
        created    INTEGER NOT NULL,
        decided    INTEGER NOT NULL DEFAULT 0,
        decided_by TEXT NOT NULL DEFAULT '',
        note       TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX release_requests_open ON release_requests(host, guest_uuid)
        WHERE state IN ('pending', 'approved');
    ",
    // 11: split keys. On the management server a volume's key may be one
    // half of its passphrase; a verifier server keeps the other halves,
    // each bound to the host it first released it to, and the nonces it
    // issued for the attestations that precede those releases.
    "
    ALTER TABLE volumes ADD COLUMN split INTEGER NOT NULL DEFAULT 0 CHECK (split IN (0, 1));
    CREATE TABLE key_halves (
        volume_id     TEXT NOT NULL,
        generation    INTEGER NOT NULL,
        host          TEXT NOT NULL REFERENCES hosts(name),
        master_key_id TEXT NOT NULL,
        wrapped       BLOB NOT NULL,
        created       INTEGER NOT NULL,
        PRIMARY KEY (volume_id, generation)
    );
    CREATE INDEX key_halves_host ON key_halves(host);
    CREATE TABLE half_challenges (
        nonce  TEXT PRIMARY KEY,
        host   TEXT NOT NULL REFERENCES hosts(name),
        issued INTEGER NOT NULL
    );
    ",
];

/// Applies the migrations this database has not had yet.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_refuse_newer() {
        let dir = std::env::temp_dir().join(format!("gk-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let _ = std::fs::remove_file(&path);
        drop(crate::store::sqlite::SqliteStore::open(&path).unwrap());
        drop(crate::store::sqlite::SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = crate::store::sqlite::SqliteStore::open(&path)
            .err()
            .unwrap();
        assert!(err.to_string().contains("upgrade guestkey-server"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
