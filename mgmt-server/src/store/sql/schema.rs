//! The schema of both engines, from one list: migrations applied in order,
//! each engine recording how many ran (SQLite: `PRAGMA user_version`;
//! PostgreSQL: the `schema_version` table). Never edit a released
//! migration: append one.
//!
//! A migration's `all` part is written once, in SQL both engines read,
//! with SQLite's type names; on PostgreSQL `INTEGER` becomes `BIGINT` (the
//! store reads and binds every integer as 64 bits) and `BLOB` becomes
//! `BYTEA`. What the engines cannot share (triggers, SQLite's rowid) is in
//! the `sqlite` and `postgres` parts, run after `all`.
//!
//! Volume keys are stored only wrapped (see `crate::masterkey`). The audit
//! table is append-only: triggers refuse UPDATE and DELETE (and on
//! PostgreSQL TRUNCATE), and its rows form a hash chain (see
//! `crate::domain::audit`).

use crate::model::StoreError;

/// A database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// SQLite (the embedded default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// One schema migration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// For both engines (SQLite's type names).
    pub all: &'static str,
    /// Then, on SQLite only.
    pub sqlite: &'static str,
    /// Then, on PostgreSQL only.
    pub postgres: &'static str,
}

const NONE: Migration = Migration {
    all: "",
    sqlite: "",
    postgres: "",
};

impl Migration {
    /// The statements to run on `engine`.
    pub(crate) fn sql(&self, engine: Engine) -> String {
        match engine {
            Engine::Sqlite => format!("{}\n{}", self.all, self.sqlite),
            Engine::Postgres => {
                let mut out = String::with_capacity(self.all.len() + self.postgres.len());
                out.push_str(&postgres_types(self.all));
                out.push('\n');
                out.push_str(self.postgres);
                out
            }
        }
    }
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `all` with SQLite's type names replaced by PostgreSQL's (whole words
/// only).
fn postgres_types(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "BLOB" => "BYTEA",
            w => w,
        });
        word.clear();
    };
    for c in sql.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// How many migrations a database at `version` still needs, or why it
/// cannot be opened.
pub(crate) fn pending(version: i64) -> Result<std::ops::Range<usize>, StoreError> {
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    Ok(version..MIGRATIONS.len())
}

