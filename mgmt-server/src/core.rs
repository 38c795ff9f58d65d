//! The server's domain logic: hosts, enrollment, authorisation. Volumes are
//! in [`crate::volumes`]; the tonic services in [`crate::service`] are thin
//! adapters over these methods.
//!
//! Every mutating method runs in one SQLite transaction together with its
//! audit record: it happens completely, with its record, or not at all.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use base64::Engine as _;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use xdr_wipe::seal::HostPublicKey;

use crate::audit;
use crate::ca::{Ca, CaError};
use crate::config::Config;
use crate::datadir::DataDir;
use crate::db::{self, DbError, now_unix};
use crate::masterkey::{MasterKey, MasterKeyError};
use crate::names::{InvalidInput, Name, parse_address};

/// How long an enrollment token stays valid.
pub const TOKEN_TTL_SECS: i64 = 24 * 3600;

/// Errors of domain operations, each mapped to a gRPC status by the services.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Bad input from the caller.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The domain XML was refused.
    #[error("{0}")]
    Xml(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Authentication or authorisation failed.
    #[error("{0}")]
    Denied(String),
    /// A limit was reached.
    #[error("{0}")]
    Exhausted(String),
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Certificates.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Keys.
    #[error(transparent)]
    MasterKey(#[from] MasterKeyError),
    /// Internal failure, described.
    #[error("{0}")]
    Internal(String),
}

impl From<rusqlite::Error> for CoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(DbError::Sql(e))
    }
}

/// A host as the admin sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostInfo {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// `pending-enrollment`, `enrolled` or `revoked`.
    pub state: String,
    /// Registered at (Unix seconds).
    pub created_unix: i64,
    /// Enrolled at (0 before).
    pub enrolled_unix: i64,
    /// SHA-256 of its certificate, hex (empty before enrollment).
    pub certificate_sha256: String,
    /// Volumes assigned to it.
    pub volume_count: u32,
    /// Keys it last reported holding.
    pub held_keys: u32,
    /// When it last reported (0: never).
    pub inventory_reported_unix: i64,
    /// libvirt URI for migrations to it ("" for the default).
    pub libvirt_uri: String,
    /// QEMU migration URI for guests coming to it ("": libvirt's choice).
    pub migration_uri: String,
}

/// A host allowed to receive keys.
#[derive(Debug, Clone)]
pub struct EnrolledHost {
    /// Name.
    pub name: String,
    /// Host-agent address.
    pub address: String,
    /// Packet-sealing public key.
    pub sealing_key: HostPublicKey,
}

/// The caller of an API, as identified by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin credential.
    Admin(String),
    /// An enrolled, non-revoked host.
    Host(String),
    /// The server's own rotation scheduler.
    Scheduler,
}

impl Caller {
    /// `admin:NAME` or `host:NAME`, for the audit log.
    pub fn actor(&self) -> String {
        match self {
            Self::Admin(n) => format!("admin:{n}"),
            Self::Host(n) => format!("host:{n}"),
            Self::Scheduler => "server:scheduler".to_owned(),
        }
    }
}

/// The management server's state.
pub struct Core {
    db: Mutex<Connection>,
    master: RwLock<MasterKey>,
    pub(crate) ca: Ca,
    pub(crate) config: Config,
    pub(crate) releases: Mutex<HashMap<String, (i64, u32)>>,
    pub(crate) push_wake: tokio::sync::Notify,
    /// Guests whose migration this process is driving now.
    pub(crate) migrating_now: Mutex<std::collections::HashSet<String>>,
    /// Hosts' progress on long volume operations, by volume id.
    pub(crate) progress: Mutex<HashMap<String, crate::volumes::Progress>>,
    server_cert: String,
    server_key: zeroize::Zeroizing<String>,
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(format!("guestkey enrollment token v1:{token}")).to_vec()
}

