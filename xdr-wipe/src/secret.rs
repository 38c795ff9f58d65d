//! Secret opaque data: key material that is decoded straight into a buffer
//! allocated once at its exact size, wiped on drop, never cloned and never
//! printed.

use std::fmt;

use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use subtle::ConstantTimeEq;

use crate::codec::Codec;
use crate::error::{Error, LengthError};
use crate::reader::{Reader, padding};
use crate::types::{check_len, put_len};
use crate::writer::Writer;

/// Variable-length secret opaque data of at most `MAX` bytes.
///
/// Not `Clone`; `Debug` prints a redaction. The bytes are reachable only
/// through [`SecretOpaque::expose_secret`], a name a reviewer can grep for.
pub struct SecretOpaque<const MAX: u32>(SecretBox<[u8]>);

impl<const MAX: u32> SecretOpaque<MAX> {
    /// Builds a secret of `len` bytes in place: `fill` writes into the final
    /// buffer, so no copy of the secret exists elsewhere.
    pub fn new_with(len: usize, fill: impl FnOnce(&mut [u8])) -> Result<Self, LengthError> {
        check_len("secret", len, MAX)?;
        let mut secret = Self::zeroed(len);
        fill(secret.0.expose_secret_mut());
        Ok(secret)
    }

    /// Copies secret bytes out of `bytes`. The caller remains responsible for
    /// wiping its own copy.
    pub fn copy_from_secret_slice(bytes: &[u8]) -> Result<Self, LengthError> {
        Self::new_with(bytes.len(), |buf| buf.copy_from_slice(bytes))
    }

    fn zeroed(len: usize) -> Self {
        // `vec![0; len]` allocates exactly `len` bytes, so turning it into a
        // boxed slice does not reallocate.
        Self(SecretBox::new(vec![0u8; len].into_boxed_slice()))
    }

    /// The secret bytes.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// Length in bytes (not secret: key lengths are fixed by the mechanism).
    pub fn len(&self) -> usize {
        self.0.expose_secret().len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Compares two secrets in constant time (for equal lengths).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.expose_secret().ct_eq(other).into()
    }
}

impl<const MAX: u32> fmt::Debug for SecretOpaque<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretOpaque([REDACTED])")
    }
}

impl<const MAX: u32> Codec for SecretOpaque<MAX> {
    fn encoded_len(&self) -> usize {
        4 + self.len() + padding(self.len())
    }
    fn encode(&self, w: &mut Writer) {
        put_len(w, self.len());
        w.put_padded(self.expose_secret());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let len = r.read_len(MAX, 1)?;
        let bytes = r.take_padded(len)?;
        let mut secret = Self::zeroed(len);
        secret.0.expose_secret_mut().copy_from_slice(bytes);
        Ok(secret)
    }
}

/// Bytes of stack [`StackWipe`] overwrites.
const STACK_WIPE: usize = 32 << 10;

/// Overwrites the stack below the caller's frame with zeros: where the
/// frames of the functions it called were. Cipher code (ChaCha20's SIMD
/// lanes, spilled registers) leaves pieces of what it processed there, and
/// nothing else wipes them.
#[inline(never)]
fn wipe_stack_below() {
    let mut area = [0u8; STACK_WIPE];
    zeroize::Zeroize::zeroize(&mut area[..]);
    std::hint::black_box(&area);
}

/// Wipes the stack below its owner's frame when dropped: held across a
/// call that handles clear key bytes (sealing, opening), it clears what
/// that call's frames left, on every path out.
pub(crate) struct StackWipe;

impl Drop for StackWipe {
    fn drop(&mut self) {
        wipe_stack_below();
    }
}
