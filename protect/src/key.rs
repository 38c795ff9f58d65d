//! The key a protector hands out.

use std::fmt;

use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};

/// A protected key: exact-size wiped memory, never `Clone`; `Debug` prints a
/// redaction. The bytes are reached only through [`ProtectedKey::expose_secret`].
pub struct ProtectedKey(SecretBox<[u8]>);

impl ProtectedKey {
    /// A key of `len` bytes written in place by `fill` (no copy elsewhere).
    pub fn new_with(len: usize, fill: impl FnOnce(&mut [u8])) -> Self {
        // `vec![0; len]` allocates exactly `len` bytes: into_boxed_slice does
        // not reallocate, so no unwiped copy is left behind.
        let mut b = SecretBox::new(vec![0u8; len].into_boxed_slice());
        fill(b.expose_secret_mut());
        Self(b)
    }

    /// A copy of secret bytes; the caller wipes its own copy.
    pub fn copy_from_secret_slice(bytes: &[u8]) -> Self {
        Self::new_with(bytes.len(), |b| b.copy_from_slice(bytes))
    }

    /// `len` random bytes from the operating system.
    pub fn random(len: usize) -> std::io::Result<Self> {
        let mut failed = None;
        let k = Self::new_with(len, |b| {
            if let Err(e) = fill_random(b) {
                failed = Some(e);
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(k),
        }
    }

    /// The key bytes.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// Its length (not secret: fixed by the mechanism).
    pub fn len(&self) -> usize {
        self.0.expose_secret().len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for ProtectedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProtectedKey({} bytes, [REDACTED])", self.len())
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(buf).map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_and_random_differs() {
        let a = ProtectedKey::random(32).unwrap();
        let b = ProtectedKey::random(32).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        let shown = format!("{a:?}");
        assert_eq!(shown, "ProtectedKey(32 bytes, [REDACTED])");
    }
}
