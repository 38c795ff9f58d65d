//! Strict XDR input: bounds are checked before anything is read or
//! allocated, padding must be zero, and errors carry the field path.

use crate::error::{Error, ErrorKind};

/// A cursor over XDR input that tracks the path of the field being decoded.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: Vec<&'static str>,
}

impl<'a> Reader<'a> {
    /// Starts reading `buf` at its first byte.
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            path: Vec::new(),
        }
    }

    /// Decodes a named field: errors inside `f` carry `name` in their path.
    pub fn field<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.path.push(name);
        let out = f(self);
        self.path.pop();
        out
    }

    /// Current byte offset.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// An error at byte `offset` in the current field.
    pub fn error_at(&self, offset: usize, kind: ErrorKind) -> Error {
        Error::new(kind, self.path.join("."), offset)
    }

    /// An error in the sub-field `name` of the current field, at `offset`:
    /// for rules checked after a field decoded.
    pub fn field_error_at(&self, name: &'static str, offset: usize, kind: ErrorKind) -> Error {
        let mut path = self.path.clone();
        path.push(name);
        Error::new(kind, path.join("."), offset)
    }

    /// Takes exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.remaining() {
            return Err(self.error_at(
                self.pos,
                ErrorKind::Truncated {
                    needed: n,
                    available: self.remaining(),
                },
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Takes `n` bytes followed by the zero padding that aligns them to 4.
    pub fn take_padded(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let start = self.pos;
        let pad = padding(n);
        // Check the whole padded extent first, so a short input is reported
        // once, at the start of the item.
        if n.saturating_add(pad) > self.remaining() {
            return Err(self.error_at(
                start,
                ErrorKind::Truncated {
                    needed: n + pad,
                    available: self.remaining(),
                },
            ));
        }
        let data = self.take(n)?;
        let pad_at = self.pos;
        if self.take(pad)?.iter().any(|&b| b != 0) {
            return Err(self.error_at(pad_at, ErrorKind::NonZeroPadding));
        }
        Ok(data)
    }

    /// Reads a 4-byte big-endian word.
    pub fn read_u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads an 8-byte big-endian word.
    pub fn read_u64(&mut self) -> Result<u64, Error> {
        let hi = self.read_u32()?;
        let lo = self.read_u32()?;
        Ok((u64::from(hi) << 32) | u64::from(lo))
    }

    /// Reads a length prefix and checks it against `max` and against the
    /// input left (each element needs at least `min_elem_size` bytes), so
    /// that no allocation is sized from an unchecked length.
    pub fn read_len(&mut self, max: u32, min_elem_size: usize) -> Result<usize, Error> {
        let at = self.pos;
        let len = self.read_u32()?;
        if len > max {
            return Err(self.error_at(
                at,
                ErrorKind::TooLong {
                    len: len.into(),
                    max: max.into(),
                },
            ));
        }
        let len = len as usize;
        let needed = len.saturating_mul(min_elem_size);
        if needed > self.remaining() {
            return Err(self.error_at(
                self.pos,
                ErrorKind::Truncated {
                    needed,
                    available: self.remaining(),
                },
            ));
        }
        Ok(len)
    }

    /// Ends decoding: bytes left over are an error.
    pub fn finish(self) -> Result<(), Error> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(self.error_at(self.pos, ErrorKind::TrailingBytes { count })),
        }
    }
}

/// Zero bytes that follow `n` data bytes to reach a multiple of 4.
pub(crate) const fn padding(n: usize) -> usize {
    (4 - n % 4) % 4
}