/// Schema migrations, applied in order. Never edit a released migration:
/// append a new one.
pub(crate) const MIGRATIONS: &[Migration] = &[
    // 1: initial schema
    Migration {
        all: "
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
    ",
        sqlite: "
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    ",
        postgres: "
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
    CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
    ",
    },
    // 2: guests, and where each volume lives on its host
    Migration {
        all: "
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
        ..NONE
    },
    // 3: what each host last reported holding (ids only, never keys)
    Migration {
        all: "
    CREATE TABLE host_inventory (
        host       TEXT NOT NULL REFERENCES hosts(name),
        volume_id  TEXT NOT NULL,
        generation INTEGER NOT NULL,
        guest_uuid TEXT NOT NULL,
        PRIMARY KEY (host, volume_id, generation, guest_uuid)
    );
    ALTER TABLE hosts ADD COLUMN inventory_reported INTEGER NOT NULL DEFAULT 0;
    ",
        ..NONE
    },
    // 4: the kind of a pending rekey
    Migration {
        all: "
    ALTER TABLE volumes ADD COLUMN rekey_kind TEXT NOT NULL DEFAULT '' CHECK (rekey_kind IN ('', 'shallow', 'deep'));
    ",
        ..NONE
    },
    // 5: key rotation policies, per pool name or per volume
    Migration {
        all: "
    CREATE TABLE policies (
        scope                TEXT NOT NULL CHECK (scope IN ('pool', 'volume')),
        target               TEXT NOT NULL,
        max_key_age_secs     INTEGER NOT NULL CHECK (max_key_age_secs > 0),
        mode                 TEXT NOT NULL CHECK (mode IN ('shallow', 'deep')),
        after_migration_secs INTEGER,
        PRIMARY KEY (scope, target)
    );
    ",
        ..NONE
    },
    Migration {
        all: "
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
        ..NONE
    },
    // 7: audit records MACed under a key kept wrapped under the master key;
    // bounded retries (a pending operation that keeps failing ends in 'failed')
    Migration {
        all: "
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
        ..NONE
    },
    // 8: look-ups by name and by path use an index again (migration 6 made
    // the partial unique index on live names cover fewer states than the
    // queries ask for, so SQLite scanned the table)
    Migration {
        all: "
    CREATE INDEX volumes_name ON volumes(name);
    CREATE INDEX volumes_path ON volumes(path) WHERE path != '';
    ",
        ..NONE
    },
    // 9: what a host reports of its keys sealed to its TPM (JSON of
    // model::HostTpm; '' when it reported nothing)
    Migration {
        all: "
    ALTER TABLE hosts ADD COLUMN tpm TEXT NOT NULL DEFAULT '';
    ",
        ..NONE
    },
    // 10: release gates. A host's TPM identity (EK, AK; the AK is used
    // only once pinned, after its proof of residence) and its last
    // attestation; its allowlist of PCR values; what each volume's key
    // release needs.
    Migration {
        all: "
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
        ..NONE
    },
    // 11: split keys. On the management server a volume's key may be one
    // half of its passphrase; a verifier server keeps the other halves,
    // each bound to the host it first released it to, and the nonces it
    // issued for the attestations that precede those releases.
    Migration {
        all: "
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
        ..NONE
    },
    // 12: release requests keep the order they were made in (SQLite's
    // rowid did that; PostgreSQL has none)
    Migration {
        all: "
    ALTER TABLE release_requests ADD COLUMN n INTEGER NOT NULL DEFAULT 0;
    ",
        sqlite: "UPDATE release_requests SET n = rowid;",
        ..NONE
    },
    // 13: server replicas on one database, and the lease of the one that
    // leads (its fence number grows with every new holder; writes made as
    // leader check it in their transaction). Times are the database's
    // clock, in milliseconds.
    Migration {
        all: "
    CREATE TABLE leader_lease (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        holder     TEXT NOT NULL,
        fence      INTEGER NOT NULL,
        since_ms   INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE TABLE replicas (
        id         TEXT PRIMARY KEY,
        address    TEXT NOT NULL,
        host       TEXT NOT NULL,
        pid        INTEGER NOT NULL,
        version    TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        seen_ms    INTEGER NOT NULL
    );
    ",
        ..NONE
    },
    // 14: which replica drives a migration (the others leave it alone
    // while that replica is alive)
    Migration {
        all: "
    ALTER TABLE guest_migrations ADD COLUMN driver TEXT NOT NULL DEFAULT '';
    ",
        ..NONE
    },
    // 15: the URL hosts reach each replica at (`url` of its config; empty:
    // not given to hosts)
    Migration {
        all: "
    ALTER TABLE replicas ADD COLUMN url TEXT NOT NULL DEFAULT '';
    ",
        ..NONE
    },
    // 16: indexes for look-ups that read whole tables (found by
    // domain/tests/plans.rs): a guest by name, a guest by UUID or host and
    // name in any state (define, undefine), the guests whose pushes are
    // due (the scheduler's poll), a host by its enrollment token
    Migration {
        all: "
    CREATE INDEX guests_name ON guests(name);
    CREATE INDEX guests_host_name ON guests(host, name);
    CREATE INDEX guests_due ON guests(next_attempt) WHERE pending != '';
    CREATE INDEX hosts_token ON hosts(token_hash);
    ",
        ..NONE
    },
    // 17: storage pools marked managed (their cleartext volumes are offered
    // for encryption)
    Migration {
        all: "
    CREATE TABLE managed_pools (
        host     TEXT NOT NULL,
        pool     TEXT NOT NULL,
        since    INTEGER NOT NULL,
        by_admin TEXT NOT NULL,
        PRIMARY KEY (host, pool)
    );
    ",
        ..NONE
    },
    // 18: the web console's logins (argon2id hashes in PHC form), their
    // sessions (by the SHA-256 of their token; shared by the replicas), and
    // the audit records of one subject (a volume's history in the console)
    Migration {
        all: "
    CREATE TABLE console_users (
        name          TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created       INTEGER NOT NULL,
        by_admin      TEXT NOT NULL
    );
    CREATE TABLE console_sessions (
        token_hash BLOB PRIMARY KEY,
        login      TEXT NOT NULL,
        tag        BLOB NOT NULL,
        csrf       TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        last_ms    INTEGER NOT NULL
    );
    CREATE INDEX console_sessions_last ON console_sessions(last_ms);
    CREATE INDEX console_sessions_started ON console_sessions(started_ms);
    CREATE INDEX audit_subject ON audit(subject, seq);
    ",
        ..NONE
    },
    // 19: escrow packets (issue 13): one admin asks, another approves, the
    // volume's host makes the packet; the server keeps only its ciphertext
    // (age, to the recipients asked for). `n` keeps the order they were
    // asked in; recipients are newline-joined.
    Migration {
        all: "
    CREATE TABLE escrow_packets (
        id             TEXT PRIMARY KEY,
        n              INTEGER NOT NULL,
        volume_id      TEXT NOT NULL,
        volume_name    TEXT NOT NULL,
        host           TEXT NOT NULL,
        generation     INTEGER NOT NULL,
        recipients     TEXT NOT NULL,
        reason         TEXT NOT NULL,
        requested_by   TEXT NOT NULL,
        requested_unix INTEGER NOT NULL,
        state          TEXT NOT NULL
            CHECK (state IN ('pending', 'made', 'denied', 'expired')),
        decided_by     TEXT NOT NULL DEFAULT '',
        decided_unix   INTEGER NOT NULL DEFAULT 0,
        note           TEXT NOT NULL DEFAULT '',
        luks_uuid      TEXT NOT NULL DEFAULT '',
        packet         BLOB NOT NULL
    );
    CREATE UNIQUE INDEX escrow_packets_n ON escrow_packets(n);
    CREATE INDEX escrow_packets_volume ON escrow_packets(volume_id, state, generation);
    CREATE INDEX escrow_packets_state ON escrow_packets(state, requested_unix);
    CREATE INDEX escrow_packets_requester ON escrow_packets(requested_by, state);
    ",
        ..NONE
    },
    // 20: the server's recovery (issue 13): one row, the master key and
    // the data directory's CA and TLS keys sealed to the recovery key whose
    // private half is split among custodians.
    Migration {
        all: "
    CREATE TABLE recovery (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        split_id      TEXT NOT NULL,
        threshold     INTEGER NOT NULL,
        shares        INTEGER NOT NULL,
        created       INTEGER NOT NULL,
        recipient     TEXT NOT NULL,
        custodians    TEXT NOT NULL,
        master_key_id TEXT NOT NULL,
        sealed_master BLOB NOT NULL,
        bundle        BLOB NOT NULL,
        bundle_sha256 TEXT NOT NULL
    );
    ",
        ..NONE
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_gets_its_type_names_and_only_whole_words_change() {
        let sql = postgres_types("a INTEGER NOT NULL, b BLOB, c_INTEGER TEXT, INTEGERS");
        assert_eq!(sql, "a BIGINT NOT NULL, b BYTEA, c_INTEGER TEXT, INTEGERS");
    }

    #[test]
    fn a_newer_database_is_refused() {
        assert_eq!(pending(0).unwrap(), 0..MIGRATIONS.len());
        let e = pending(MIGRATIONS.len() as i64 + 1).unwrap_err();
        assert!(e.to_string().contains("upgrade guestkey-server"), "{e}");
    }
}