impl Core {
    /// Opens an initialised data directory with the master key from the
    /// configured source.
    pub fn open(config: Config) -> Result<Self, CoreError> {
        let dir = DataDir::new(&config.data_dir);
        if !dir.db().exists() {
            return Err(CoreError::FailedPrecondition(format!(
                "{} is not a guestkey data directory (no guestkey.db): run `guestkey-server init --data-dir {}` first",
                dir.root().display(),
                dir.root().display()
            )));
        }
        let conn = db::open(&dir.db())?;
        let expected = db::meta_get(&conn, "master_key_id")?.unwrap_or_default();
        let master = crate::rotate::load_matching(&config.master_key_source, &expected)?;
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(&p)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| CoreError::Internal(format!("cannot read {}: {e}", p.display())))
        };
        let ca = Ca::from_pem(&read(dir.ca_cert())?, &read(dir.ca_key())?)?;
        let server_cert = read(dir.server_cert())?.to_string();
        let server_key = read(dir.server_key())?;
        Ok(Self {
            server_cert,
            server_key,
            db: Mutex::new(conn),
            master: RwLock::new(master),
            ca,
            config,
            releases: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            migrating_now: Mutex::new(std::collections::HashSet::new()),
            push_wake: tokio::sync::Notify::new(),
        })
    }

    /// The database connection (one writer; SQLite calls are short).
    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (its
        // transaction rolls back on drop), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server's certificate and key (PEM): its TLS identity, also as a
    /// client of the host daemons.
    pub fn server_identity(&self) -> (&str, &zeroize::Zeroizing<String>) {
        (&self.server_cert, &self.server_key)
    }

    /// The master key matching the database's current key id, as seen by
    /// `conn` (call inside the transaction that uses the key). After a
    /// rotation by `guestkey-server rotate-master-key`, reloads the key
    /// from its source.
    pub(crate) fn master_for(
        &self,
        conn: &Connection,
    ) -> Result<RwLockReadGuard<'_, MasterKey>, CoreError> {
        let expected = db::meta_get(conn, "master_key_id")?.unwrap_or_default();
        {
            let held = self.master.read().unwrap_or_else(|p| p.into_inner());
            if held.id() == expected {
                return Ok(held);
            }
        }
        let fresh = match &self.config.master_key_source {
            crate::masterkey::MasterKeySource::File(_) => {
                crate::rotate::load_matching(&self.config.master_key_source, &expected)?
            }
            other => {
                return Err(CoreError::FailedPrecondition(format!(
                    "the master key was rotated (now id {expected}) and this server reads it from {other}: restart guestkey-server with the new key"
                )));
            }
        };
        tracing::info!(id = %fresh.id(), "master key reloaded after a rotation");
        *self.master.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(self.master.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// SHA-256 (hex) of the server's certificate, which host daemons pin.
    pub fn server_cert_sha256(&self) -> String {
        let der = x509_parser::pem::parse_x509_pem(self.server_cert.as_bytes())
            .map(|(_, pem)| pem.contents)
            .unwrap_or_default();
        crate::ca::cert_sha256(&der)
    }

    /// The CA certificate in PEM.
    pub fn ca_cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Who holds the certificate with this SHA-256, if anyone may call.
    pub fn identify(&self, cert_sha256: &str) -> Result<Option<Caller>, CoreError> {
        let conn = self.db();
        if let Some(name) = conn
            .query_row(
                "SELECT name FROM admins WHERE cert_sha256 = ?1",
                [cert_sha256],
                |r| r.get(0),
            )
            .optional()?
        {
            return Ok(Some(Caller::Admin(name)));
        }
        Ok(conn
            .query_row(
                "SELECT name FROM hosts WHERE cert_sha256 = ?1 AND state = 'enrolled'",
                [cert_sha256],
                |r| r.get(0),
            )
            .optional()?
            .map(Caller::Host))
    }

    /// Records a refused request in the audit log.
    pub fn audit_refusal(&self, actor: &str, subject: &str, why: &str) {
        let conn = self.db();
        if let Err(e) = audit::append(&conn, actor, "refused", subject, why) {
            tracing::error!(error = %e, "cannot write an audit record for a refusal");
        }
    }

    /// Registers a host; returns it and a one-time enrollment token.
    pub fn add_host(
        &self,
        caller: &Caller,
        name: &str,
        address: &str,
    ) -> Result<(HostInfo, String, i64), CoreError> {
        let name = Name::parse("host name", name)?;
        let address = parse_address(address)?;
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut())
            .map_err(|_| CoreError::Internal("the OS random number generator failed".into()))?;
        let token = format!(
            "gkt_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref())
        );
        let now = now_unix();
        let expires = now + TOKEN_TTL_SECS;
        let mut conn = self.db();
        let tx = conn.transaction()?;
        let exists: bool = tx.query_row(
            "SELECT COUNT(*) FROM hosts WHERE name = ?1",
            [name.as_str()],
            |r| r.get::<_, i64>(0),
        )? > 0;
        if exists {
            return Err(CoreError::AlreadyExists(format!(
                "host {name} already exists: pick another name, or `guestkeyctl host show {name}`"
            )));
        }
        tx.execute(
            "INSERT INTO hosts (name, address, state, token_hash, token_expires, created)
             VALUES (?1, ?2, 'pending-enrollment', ?3, ?4, ?5)",
            params![name.as_str(), address, hash_token(&token), expires, now],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "host.added",
            name.as_str(),
            &format!("address {address}"),
        )?;
        tx.commit()?;
        drop(conn);
        Ok((self.get_host(name.as_str())?, token, expires))
    }

    /// All hosts, by name.
    pub fn list_hosts(&self) -> Result<Vec<HostInfo>, CoreError> {
        let conn = self.db();
        let mut stmt = conn.prepare(&format!("{HOST_SELECT} ORDER BY h.name"))?;
        let rows = stmt.query_map([], host_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One host.
    pub fn get_host(&self, name: &str) -> Result<HostInfo, CoreError> {
        let conn = self.db();
        conn.query_row(
            &format!("{HOST_SELECT} WHERE h.name = ?1"),
            [name],
            host_row,
        )
        .optional()?
        .ok_or_else(|| {
            CoreError::NotFound(format!(
                "no host named {name:?}: see `guestkeyctl host list`"
            ))
        })
    }

    /// Revokes a host: its certificate no longer authenticates, no key is
    /// released to it, and its pending operations stop.
    pub fn revoke_host(&self, caller: &Caller, name: &str) -> Result<HostInfo, CoreError> {
        let mut conn = self.db();
        let tx = conn.transaction()?;
        let n = tx.execute("UPDATE hosts SET state = 'revoked', token_hash = NULL WHERE name = ?1 AND state != 'revoked'", [name])?;
        if n == 0 {
            drop(tx);
            drop(conn);
            let h = self.get_host(name)?;
            return Err(CoreError::FailedPrecondition(format!(
                "host {} is already revoked",
                h.name
            )));
        }
        audit::append(&tx, &caller.actor(), "host.revoked", name, "")?;
        tx.commit()?;
        drop(conn);
        self.get_host(name)
    }

    /// Enrolls a host with its one-time token: signs its CSR and records its
    /// certificate and packet-sealing key. Returns the host name and
    /// certificate (PEM).
    pub fn enroll(
        &self,
        token: &str,
        csr_der: &[u8],
        sealing_key: &[u8],
    ) -> Result<(String, String), CoreError> {
        let refuse = |why: String| {
            self.audit_refusal("unauthenticated", "enrollment", &why);
            CoreError::Denied(why)
        };
        let sealing_key = HostPublicKey::from_bytes(sealing_key)
            .map_err(|e| refuse(format!("enrollment refused: {e}")))?;
        let now = now_unix();
        let row: Option<(String, String, String, Option<i64>)> = self
            .db()
            .query_row(
                "SELECT name, address, state, token_expires FROM hosts WHERE token_hash = ?1",
                [hash_token(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((name, address, state, expires)) = row else {
            return Err(refuse("enrollment refused: the token is not valid (wrong, or already used): ask the admin for a new one with `guestkeyctl host add`".into()));
        };
        if state != "pending-enrollment" {
            return Err(refuse(format!(
                "enrollment refused: host {name} is {state}"
            )));
        }
        if expires.unwrap_or(0) < now {
            return Err(refuse(format!(
                "enrollment refused: the token of host {name} has expired: ask the admin for a new one"
            )));
        }
        let host_part = crate::tls::tls_name(&address).unwrap_or_default();
        let host_part = host_part.as_str();
        let issued = self
            .ca
            .sign_csr(csr_der, &name, vec![host_part.to_owned(), name.clone()])
            .map_err(|e| refuse(format!("enrollment refused: {e}")))?;
        let mut conn = self.db();
        let tx = conn.transaction()?;
        // The token check is repeated in the UPDATE, so two concurrent
        // enrollments with one token cannot both succeed.
        let n = tx.execute(
            "UPDATE hosts SET state = 'enrolled', token_hash = NULL, token_expires = NULL,
                 enrolled = ?1, cert_sha256 = ?2, sealing_public_key = ?3
             WHERE name = ?4 AND token_hash = ?5 AND state = 'pending-enrollment'",
            params![
                now,
                issued.sha256,
                sealing_key.as_bytes().as_slice(),
                name,
                hash_token(token)
            ],
        )?;
        if n != 1 {
            drop(tx);
            drop(conn);
            return Err(refuse(
                "enrollment refused: the token was used concurrently".into(),
            ));
        }
        audit::append(
            &tx,
            &format!("host:{name}"),
            "host.enrolled",
            &name,
            &format!("certificate sha256 {}", issued.sha256),
        )?;
        tx.commit()?;
        Ok((name, issued.cert))
    }

    /// Records what a host reports holding: volume ids, generations and
    /// guest UUIDs (never keys). Replaces its previous report.
    pub fn record_inventory(
        &self,
        host: &str,
        held: &[(String, u64, String)],
    ) -> Result<(), CoreError> {
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM host_inventory WHERE host = ?1", [host])?;
        for (volume, generation, guest) in held {
            tx.execute(
                "INSERT OR IGNORE INTO host_inventory (host, volume_id, generation, guest_uuid) VALUES (?1, ?2, ?3, ?4)",
                params![host, volume, *generation as i64, guest],
            )?;
        }
        tx.execute(
            "UPDATE hosts SET inventory_reported = ?1 WHERE name = ?2",
            params![now_unix(), host],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// An enrolled host's details for pushing, or why keys may not go to it.
    pub fn enrolled_host(&self, name: &str) -> Result<EnrolledHost, CoreError> {
        self.enrolled_host_in(&self.db(), name)
    }

    /// [`Core::enrolled_host`] inside a caller's transaction.
    pub(crate) fn enrolled_host_in(
        &self,
        conn: &Connection,
        name: &str,
    ) -> Result<EnrolledHost, CoreError> {
        let row: Option<(String, String, Option<Vec<u8>>)> = conn
            .query_row(
                "SELECT address, state, sealing_public_key FROM hosts WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((address, state, key)) = row else {
            return Err(CoreError::NotFound(format!(
                "no host named {name:?}: see `guestkeyctl host list`"
            )));
        };
        match (state.as_str(), key) {
            ("enrolled", Some(k)) => Ok(EnrolledHost {
                name: name.to_owned(),
                address,
                sealing_key: HostPublicKey::from_bytes(&k)
                    .map_err(|e| CoreError::Internal(e.to_string()))?,
            }),
            ("pending-enrollment", _) => Err(CoreError::FailedPrecondition(format!(
                "host {name} has not enrolled yet: run `guestkeyd enroll` on it with its token"
            ))),
            _ => Err(CoreError::FailedPrecondition(format!(
                "host {name} is {state}: no keys go to it"
            ))),
        }
    }
}

const HOST_SELECT: &str = "SELECT h.name, h.address, h.state, h.created, COALESCE(h.enrolled, 0),
        COALESCE(h.cert_sha256, ''),
        (SELECT COUNT(*) FROM volumes v WHERE v.host = h.name AND v.state != 'deleted'),
        (SELECT COUNT(*) FROM host_inventory i WHERE i.host = h.name), h.inventory_reported,
        h.libvirt_uri, h.migration_uri
    FROM hosts h";

fn host_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostInfo> {
    Ok(HostInfo {
        name: r.get(0)?,
        address: r.get(1)?,
        state: r.get(2)?,
        created_unix: r.get(3)?,
        enrolled_unix: r.get(4)?,
        certificate_sha256: r.get(5)?,
        volume_count: r.get(6)?,
        held_keys: r.get(7)?,
        inventory_reported_unix: r.get(8)?,
        libvirt_uri: r.get(9)?,
        migration_uri: r.get(10)?,
    })
}
