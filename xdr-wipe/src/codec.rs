//! The [`Codec`] trait and its implementations for XDR's built-in types:
//! int, unsigned int, hyper, unsigned hyper, bool, fixed-length opaque,
//! optional-data and fixed-length arrays.
//!
//! Variable-length types with a declared maximum live in [`crate::types`];
//! secret opaque data in [`crate::secret`].

use crate::error::{Error, ErrorKind};
use crate::reader::{Reader, padding};
use crate::writer::{Encoded, Writer};

/// A type with an XDR encoding.
pub trait Codec: Sized {
    /// Fewest bytes any value of this type encodes to. Decoders of
    /// variable-length sequences use it to refuse a length prefix that the
    /// remaining input cannot hold, before allocating.
    const MIN_ENCODED_LEN: usize = 4;
    /// Exact number of bytes [`Codec::encode`] writes.
    fn encoded_len(&self) -> usize;
    /// Appends the encoding to `w`.
    fn encode(&self, w: &mut Writer);
    /// Reads one value; the reader's field path names where an error occurred.
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error>;
}

/// Encodes `value` into a zeroizing buffer sized exactly up front.
pub fn encode<T: Codec>(value: &T) -> Encoded {
    let mut w = Writer::with_capacity(value.encoded_len());
    value.encode(&mut w);
    w.finish()
}

/// Decodes exactly one `T` from `bytes`: trailing bytes are an error.
pub fn decode<T: Codec>(bytes: &[u8]) -> Result<T, Error> {
    let mut r = Reader::new(bytes);
    let value = T::decode(&mut r)?;
    r.finish()?;
    Ok(value)
}

impl Codec for u32 {
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, w: &mut Writer) {
        w.put_u32(*self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        r.read_u32()
    }
}

impl Codec for i32 {
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, w: &mut Writer) {
        w.put_u32(*self as u32);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(r.read_u32()? as i32)
    }
}

impl Codec for u64 {
    const MIN_ENCODED_LEN: usize = 8;
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode(&self, w: &mut Writer) {
        w.put_u64(*self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        r.read_u64()
    }
}

impl Codec for i64 {
    const MIN_ENCODED_LEN: usize = 8;
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode(&self, w: &mut Writer) {
        w.put_u64(*self as u64);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(r.read_u64()? as i64)
    }
}

impl Codec for bool {
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode(&self, w: &mut Writer) {
        w.put_u32(u32::from(*self));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let at = r.offset();
        match r.read_u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(r.error_at(at, ErrorKind::InvalidBool(v))),
        }
    }
}

/// `void`: no bytes. Useful as the empty arm of a union.
impl Codec for () {
    const MIN_ENCODED_LEN: usize = 0;
    fn encoded_len(&self) -> usize {
        0
    }
    fn encode(&self, _: &mut Writer) {}
    fn decode(_: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(())
    }
}

/// Fixed-length opaque data, `opaque name[N]`, padded to a multiple of 4.
impl<const N: usize> Codec for [u8; N] {
    const MIN_ENCODED_LEN: usize = N + padding(N);
    fn encoded_len(&self) -> usize {
        N + padding(N)
    }
    fn encode(&self, w: &mut Writer) {
        w.put_padded(self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let bytes = r.take_padded(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

/// Optional-data, `T *name`: a bool, then the value if it is 1.
impl<T: Codec> Codec for Option<T> {
    fn encoded_len(&self) -> usize {
        4 + self.as_ref().map_or(0, Codec::encoded_len)
    }
    fn encode(&self, w: &mut Writer) {
        match self {
            None => w.put_u32(0),
            Some(v) => {
                w.put_u32(1);
                v.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let at = r.offset();
        match r.read_u32()? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(r)?)),
            v => Err(r.error_at(at, ErrorKind::InvalidOptional(v))),
        }
    }
}

/// A fixed-length array of `N` XDR values, `T name[N]`.
///
/// A newtype, not `[T; N]`, so that `[u8; N]` keeps meaning fixed opaque data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedArray<T, const N: usize>(pub [T; N]);

impl<T: Codec, const N: usize> Codec for FixedArray<T, N> {
    const MIN_ENCODED_LEN: usize = N * T::MIN_ENCODED_LEN;
    fn encoded_len(&self) -> usize {
        self.0.iter().map(Codec::encoded_len).sum()
    }
    fn encode(&self, w: &mut Writer) {
        for v in &self.0 {
            v.encode(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        // Refuse input too short for N items before allocating room for them.
        if Self::MIN_ENCODED_LEN > r.remaining() {
            return Err(r.error_at(
                r.offset(),
                ErrorKind::Truncated {
                    needed: Self::MIN_ENCODED_LEN,
                    available: r.remaining(),
                },
            ));
        }
        let mut items = Vec::with_capacity(N);
        for _ in 0..N {
            items.push(T::decode(r)?);
        }
        match items.try_into() {
            Ok(array) => Ok(FixedArray(array)),
            // The loop above pushed exactly N items.
            Err(_) => unreachable!("FixedArray decoded a wrong number of items"),
        }
    }
}
