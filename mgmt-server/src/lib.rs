//! guestkey management server: key store, host enrollment CA, admin API,
//! and the pusher that delivers sealed key packets to host daemons.
//!
//! Layers: [`datadir`], [`db`], [`masterkey`], [`audit`] and [`ca`] hold
//! state; [`core`] and [`volumes`] are the domain logic; [`service`] (tonic
//! adapters, converting in [`pb`]) and [`push`] talk gRPC over mutual TLS;
//! `src/bin/` holds the two command-line programs.
//!
//! Peers are told apart by the SHA-256 of their certificate, recorded when
//! the CA signed it: the admin credential made by `init`, and each enrolled
//! host. A revoked host's certificate stops working at once.

#![forbid(unsafe_code)]

pub mod audit;
pub mod ca;
pub mod config;
pub mod convert;
pub mod core;
pub mod datadir;
pub mod db;
pub mod domxml;
pub mod guests;
pub mod init;
pub mod masterkey;
pub mod migrate;
pub mod names;
mod pb;
pub mod policy;
pub mod push;
pub mod rotate;
pub mod server;
pub mod service;
pub mod tls;
pub mod volumes;
