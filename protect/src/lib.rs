//! Key protectors: the seam between a key that protects other keys at rest
//! and the place it is kept.
//!
//! guestkey has four such keys: the server's master key (it wraps every
//! volume key) and its CA key, and each host's store key (it seals the guest
//! store) and packet-sealing key (it opens the key packets the server seals
//! to the host). Each is obtained through a [`KeyProtector`]: today a file
//! readable by its owner only ([`FileProtector`]), an environment variable or
//! a prompt at start-up ([`EnvProtector`], [`PromptProtector`], for the
//! master key); the TPM issue adds a protector that seals the key to the
//! machine's TPM. Code that uses a key asks its protector and never knows
//! where the key lives.
//!
//! This crate imports nothing of guestkey's; the server (`mgmt-server`) and
//! the host daemon (`host-daemon`) use it. Keys come back as
//! [`ProtectedKey`]: exact-size wiped memory, not `Clone`, `Debug` redacted.

#![deny(unsafe_code)]

mod env;
mod file;
mod key;
mod spec;
pub mod tpm;

pub use env::{EnvProtector, PromptProtector};
pub use file::FileProtector;
pub use key::ProtectedKey;
pub use spec::ProtectorSpec;

use std::path::PathBuf;

/// How a protector writes a key where a person may see it: raw bytes (binary
/// key files, PEM text), or base64 text (the master key file, variable and
/// prompt, which operators copy by hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The bytes as they are.
    Raw,
    /// Standard base64 with padding; white space around it is ignored.
    Base64,
}

/// Why a key could not be stored or obtained. Messages name the place and
/// say what to do; none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// The file could not be read or written.
    #[error("cannot {what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is readable or writable by others than its owner.
    #[error("{0} is accessible by group or others: chmod 600 it (and check who changed it)")]
    Permissions(PathBuf),
    /// The file is a symbolic link, not a regular file, or another user's.
    #[error("{path} is {what}: a key file must be a regular file of this user")]
    NotAKeyFile {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// A key is already there; replacing it is a separate, explicit step.
    #[error("{0} already exists: it is not overwritten")]
    Exists(String),
    /// The environment variable is not set.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// Reading from the prompt failed.
    #[error("cannot read the key from the prompt: {0}")]
    Prompt(String),
    /// The text is not what the protector expects.
    #[error("the key from {origin} is not valid: {why}")]
    Format {
        /// Where it came from (a file, a variable, the prompt).
        origin: String,
        /// What is wrong with it (never the key).
        why: String,
    },
    /// The sealing (a TPM) refused or failed: the message says why and what
    /// to do.
    #[error("{0}")]
    Sealed(String),
    /// This protector can only hand out a key someone else keeps there.
    #[error("{0} is read-only: a new key cannot be stored there; store it yourself or pick a file")]
    ReadOnly(String),
}

/// Where one key is kept at rest.
///
/// Implementations hold no key themselves: each call reads or writes the
/// place it names.
pub trait KeyProtector: Send + Sync {
    /// Where the key is, for operators: e.g. `file /var/lib/guestkeyd/store.key`.
    fn describe(&self) -> String;
    /// Whether a key is kept there.
    fn exists(&self) -> Result<bool, ProtectError>;
    /// Keeps a new key there; refuses when one exists.
    fn create(&self, key: &ProtectedKey) -> Result<(), ProtectError>;
    /// Replaces the key kept there atomically (a rotation): afterwards either
    /// the old or the new key is there, never neither.
    fn replace(&self, key: &ProtectedKey) -> Result<(), ProtectError>;
    /// The key kept there.
    fn unseal(&self) -> Result<ProtectedKey, ProtectError>;
}
