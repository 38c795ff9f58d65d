//! The PostgreSQL store: the engine-neutral queries of
//! [`crate::store::sql`] over a small pool of `tokio-postgres` clients, so
//! that several server replicas can share one database.
//!
//! The store's traits are synchronous and domain code calls them from any
//! thread, runtime workers included, so the clients live on a runtime of
//! the store's own (one thread, `guestkey-db`): a call hands its statement
//! to that runtime and waits for the answer, as a call into SQLite waits
//! for its mutex. Every call has a deadline ([`CALL_DEADLINE`]): a
//! database that stops answering fails the request with a message rather
//! than hanging it.
//!
//! Write transactions take a transaction-scoped advisory lock at begin
//! (`pg_advisory_xact_lock`): writers of every replica run one after the
//! other, as on SQLite with `BEGIN IMMEDIATE`, so domain code never sees a
//! serialisation failure and needs no retry loop. The lock ends with its
//! transaction, so a connection that is recycled or lost cannot keep it.
//! Read transactions are `REPEATABLE READ, READ ONLY`: one snapshot, no
//! lock. The schema migrations run at open in one transaction under the
//! same lock, so replicas that start together migrate once.
//!
//! The only files of the server that import `tokio-postgres` are in this
//! folder.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Config, NoTls, Statement};

use crate::model::StoreError;
use crate::store::sql::schema::{Engine, MIGRATIONS, pending};
use crate::store::sql::{Conn, Row, SqlTx, Value};
use crate::store::{Access, Counters, Store, StoreStats, Tx};

/// The advisory lock every write transaction holds ("guestkey").
const WRITE_LOCK: i64 = 0x6775_6573_746b_6579;

/// How long `begin` waits for a free connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// A session idle inside a transaction this long is ended by the database
/// (its locks freed).
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// How long a writer waits for the write lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long one call (connect, statement, commit) may take.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// A PostgreSQL database given by its URL.
pub struct PostgresStore {
    config: Config,
    shown: String,
    max: usize,
    pool: Mutex<Pool>,
    freed: Condvar,
    runtime: Option<tokio::runtime::Runtime>,
    /// TLS to the database (`sslrootcert=` in the URL), else plain TCP.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Round trips and the time waited for them.
    counters: Counters,
}

struct Pool {
    idle: Vec<Pooled>,
    open: usize,
}

