//! `xdr-wipe`: an XDR (RFC 4506) codec whose secret fields live in wiped
//! memory, and guestkey's key packet.
//!
//! Layers, bottom up:
//! - [`Reader`] / [`Writer`] and the [`Codec`] trait (after rustls's
//!   `Codec` + `Reader`): strict decoding (lengths checked against declared
//!   maxima before allocating, zero padding, no trailing bytes; errors name
//!   field and offset) and encoding into buffers sized up front and wiped
//!   on drop.
//! - XDR types: built-ins in [`codec`], bounded ones in [`types`],
//!   [`SecretOpaque`] for key material, and the [`xdr_struct!`],
//!   [`xdr_enum!`] and [`xdr_union!`] macros.
//! - [`packet`]: the key packet, version 1.
//! - [`seal`]: a packet sealed to one host with HPKE.
//!
//! The management server builds and seals packets; the host daemon opens
//! them. Nothing else in guestkey carries a key from one process to another.

#![forbid(unsafe_code)]

pub mod codec;
mod error;
#[cfg(any(fuzzing, test))]
pub mod fuzzing;
mod macros;
pub mod packet;
mod reader;
pub mod seal;
mod secret;
pub mod types;
mod writer;

pub use codec::{Codec, FixedArray, decode, encode};
pub use error::{Error, ErrorKind, LengthError};
pub use reader::Reader;
pub use secret::SecretOpaque;
pub use types::{BoundedVec, Opaque, XdrString};
pub use writer::{Encoded, Writer};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod rfc_tests;
