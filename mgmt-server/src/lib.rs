//! guestkey management server: key store, host enrollment CA, admin API,
//! and the scheduler that delivers sealed key packets to host daemons.
//!
//! Layers, each importing only those below it:
//!
//! ```text
//! src/bin/            guestkey-server, guestkeyctl
//! transport/          tonic services (admin, host API), pb.rs, the gRPC AgentClient,
//!                     TLS, the server start-up                  | scheduler.rs
//! domain/             hosts, volumes, guests, rekey, push, convert, migrate, audit chain,
//!                     key release, master key (written against Store + AgentClient)
//! store/              the Store trait and its SQLite implementation, schema migrations
//! model/              typed states, names, info types, errors
//! ```
//!
//! Beside them, leaf modules that import nothing of this crate:
//! [`config`], [`datadir`], [`ca`], [`masterkey`], [`shares`] (the
//! recovery key's Shamir shares), [`domxml`] and [`tls`] (names and error
//! chains). [`init`] composes a new data directory, [`recovery`] splits its
//! recovery key and rebuilds it from a backup and M shares, [`backup`]
//! makes that backup (SQLite),
//! [`admins`] its further named admin credentials,
//! [`roles`] its one CA per role (and migrates data directories made
//! before roles), [`tpm`] seals its keys to the TPM (and reseals them).
//! Only `transport/` imports tonic or prost; only `store/sqlite/` imports
//! rusqlite.
//!
//! Each role has its own CA (hosts, server, admin), and each peer trusts
//! only the CA of the role it expects. Peers are told apart by the SHA-256
//! of their certificate, recorded when the CA signed it: the admin
//! credential made by `init`, and each enrolled host; clients pin the
//! certificate they expect (the server's, a host's). A revoked host's
//! certificate stops working at once.

#![forbid(unsafe_code)]

pub mod admins;
pub mod backup;
pub mod ca;
pub mod config;
pub mod database;
pub mod datadir;
pub mod domain;
#[cfg(any(fuzzing, test))]
pub mod fuzzing;
pub use guestkey_domxml as domxml;
pub mod init;
pub mod masterkey;
pub mod metrics;
pub mod model;
pub mod move_db;
pub mod recovery;
pub mod roles;
pub mod scheduler;
pub mod shares;
pub mod store;
pub mod tls;
pub mod tpm;
pub mod transport;

/// Validated names and sizes (kept at this path for the programs).
pub use model::names;

/// Rotation policies' inputs (kept at this path for the programs).
pub mod policy {
    pub use crate::model::Policy;
    pub use crate::model::names::parse_duration;
}
