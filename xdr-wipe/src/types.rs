//! Variable-length XDR types with a declared maximum: `opaque name<MAX>`,
//! `string name<MAX>` and `T name<MAX>`.
//!
//! The maximum is part of the type, so a value longer than its schema allows
//! cannot be built, and a decoder refuses such a length before allocating.

use std::ops::Deref;

use crate::codec::Codec;
use crate::error::{Error, ErrorKind, LengthError};
use crate::reader::{Reader, padding};
use crate::writer::Writer;

/// Variable-length opaque data of at most `MAX` bytes (public, not secret:
/// see [`crate::SecretOpaque`] for key material).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Opaque<const MAX: u32>(Vec<u8>);

impl<const MAX: u32> Opaque<MAX> {
    /// Wraps `bytes`, refusing more than `MAX`.
    pub fn new(bytes: Vec<u8>) -> Result<Self, LengthError> {
        check_len("opaque data", bytes.len(), MAX)?;
        Ok(Self(bytes))
    }

    /// The bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl<const MAX: u32> Deref for Opaque<MAX> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<const MAX: u32> Codec for Opaque<MAX> {
    fn encoded_len(&self) -> usize {
        4 + self.0.len() + padding(self.0.len())
    }
    fn encode(&self, w: &mut Writer) {
        put_len(w, self.0.len());
        w.put_padded(&self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let len = r.read_len(MAX, 1)?;
        Ok(Self(r.take_padded(len)?.to_vec()))
    }
}

/// A string of at most `MAX` bytes. RFC 4506 strings are byte sequences;
/// guestkey's are UTF-8 (ASCII included), and anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct XdrString<const MAX: u32>(String);

impl<const MAX: u32> XdrString<MAX> {
    /// Wraps `s`, refusing more than `MAX` bytes.
    pub fn new(s: impl Into<String>) -> Result<Self, LengthError> {
        let s = s.into();
        check_len("string", s.len(), MAX)?;
        Ok(Self(s))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: u32> Deref for XdrString<MAX> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<const MAX: u32> std::fmt::Display for XdrString<MAX> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: u32> Codec for XdrString<MAX> {
    fn encoded_len(&self) -> usize {
        4 + self.0.len() + padding(self.0.len())
    }
    fn encode(&self, w: &mut Writer) {
        put_len(w, self.0.len());
        w.put_padded(self.0.as_bytes());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let len = r.read_len(MAX, 1)?;
        let at = r.offset();
        let bytes = r.take_padded(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Self(s.to_owned())),
            Err(_) => Err(r.error_at(at, ErrorKind::InvalidUtf8)),
        }
    }
}

/// A variable-length array of at most `MAX` XDR values, `T name<MAX>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BoundedVec<T, const MAX: u32>(Vec<T>);

impl<T, const MAX: u32> BoundedVec<T, MAX> {
    /// Wraps `items`, refusing more than `MAX`.
    pub fn new(items: Vec<T>) -> Result<Self, LengthError> {
        check_len("array", items.len(), MAX)?;
        Ok(Self(items))
    }

    /// The items.
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }
}

impl<T, const MAX: u32> Deref for BoundedVec<T, MAX> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Codec, const MAX: u32> Codec for BoundedVec<T, MAX> {
    fn encoded_len(&self) -> usize {
        4 + self.0.iter().map(Codec::encoded_len).sum::<usize>()
    }
    fn encode(&self, w: &mut Writer) {
        put_len(w, self.0.len());
        for v in &self.0 {
            v.encode(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let len = r.read_len(MAX, T::MIN_ENCODED_LEN)?;
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            items.push(T::decode(r)?);
        }
        Ok(Self(items))
    }
}

pub(crate) fn check_len(what: &'static str, len: usize, max: u32) -> Result<(), LengthError> {
    if len > max as usize {
        return Err(LengthError { what, len, max });
    }
    Ok(())
}

/// Writes a length prefix. Callers hold values whose length was checked
/// against a `u32` maximum when they were built.
pub(crate) fn put_len(w: &mut Writer, len: usize) {
    debug_assert!(u32::try_from(len).is_ok());
    w.put_u32(len as u32);
}
