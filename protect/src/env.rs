//! Keys handed to a process at start-up: an environment variable or a
//! prompt. Both are read-only: guestkey cannot store a new key there.

use std::io::{BufRead, IsTerminal, Write};

use crate::file::decode;
use crate::{Encoding, KeyProtector, ProtectError, ProtectedKey};

/// A key in an environment variable, as base64 text.
#[derive(Debug, Clone)]
pub struct EnvProtector {
    var: String,
}

impl EnvProtector {
    /// The key in variable `var`.
    pub fn new(var: impl Into<String>) -> Self {
        Self { var: var.into() }
    }
}

impl KeyProtector for EnvProtector {
    fn describe(&self) -> String {
        format!("environment variable {}", self.var)
    }

    fn exists(&self) -> Result<bool, ProtectError> {
        Ok(std::env::var_os(&self.var).is_some())
    }

    fn create(&self, _key: &ProtectedKey) -> Result<(), ProtectError> {
        Err(ProtectError::ReadOnly(self.describe()))
    }

    fn replace(&self, _key: &ProtectedKey) -> Result<(), ProtectError> {
        Err(ProtectError::ReadOnly(self.describe()))
    }

    fn unseal(&self) -> Result<ProtectedKey, ProtectError> {
        self.unseal_value(std::env::var(&self.var).ok().map(zeroize::Zeroizing::new))
    }
}

impl EnvProtector {
    /// The key in the variable's value (None: not set).
    fn unseal_value(
        &self,
        value: Option<zeroize::Zeroizing<String>>,
    ) -> Result<ProtectedKey, ProtectError> {
        let text = value.ok_or_else(|| ProtectError::MissingEnv(self.var.clone()))?;
        decode(text.as_bytes(), Encoding::Base64, &self.describe())
    }
}

/// A key typed or pasted on standard input at start-up, as base64 text.
#[derive(Debug, Clone, Default)]
pub struct PromptProtector {
    what: String,
}

impl PromptProtector {
    /// Asks for `what` (e.g. "guestkey master key") when stdin is a terminal.
    pub fn new(what: impl Into<String>) -> Self {
        Self { what: what.into() }
    }
}

impl KeyProtector for PromptProtector {
    fn describe(&self) -> String {
        "the prompt".to_owned()
    }

    fn exists(&self) -> Result<bool, ProtectError> {
        Ok(true)
    }

    fn create(&self, _key: &ProtectedKey) -> Result<(), ProtectError> {
        Err(ProtectError::ReadOnly(self.describe()))
    }

    fn replace(&self, _key: &ProtectedKey) -> Result<(), ProtectError> {
        Err(ProtectError::ReadOnly(self.describe()))
    }

    fn unseal(&self) -> Result<ProtectedKey, ProtectError> {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            let mut err = std::io::stderr();
            let _ = write!(err, "{} (base64): ", self.what);
            let _ = err.flush();
        }
        let mut line = zeroize::Zeroizing::new(String::with_capacity(256));
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| ProtectError::Prompt(e.to_string()))?;
        decode(line.as_bytes(), Encoding::Base64, &self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_reads_base64_and_refuses_to_store() {
        // A variable that no test sets (edition 2024 makes set_var unsafe).
        let var = format!("GK_PROTECT_TEST_{}", std::process::id());
        let p = EnvProtector::new(&var);
        assert!(!p.exists().unwrap());
        let e = p.unseal().unwrap_err().to_string();
        assert!(e.contains(&var), "{e}");
        let value = " AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n".to_owned();
        let k = p
            .unseal_value(Some(zeroize::Zeroizing::new(value)))
            .unwrap();
        assert_eq!(k.expose_secret(), (0u8..32).collect::<Vec<_>>().as_slice());
        let e = p
            .unseal_value(Some(zeroize::Zeroizing::new("%%%".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&var) && e.contains("not base64"), "{e}");
        let e = p.create(&k).unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
    }
}
