//! The store's queries, written once for every engine: each file holds the
//! statements of one group of tables, in SQL that SQLite and PostgreSQL
//! both read (`$1` parameters, `ON CONFLICT`, 64-bit integers, booleans as
//! 0/1). They run through [`Conn`], which each engine's folder implements
//! with its own driver ([`super::sqlite`], [`super::postgres`]); the schema
//! and its migrations for both engines are in [`schema`].

/// Parameters of mixed types, `$1` first (for the query files below).
macro_rules! params {
    ($($x:expr),* $(,)?) => {
        &[$(&$x as &dyn $crate::store::sql::ToValue),*] as &[&dyn $crate::store::sql::ToValue]
    };
}

mod approvals;
mod attest;
mod conn;
mod escrow;
mod guests;
mod halves;
mod hosts;
mod lease;
mod meta;
mod policies;
mod recovery;
pub mod schema;
mod volumes;

use std::str::FromStr;

pub use conn::{Conn, Db, FromValue, Params, Row, ToValue, Value};

use crate::model::StoreError;
use crate::store::{Result, Tx};

#[cfg(test)]
pub(crate) use volumes::{AT_PATH, FIND, NAMED};

/// A transaction of any engine: the store's traits, implemented once.
///
/// `meta` values read in a transaction are kept for its life (nothing but
/// the transaction itself can change them meanwhile: writers hold the
/// write lock, readers see one snapshot), and the audit head, which every
/// audit record moves, is written once, at commit: a transaction that
/// releases many keys reads the master key id and the head once.
pub struct SqlTx<'a> {
    db: Db<'a>,
    /// `meta`, read at the first look at it.
    meta: Option<std::collections::HashMap<String, String>>,
    /// The audit head to write at commit.
    head: Option<String>,
}

impl<'a> SqlTx<'a> {
    /// A transaction begun on `conn`.
    pub fn new(conn: Box<dyn Conn + 'a>) -> Self {
        Self {
            db: Db(conn),
            meta: None,
            head: None,
        }
    }
}

impl Tx for SqlTx<'_> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        match self.head.take() {
            Some(head) => self.db.0.execute_and_commit(
                meta::META_SET,
                &[Value::Text(meta::AUDIT_HEAD.to_owned()), Value::Text(head)],
            ),
            None => self.db.0.commit(),
        }
    }
}

/// Column `idx` of `row` parsed as a typed value; `what` names the column
/// in the error (`volumes.state`).
fn typed<T: FromStr>(row: &Row, idx: usize, what: &str) -> Result<T> {
    let text: String = row.get(idx)?;
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("{what} {text:?}")))
}

/// A stored integer that is never negative, as u64.
fn unsigned(row: &Row, idx: usize) -> Result<u64> {
    Ok(row.get::<i64>(idx)?.max(0) as u64)
}

/// A u64 as the engines' i64 (values above i64::MAX do not occur: sizes,
/// generations and durations are bounded far below it).
fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
