//! Why a document was refused.

/// Why the domain XML was refused; names the line where it can, and what to
/// change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Too large.
    #[error("domain XML is {0} bytes, more than the 1 MiB limit")]
    TooLarge(usize),
    /// Not well-formed XML (libvirt refuses it too).
    #[error("domain XML is not well-formed (line {line}): {message}")]
    Malformed {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Well-formed XML that is not a usable domain, or that libvirt could
    /// read differently from guestkey.
    #[error("domain XML (line {line}): {message}")]
    Invalid {
        /// 1-based line.
        line: usize,
        /// What is wrong and what to change.
        message: String,
    },
}

impl XmlError {
    /// The 1-based line the error names, if it names one.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::TooLarge(_) => None,
            Self::Malformed { line, .. } | Self::Invalid { line, .. } => Some(*line),
        }
    }
}

/// An [`XmlError::Invalid`] at `line`.
pub(crate) fn invalid(line: usize, message: impl Into<String>) -> XmlError {
    XmlError::Invalid {
        line,
        message: message.into(),
    }
}

/// An [`XmlError::Malformed`] at `line`.
pub(crate) fn malformed(line: usize, message: impl Into<String>) -> XmlError {
    XmlError::Malformed {
        line,
        message: message.into(),
    }
}
