//! Decoding errors: every one names the field (as a dotted path from the
//! outermost structure) and the byte offset where the bad item starts.

use std::fmt;

/// What was wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input ended before the item did.
    #[error("input ends early: {needed} more bytes needed, {available} left")]
    Truncated {
        /// Bytes the item still needs.
        needed: usize,
        /// Bytes left in the input.
        available: usize,
    },
    /// A length prefix exceeds the declared maximum of the field.
    #[error("length {len} exceeds the maximum of {max}")]
    TooLong {
        /// The length found in the input.
        len: u64,
        /// The maximum the schema allows.
        max: u64,
    },
    /// A padding byte (RFC 4506 section 3) is not zero.
    #[error("padding byte is not zero")]
    NonZeroPadding,
    /// Bytes remain after the outermost item.
    #[error("{count} trailing bytes after the end of the data")]
    TrailingBytes {
        /// How many bytes remain.
        count: usize,
    },
    /// A boolean is neither 0 nor 1.
    #[error("boolean must be 0 or 1, found {0}")]
    InvalidBool(u32),
    /// An optional-data flag is neither 0 nor 1.
    #[error("optional-data flag must be 0 or 1, found {0}")]
    InvalidOptional(u32),
    /// An enum holds a value the schema does not declare.
    #[error("{value} is not a valid {type_name}")]
    InvalidEnum {
        /// Name of the enum type.
        type_name: &'static str,
        /// The value found.
        value: i32,
    },
    /// A union discriminant selects no arm.
    #[error("discriminant {value} selects no arm of {type_name}")]
    InvalidUnionArm {
        /// Name of the union type.
        type_name: &'static str,
        /// The discriminant found.
        value: i32,
    },
    /// A string is not valid UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// The value is well formed XDR but breaks a rule of the schema.
    #[error("{0}")]
    Invalid(&'static str),
}

/// A decoding error: what, where (field path) and at which byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    field: String,
    offset: usize,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, field: String, offset: usize) -> Self {
        Self {
            kind,
            field,
            offset,
        }
    }

    /// What was wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Dotted path of the field, e.g. `params.cipher`; empty for the outermost item.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Byte offset in the input where the bad item starts.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "at byte {}: {}", self.offset, self.kind)
        } else {
            write!(
                f,
                "field `{}` at byte {}: {}",
                self.field, self.offset, self.kind
            )
        }
    }
}

impl std::error::Error for Error {}

/// A value does not fit the bounds of an XDR type (encoding side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} of length {len} exceeds the maximum of {max}")]
pub struct LengthError {
    /// Which kind of value.
    pub what: &'static str,
    /// Its length.
    pub len: usize,
    /// The maximum.
    pub max: u32,
}
