//! XDR output into a buffer that is zeroized on drop.
//!
//! Callers size the buffer up front from [`Codec::encoded_len`]: a `Vec` that
//! grows by reallocation leaves an unwiped copy of its old contents in freed
//! memory. Should an estimate ever be short, [`Writer`] grows by copying into
//! a new buffer and wiping the old one, never by `realloc`.
//!
//! [`Codec::encoded_len`]: crate::Codec::encoded_len

use zeroize::{Zeroize, Zeroizing};

use crate::reader::padding;

/// Encoded bytes, wiped when dropped (they may hold secret fields).
pub type Encoded = Zeroizing<Vec<u8>>;

/// Appends XDR items to a zeroizing buffer.
pub struct Writer {
    buf: Encoded,
}

impl Writer {
    /// A writer whose buffer holds `capacity` bytes without reallocating.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
        }
    }

    fn reserve(&mut self, extra: usize) {
        let needed = self.buf.len() + extra;
        if needed <= self.buf.capacity() {
            return;
        }
        let mut bigger = Vec::with_capacity(needed.max(self.buf.capacity() * 2));
        bigger.extend_from_slice(&self.buf);
        // Zeroize wipes the whole allocation, spare capacity included.
        self.buf.zeroize();
        *self.buf = bigger;
    }

    /// Appends raw bytes (no length, no padding).
    pub fn put_bytes(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.buf.extend_from_slice(bytes);
    }

    /// Appends bytes and the zero padding that aligns them to 4.
    pub fn put_padded(&mut self, bytes: &[u8]) {
        let pad = padding(bytes.len());
        self.reserve(bytes.len() + pad);
        self.buf.extend_from_slice(bytes);
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
    }

    /// Appends a 4-byte big-endian word.
    pub fn put_u32(&mut self, v: u32) {
        self.put_bytes(&v.to_be_bytes());
    }

    /// Appends an 8-byte big-endian word.
    pub fn put_u64(&mut self, v: u64) {
        self.put_bytes(&v.to_be_bytes());
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// Ends writing.
    pub fn finish(self) -> Encoded {
        self.buf
    }
}
