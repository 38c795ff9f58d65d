//! What the engine-neutral store needs of a database connection: run a
//! statement with positional parameters (`$1`, `$2`, ... in the SQL text,
//! which both SQLite and PostgreSQL read), get rows of plain values back,
//! and end the transaction. Each engine's folder implements [`Conn`] with
//! its own driver; everything above it is written once.

use crate::model::StoreError;
use crate::store::Result;

/// One value in or out of a statement. Integers are 64-bit on both engines
/// (PostgreSQL columns are `BIGINT`), booleans are 0 or 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// An open transaction on one connection of an engine.
pub trait Conn {
    /// Runs a statement that returns no rows; how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64>;
    /// Runs a query; its rows.
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// Commits. Without it, the transaction is rolled back when dropped.
    fn commit(&mut self) -> Result<()>;
    /// Runs a statement whose row count nobody needs, now or (an engine
    /// that pipelines) with the transaction's next statement or commit,
    /// which then fails if it failed.
    fn execute_later(&mut self, sql: &str, params: &[Value]) -> Result<()> {
        self.execute(sql, params).map(drop)
    }
    /// Runs a last statement that returns no rows, then commits (an engine
    /// may send both at once); nothing is committed if the statement fails.
    fn execute_and_commit(&mut self, sql: &str, params: &[Value]) -> Result<()> {
        self.execute(sql, params)?;
        self.commit()
    }
    /// Which engine this is (for what the engines spell differently).
    fn engine(&self) -> crate::store::sql::schema::Engine;
}

/// One result row.
#[derive(Debug)]
pub struct Row(pub(crate) Vec<Value>);

impl Row {
    /// Column `idx` as a `T`.
    pub fn get<T: FromValue>(&self, idx: usize) -> Result<T> {
        let v = self.0.get(idx).unwrap_or(&Value::Null);
        T::from_value(v).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "column {idx} as {}: {}",
                std::any::type_name::<T>(),
                describe(v)
            ))
        })
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Int(i) => format!("integer {i}"),
        Value::Text(t) => format!("text of {} bytes", t.len()),
        Value::Blob(b) => format!("bytes ({})", b.len()),
    }
}

/// A Rust value read from a column.
pub trait FromValue: Sized {
    /// None: the column holds something else.
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(t) => Some(t.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Option<Self> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
from_int!(i32, u32, u16, u8, u64, usize);

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A Rust value bound as a parameter.
pub trait ToValue {
    /// As a value.
    fn to_value(&self) -> Value;
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}

macro_rules! to_int {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
to_int!(i64, i32, u32, u16, u8);

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

/// Parameters of a statement: `()`, an array of one type, or
/// `params!` (in `store/sql/mod.rs`) of mixed types.
pub trait Params {
    /// As values, `$1` first.
    fn values(self) -> Vec<Value>;
}

impl Params for () {
    fn values(self) -> Vec<Value> {
        Vec::new()
    }
}

impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}

impl Params for &[&dyn ToValue] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}

/// The calls the store's queries make, over any [`Conn`].
pub struct Db<'a>(pub Box<dyn Conn + 'a>);

impl Db<'_> {
    /// Runs a statement; rows changed.
    pub fn execute(&mut self, sql: &str, p: impl Params) -> Result<usize> {
        let n = self.0.execute(sql, &p.values())?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Runs a statement whose row count is not needed; see
    /// [`Conn::execute_later`].
    pub fn execute_later(&mut self, sql: &str, p: impl Params) -> Result<()> {
        self.0.execute_later(sql, &p.values())
    }

    /// Every row, each through `f`.
    pub fn query_all<T>(
        &mut self,
        sql: &str,
        p: impl Params,
        f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        self.0.rows(sql, &p.values())?.iter().map(f).collect()
    }

    /// The first row through `f`, if there is one.
    pub fn query_opt<T>(
        &mut self,
        sql: &str,
        p: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<Option<T>> {
        self.0.rows(sql, &p.values())?.first().map(f).transpose()
    }

    /// The first row through `f`; a query that returns none is a bug of
    /// ours (aggregates always return one).
    pub fn query_one<T>(
        &mut self,
        sql: &str,
        p: impl Params,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        self.query_opt(sql, p, f)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from {}", first_words(sql))))
    }

    /// Whether the query returns a row.
    pub fn exists(&mut self, sql: &str, p: impl Params) -> Result<bool> {
        Ok(!self.0.rows(sql, &p.values())?.is_empty())
    }
}

fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(6).collect::<Vec<_>>().join(" ")
}
