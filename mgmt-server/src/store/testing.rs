//! The store the unit tests run on: SQLite in memory, or with
//! `GUESTKEY_TEST_DATABASE=postgres` a fresh database of this test
//! process's PostgreSQL cluster (`guestkey_testkit::Postgres`), so the
//! domain's state-machine tests run on both engines (`scripts/test` runs
//! them twice).

use guestkey_testkit::{Postgres, TestDatabase};

use crate::model::StoreError;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Access, Store, Tx};

/// Either engine.
pub(crate) enum TestStore {
    /// In memory.
    Sqlite(SqliteStore),
    /// A database of its own, dropped with it (after the store's
    /// connections: fields drop in order).
    Postgres {
        store: Box<PostgresStore>,
        _db: TestDatabase<'static>,
    },
}

impl TestStore {
    /// The engine `GUESTKEY_TEST_DATABASE` names (default SQLite).
    pub(crate) fn new() -> Self {
        match std::env::var("GUESTKEY_TEST_DATABASE").as_deref() {
            Ok("postgres") => {
                let db = Postgres::shared().database();
                let store = PostgresStore::open(&db.url, 4).unwrap();
                TestStore::Postgres {
                    store: Box::new(store),
                    _db: db,
                }
            }
            Ok("sqlite") | Err(_) => TestStore::Sqlite(SqliteStore::in_memory().unwrap()),
            Ok(other) => panic!("GUESTKEY_TEST_DATABASE={other}: say sqlite or postgres"),
        }
    }

    /// Runs raw SQL as an attacker with the database would (tests of tamper
    /// detection); the engine's error text. On PostgreSQL, dropping the
    /// audit triggers (SQLite's names) disables them instead.
    pub(crate) fn tamper(&self, sql: &str) -> Result<(), String> {
        match self {
            TestStore::Sqlite(s) => s.tamper(sql),
            TestStore::Postgres { store: s, .. } => {
                let sql = sql
                    .replace(
                        "DROP TRIGGER audit_no_delete;",
                        "ALTER TABLE audit DISABLE TRIGGER USER;",
                    )
                    .replace(
                        "DROP TRIGGER audit_no_update;",
                        "ALTER TABLE audit DISABLE TRIGGER USER;",
                    );
                s.tamper(&sql)
            }
        }
    }
}

impl Store for TestStore {
    fn begin(&self, access: Access) -> Result<Box<dyn Tx + '_>, StoreError> {
        match self {
            TestStore::Sqlite(s) => s.begin(access),
            TestStore::Postgres { store: s, .. } => s.begin(access),
        }
    }

    fn stats(&self) -> crate::store::StoreStats {
        match self {
            TestStore::Sqlite(s) => s.stats(),
            TestStore::Postgres { store: s, .. } => s.stats(),
        }
    }
}
