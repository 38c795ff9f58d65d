//! The errors of domain operations and of the store.

use crate::ca::CaError;
use crate::masterkey::MasterKeyError;
use crate::model::names::InvalidInput;

/// Errors of domain operations, each mapped to a gRPC status by the
/// transport layer.
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
    /// A release needs a fresh, passed attestation of the host, and it
    /// has none (held back: retried, never counted towards giving up).
    #[error("{0}")]
    Unattested(String),
    /// A release waits for an operator's approval that did not come in
    /// time.
    #[error("{0}")]
    Unapproved(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database engine failed.
    #[error("database error: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The database is newer than this program.
    #[error(
        "the database has schema version {found}, newer than this guestkey-server ({known}): upgrade guestkey-server"
    )]
    TooNew {
        /// Version in the file.
        found: usize,
        /// Newest this build knows.
        known: usize,
    },
    /// A write made as leader by a replica that no longer holds the lease
    /// (it stalled, or lost the database): refused, nothing written.
    #[error(
        "this replica no longer leads ({0}): the write was not made; the leader replica does this work"
    )]
    Fenced(String),
    /// A row holds a value this server does not know.
    #[error("the database holds {0}: it was altered, or written by a newer guestkey-server")]
    Corrupt(String),
}
