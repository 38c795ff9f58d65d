//! The wire: gRPC over mutual TLS, and nothing else.
//!
//! [`admin`] and [`host_api`] are the tonic services, thin adapters that
//! identify the caller by its certificate, run the domain call on a
//! blocking thread and convert with [`pb`]; [`agents`] is the one real
//! [`crate::domain::AgentClient`] (a tonic client per host, mutual TLS);
//! [`tls`] holds the TLS helpers; [`role`] refuses what the server's role
//! does not serve; [`console`] is the web console (HTML over HTTPS, the
//! same domain calls); [`server`] builds the domain from a data directory
//! and serves it.
//!
//! May import: `model`, `domain`, `store` (only [`server`], to open the
//! database), `scheduler` (only [`server`]), the leaf modules, and tonic,
//! prost and the generated `guestkey_proto` code. These files are the only
//! ones of the library that import tonic or prost. Imported by the
//! programs in `src/bin/`.

pub mod admin;
pub mod agents;
pub mod console;
pub mod host_api;
pub mod metrics;
pub(crate) mod pb;
pub(crate) mod role;
pub mod server;
pub mod tls;