/// A client and the statements prepared on it.
struct Pooled {
    client: Arc<Client>,
    statements: HashMap<String, Statement>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`),
    /// checks the schema and applies pending migrations. At most
    /// `max_connections` are open at once.
    pub fn open(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        let (rest, files) = take_tls_files(url);
        let config = Config::from_str(&rest).map_err(|e| {
            StoreError::Backend(
                format!(
                    "the database URL {} is not one PostgreSQL reads ({e}): write it as postgres://USER@HOST:PORT/DATABASE",
                    shown_url(url)
                )
                .into(),
            )
        })?;
        if files.root.is_none() && (files.cert.is_some() || files.key.is_some()) {
            return Err(StoreError::Backend(
                format!(
                    "the database URL {} names a client certificate (sslcert, sslkey) but no CA to check the database server's certificate against: add sslrootcert=/PATH/ca.pem",
                    shown_url(url)
                )
                .into(),
            ));
        }
        let tls = match (&files.root, config.get_ssl_mode()) {
            (Some(path), _) => Some(tls_to(path, files.identity(url)?, url)?),
            (None, tokio_postgres::config::SslMode::Require) => {
                return Err(StoreError::Backend(
                    format!(
                        "the database URL {} asks for TLS (sslmode=require) but names no CA to check the database server's certificate against: add sslrootcert=/PATH/ca.pem",
                        shown_url(url)
                    )
                    .into(),
                ));
            }
            (None, _) => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("guestkey-db")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Backend(format!("cannot start the database thread: {e}").into())
            })?;
        let store = Self {
            config,
            shown: shown_url(url),
            max: max_connections.max(1),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            runtime: Some(runtime),
            tls,
            counters: Counters::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The URL without its password (for messages and `status`).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Runs `fut` on the store's runtime and waits for it, at most
    /// [`CALL_DEADLINE`].
    fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(rt) = self.runtime.as_ref() else {
            return Err(StoreError::Backend("the database store is closed".into()));
        };
        let started = std::time::Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let r = match tokio::time::timeout(CALL_DEADLINE, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Backend(
                    format!(
                        "the database did not answer within {} s ({what})",
                        CALL_DEADLINE.as_secs()
                    )
                    .into(),
                )),
            };
            let _ = tx.send(r);
        });
        let r = rx
            .recv()
            .unwrap_or_else(|_| Err(StoreError::Backend("the database thread ended".into())));
        self.counters.count(started);
        r
    }

    fn connect(&self) -> Result<Pooled, StoreError> {
        let config = self.config.clone();
        let shown = self.shown.clone();
        let tls = self.tls.clone();
        let client = self.call("connect", async move {
            let unreachable = |e: tokio_postgres::Error| {
                StoreError::Backend(
                    format!("cannot reach the database at {shown}: {}", error_text(&e)).into(),
                )
            };
            let client = match tls {
                Some(tls) => {
                    let (client, connection) = config.connect(tls).await.map_err(unreachable)?;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::warn!(error = %error_text(&e), "lost a connection to the database");
                        }
                    });
                    client
                }
                None => {
                    let (client, connection) = config.connect(NoTls).await.map_err(unreachable)?;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::warn!(error = %error_text(&e), "lost a connection to the database");
                        }
                    });
                    client
                }
            };
            // A replica that stalls inside a transaction (SIGSTOP, a hung
            // thread) would hold the write lock: the database ends such a
            // session, and a writer waits for the lock only so long.
            client
                .batch_execute(&format!(
                    "SET idle_in_transaction_session_timeout = '{}ms'; SET lock_timeout = '{}ms'",
                    IDLE_IN_TRANSACTION.as_millis(),
                    LOCK_WAIT.as_millis()
                ))
                .await
                .map_err(backend)?;
            Ok(client)
        })?;
        Ok(Pooled {
            client: Arc::new(client),
            statements: HashMap::new(),
        })
    }

    /// A connection of the pool (a new one while fewer than `max` are
    /// open), waiting at most [`POOL_WAIT`] for one to be freed.
    fn take(&self) -> Result<Pooled, StoreError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = std::time::Instant::now() + POOL_WAIT;
        loop {
            while let Some(c) = pool.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                pool.open -= 1;
            }
            if pool.open < self.max {
                pool.open += 1;
                drop(pool);
                return self.connect().inspect_err(|_| {
                    let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                    pool.open -= 1;
                    self.freed.notify_one();
                });
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Backend(
                    format!(
                        "all {} connections to the database at {} stayed busy for {} s",
                        self.max,
                        self.shown,
                        POOL_WAIT.as_secs()
                    )
                    .into(),
                ));
            }
            pool = self
                .freed
                .wait_timeout(pool, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Gives a connection back (dropped instead when it failed).
    fn give_back(&self, c: Option<Pooled>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        match c {
            Some(c) if !c.client.is_closed() => pool.idle.push(c),
            _ => pool.open -= 1,
        }
        self.freed.notify_one();
    }

    /// Runs statements without parameters on `c`.
    fn batch(&self, c: &Pooled, sql: String) -> Result<(), StoreError> {
        let client = c.client.clone();
        self.call("statements", async move {
            client.batch_execute(&sql).await.map_err(backend)
        })
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let c = self.take()?;
        let client = c.client.clone();
        let r = self.call("schema migration", async move {
            client
                .batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK});
                     CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
                     INSERT INTO schema_version (version)
                         SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version);"
                ))
                .await
                .map_err(backend)?;
            let run = async {
                let version: i64 = client
                    .query_one("SELECT version FROM schema_version", &[])
                    .await
                    .map_err(backend)?
                    .get(0);
                let todo = pending(version)?;
                let last = todo.end;
                for i in todo {
                    client
                        .batch_execute(&MIGRATIONS[i].sql(Engine::Postgres))
                        .await
                        .map_err(|e| {
                            StoreError::Backend(
                                format!("schema migration {} failed: {}", i + 1, error_text(&e))
                                    .into(),
                            )
                        })?;
                }
                client
                    .execute(
                        "UPDATE schema_version SET version = $1",
                        &[&i64::try_from(last).unwrap_or(i64::MAX)],
                    )
                    .await
                    .map_err(backend)?;
                client.batch_execute("COMMIT").await.map_err(backend)
            };
            match run.await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    Err(e)
                }
            }
        });
        self.give_back(Some(c));
        r
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Not `drop`: that blocks, which a runtime worker may not.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Store for PostgresStore {
    fn begin(&self, access: Access) -> Result<Box<dyn Tx + '_>, StoreError> {
        Ok(Box::new(SqlTx::new(self.begin_conn(access)?)))
    }

    fn stats(&self) -> StoreStats {
        self.counters.stats()
    }
}

impl PostgresStore {
    /// A transaction as a plain connection (tools that copy tables).
    ///
    /// The `BEGIN` (and a writer's lock) goes to the database with the
    /// transaction's first statement, in one round trip (pipelined: the
    /// server runs them in order, and a statement after a failed `BEGIN` or
    /// lock fails too, so nothing runs outside the transaction). A
    /// transaction that runs no statement costs no round trip.
    pub fn begin_conn(&self, access: Access) -> Result<Box<dyn Conn + '_>, StoreError> {
        let c = self.take()?;
        Ok(Box::new(PgConn {
            store: self,
            conn: Some(c),
            open: false,
            begin: Some(match access {
                Access::Read => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY".to_owned(),
                Access::Write => format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"),
            }),
            queued: Vec::new(),
        }))
    }
}

/// A transaction on a pooled connection; rolled back when dropped unless
/// committed, then the connection goes back to the pool.
struct PgConn<'a> {
    store: &'a PostgresStore,
    conn: Option<Pooled>,
    /// A `BEGIN` reached the database and no `COMMIT` yet.
    open: bool,
    /// The `BEGIN` still to send, with the first statement.
    begin: Option<String>,
    /// Statements sent with the next one ([`Conn::execute_later`]).
    queued: Vec<(Statement, Vec<Value>)>,
}

impl PgConn<'_> {
    fn pooled(&mut self) -> Result<&mut Pooled, StoreError> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Backend("the transaction has ended".into()))
    }

    /// The prepared statement of `sql`, and the client.
    fn statement(&mut self, sql: &str) -> Result<(Arc<Client>, Statement), StoreError> {
        let store = self.store;
        let c = self.pooled()?;
        let client = c.client.clone();
        if let Some(s) = c.statements.get(sql) {
            return Ok((client, s.clone()));
        }
        let text = sql.to_owned();
        let cl = client.clone();
        let s = store.call("prepare", async move {
            cl.prepare(&text).await.map_err(backend)
        })?;
        if c.statements.len() >= 256 {
            c.statements.clear();
        }
        c.statements.insert(sql.to_owned(), s.clone());
        Ok((client, s))
    }
}

/// One request of a pipeline ([`PgConn::send`]).
enum Op {
    /// Statements without parameters (`BEGIN ...`, `COMMIT`).
    Batch(String),
    /// A statement whose rows are not wanted; answers its row count.
    Execute(Statement, Vec<Value>),
    /// A query; answers its rows.
    Query(Statement, Vec<Value>),
}

impl PgConn<'_> {
    /// Sends `ops` on the connection in this order, in one round trip
    /// (pipelined: the server runs them in order, and after a failed one
    /// the rest fail or, a `COMMIT`, roll the transaction back), with the
    /// pending `BEGIN` and the statements queued by
    /// [`Conn::execute_later`] first. The answer of the last op, or the
    /// first error in order.
    fn send(&mut self, what: &'static str, last: Vec<Op>) -> Result<Vec<Row>, StoreError> {
        let client = self.pooled()?.client.clone();
        let mut ops: Vec<Op> = Vec::with_capacity(last.len() + self.queued.len() + 1);
        ops.extend(self.begin.take().map(Op::Batch));
        ops.extend(self.queued.drain(..).map(|(s, p)| Op::Execute(s, p)));
        ops.extend(last);
        let r = self.store.call(what, async move {
            let futures: Vec<_> = ops
                .iter()
                .map(|op| {
                    let client = &client;
                    Box::pin(async move {
                        match op {
                            Op::Batch(sql) => {
                                client.batch_execute(sql).await.map_err(backend)?;
                                Ok(vec![])
                            }
                            Op::Execute(stmt, params) => {
                                let refs: Vec<&(dyn ToSql + Sync)> =
                                    params.iter().map(|p| p as _).collect();
                                let n = client.execute(stmt, &refs).await.map_err(backend)?;
                                Ok(vec![Row(vec![Value::Int(
                                    i64::try_from(n).unwrap_or(i64::MAX),
                                )])])
                            }
                            Op::Query(stmt, params) => {
                                let refs: Vec<&(dyn ToSql + Sync)> =
                                    params.iter().map(|p| p as _).collect();
                                let rows = client.query(stmt, &refs).await.map_err(backend)?;
                                rows.iter().map(row).collect()
                            }
                        }
                    })
                        as std::pin::Pin<
                            Box<dyn Future<Output = Result<Vec<Row>, StoreError>> + Send + '_>,
                        >
                })
                .collect();
            let mut out = Ok(vec![]);
            for r in in_order(futures).await {
                match (r, &out) {
                    (Err(e), Ok(_)) => out = Err(e),
                    (Ok(rows), Ok(_)) => out = Ok(rows),
                    (_, Err(_)) => {}
                }
            }
            out
        });
        // Whatever happened, a BEGIN may have reached the database: it is
        // ended (rolled back when dropped uncommitted).
        self.open = true;
        r
    }

    /// The statement `sql` with `params` as an op of [`PgConn::send`].
    fn op(&mut self, sql: &str, params: &[Value], query: bool) -> Result<Op, StoreError> {
        let (_, stmt) = self.statement(sql)?;
        let params = params.to_vec();
        Ok(if query {
            Op::Query(stmt, params)
        } else {
            Op::Execute(stmt, params)
        })
    }

    /// Ends the transaction with `last` then `COMMIT`, in one round trip.
    fn finish(&mut self, last: Vec<Op>) -> Result<(), StoreError> {
        let mut ops = last;
        ops.push(Op::Batch("COMMIT".to_owned()));
        let r = self.send("commit", ops).map(drop);
        self.open = false;
        if r.is_err() {
            // Rolled back, or unknown: the connection is not used again.
            self.conn = None;
        }
        r
    }
}

/// Polls `futures` together, each first in the order given, so that their
/// requests reach the connection in that order; their outputs in order.
async fn in_order<T>(
    mut futures: Vec<std::pin::Pin<Box<dyn Future<Output = T> + Send + '_>>>,
) -> Vec<T> {
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

impl Conn for PgConn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let op = self.op(sql, params, false)?;
        let rows = self.send("statement", vec![op])?;
        rows.first()
            .map(|r| r.get::<i64>(0))
            .transpose()?
            .map_or(Ok(0), |n| Ok(u64::try_from(n).unwrap_or(0)))
    }

    /// Queued, and sent with the transaction's next statement or its
    /// `COMMIT` (no round trip of its own); an error in it fails that one.
    fn execute_later(&mut self, sql: &str, params: &[Value]) -> Result<(), StoreError> {
        let (_, stmt) = self.statement(sql)?;
        self.queued.push((stmt, params.to_vec()));
        Ok(())
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let op = self.op(sql, params, true)?;
        self.send("query", vec![op])
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if !self.open && self.queued.is_empty() && self.begin.is_some() {
            // Nothing ran: nothing to commit.
            self.begin = None;
            return Ok(());
        }
        self.finish(vec![])
    }

    /// The statement and `COMMIT` in one round trip.
    fn execute_and_commit(&mut self, sql: &str, params: &[Value]) -> Result<(), StoreError> {
        let op = self.op(sql, params, false)?;
        self.finish(vec![op])
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }
}

impl Drop for PgConn<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Some(c) = self.conn.as_ref() {
                if let Err(e) = self.store.batch(c, "ROLLBACK".to_owned()) {
                    tracing::error!(error = %e, "cannot roll back a transaction");
                    self.conn = None;
                }
            }
        }
        self.store.give_back(self.conn.take());
    }
}

fn row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let mut cols = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let ty = c.type_();
        let v = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map(|v| v.map(|n| Value::Int(n.into())))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)
                .map(|v| v.map(|n| Value::Int(n.into())))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)
                .map(|v| v.map(|b| Value::Int(b.into())))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)
                .map(|v| v.map(Value::Blob))
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            r.try_get::<_, Option<String>>(i)
                .map(|v| v.map(Value::Text))
        } else {
            return Err(StoreError::Corrupt(format!(
                "column {} of type {ty}, which the store does not read",
                c.name()
            )));
        };
        cols.push(v.map_err(backend)?.unwrap_or(Value::Null));
    }
    Ok(Row(cols))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => {
                if *ty == Type::INT8 {
                    n.to_sql(ty, out)
                } else if *ty == Type::INT4 {
                    i32::try_from(*n)?.to_sql(ty, out)
                } else if *ty == Type::INT2 {
                    i16::try_from(*n)?.to_sql(ty, out)
                } else if *ty == Type::BOOL {
                    (*n != 0).to_sql(ty, out)
                } else {
                    Err(format!("an integer for a parameter of type {ty}").into())
                }
            }
            Value::Text(t) => t.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(error_text(&e).into())
}

/// The server's own message where there is one ("duplicate key value ..."),
/// else the client's.
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_owned(),
        },
        None => match e.source() {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The certificate files of a database URL, which PostgreSQL's own URL
/// syntax names but tokio-postgres does not read: `sslrootcert` (the CAs
/// to check the database server's certificate against), `sslcert` and
/// `sslkey` (a client certificate and its key, for a database that asks
/// for one: `hostssl ... cert` in pg_hba.conf).
#[derive(Default)]
struct TlsFiles {
    root: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// The client certificate chain and key, if the URL names them.
    fn identity(
        &self,
        url: &str,
    ) -> Result<
        Option<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
        StoreError,
    > {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, path: &std::path::Path, why: String| {
            StoreError::Backend(
                format!(
                    "{what} {} of the database URL {}: {why}",
                    path.display(),
                    shown_url(url)
                )
                .into(),
            )
        };
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) | (None, Some(_)) => {
                return Err(StoreError::Backend(
                    format!(
                        "the database URL {} names one of sslcert and sslkey: a client certificate needs both (sslcert=/PATH/client.pem&sslkey=/PATH/client.key)",
                        shown_url(url)
                    )
                    .into(),
                ));
            }
        };
        let pem = std::fs::read(cert)
            .map_err(|e| bad("sslcert", cert, format!("cannot read it: {e}")))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("sslcert", cert, format!("not PEM certificates: {e}")))?;
        if chain.is_empty() {
            return Err(bad("sslcert", cert, "it holds no certificate".into()));
        }
        // As libpq: a key that others may read is refused.
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(key)
            .map_err(|e| bad("sslkey", key, format!("cannot read it: {e}")))?;
        if meta.mode() & 0o077 != 0 {
            return Err(bad(
                "sslkey",
                key,
                format!(
                    "others may read it (mode {:o}): chmod 600 it",
                    meta.mode() & 0o777
                ),
            ));
        }
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read(key).map_err(|e| bad("sslkey", key, format!("cannot read it: {e}")))?,
        );
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad("sslkey", key, format!("not a PEM private key: {e}")))?;
        Ok(Some((chain, private)))
    }
}

/// `url` without the parameters of [`TlsFiles`], and those.
fn take_tls_files(url: &str) -> (String, TlsFiles) {
    let mut files = TlsFiles::default();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), files);
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let slot = match k {
                "sslrootcert" => &mut files.root,
                "sslcert" => &mut files.cert,
                "sslkey" => &mut files.key,
                _ => return true,
            };
            *slot = Some(std::path::PathBuf::from(v));
            false
        })
        .collect();
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, files)
}

/// TLS that trusts only the CA certificates in `path` and checks the
/// database server's name (the URL's host) against its certificate.
fn tls_to(
    path: &std::path::Path,
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    url: &str,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let bad = |why: String| {
        StoreError::Backend(
            format!(
                "sslrootcert {} of the database URL {}: {why}",
                path.display(),
                shown_url(url)
            )
            .into(),
        )
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(format!("not a CA certificate rustls accepts: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("it holds no certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some((chain, key)) => config.with_client_auth_cert(chain, key).map_err(|e| {
            StoreError::Backend(
                format!(
                    "the client certificate (sslcert, sslkey) of the database URL {}: {e}",
                    shown_url(url)
                )
                .into(),
            )
        })?,
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `url` with any password replaced by `***`.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
impl PostgresStore {
    /// Runs raw SQL outside any transaction of the store (tests of tamper
    /// detection); PostgreSQL's error text.
    pub(crate) fn tamper(&self, sql: &str) -> Result<(), String> {
        let c = self.take().map_err(|e| e.to_string())?;
        let r = self.batch(&c, sql.to_owned()).map_err(|e| e.to_string());
        self.give_back(Some(c));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        assert_eq!(
            shown_url("postgres://gk:s3cret@db:5432/gk"),
            "postgres://gk:***@db:5432/gk"
        );
        assert_eq!(shown_url("postgres://gk@db/gk"), "postgres://gk@db/gk");
        let e = PostgresStore::open("postgres://gk:s3cret@db:5432/gk?sslmode=require", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("s3cret") && e.contains("sslmode"), "{e}");
        let e = PostgresStore::open("postgres://gk:s3cret@db:notaport/gk", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            !e.contains("s3cret") && e.contains("postgres://USER@HOST"),
            "{e}"
        );
    }
}
