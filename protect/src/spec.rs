//! Protector specifications as operators write them: `file:PATH`,
//! `env:VARIABLE`, `prompt`, `tpm:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Encoding, EnvProtector, FileProtector, KeyProtector, PromptProtector};

/// Where a key is kept, as named on a command line or in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectorSpec {
    /// A file (mode 0600).
    File(PathBuf),
    /// An environment variable (base64).
    Env(String),
    /// Typed at start-up (base64).
    Prompt,
    /// Sealed to this machine's TPM, in a file whose directory holds the
    /// TPM settings ([`crate::tpm::TpmSite`]). An empty path (`tpm` alone)
    /// is the program's default place for the key.
    Tpm(PathBuf),
}

impl ProtectorSpec {
    /// The protector this names; files hold `file_encoding`.
    pub fn protector(&self, file_encoding: Encoding, what: &str) -> Box<dyn KeyProtector> {
        match self {
            Self::File(p) => Box::new(FileProtector::new(p, file_encoding)),
            Self::Env(v) => Box::new(EnvProtector::new(v)),
            Self::Prompt => Box::new(PromptProtector::new(what)),
            // Sealed keys are raw bytes whatever the file encoding would be.
            Self::Tpm(p) => Box::new(crate::tpm::SiteProtector::new(p)),
        }
    }
}

impl FromStr for ProtectorSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(path.into())),
            Some(("env", var)) if !var.is_empty() => Ok(Self::Env(var.to_owned())),
            Some(("tpm", path)) if !path.is_empty() => Ok(Self::Tpm(path.into())),
            None if s == "prompt" => Ok(Self::Prompt),
            None if s == "tpm" => Ok(Self::Tpm(PathBuf::new())),
            _ => Err(format!(
                "`{s}` is not a key source: use file:PATH, env:VARIABLE, prompt, tpm or tpm:PATH"
            )),
        }
    }
}

impl fmt::Display for ProtectorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Env(v) => write!(f, "env:{v}"),
            Self::Prompt => f.write_str("prompt"),
            Self::Tpm(p) if p.as_os_str().is_empty() => f.write_str("tpm"),
            Self::Tpm(p) => write!(f, "tpm:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for (text, spec) in [
            ("file:/x", ProtectorSpec::File("/x".into())),
            ("env:GK", ProtectorSpec::Env("GK".into())),
            ("prompt", ProtectorSpec::Prompt),
            (
                "tpm:/d/tpm/master.key.tpm",
                ProtectorSpec::Tpm("/d/tpm/master.key.tpm".into()),
            ),
            ("tpm", ProtectorSpec::Tpm(PathBuf::new())),
        ] {
            assert_eq!(text.parse::<ProtectorSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["", "file:", "env:", "tpm:", "vault:x", "promptx"] {
            assert!(bad.parse::<ProtectorSpec>().is_err(), "{bad}");
        }
    }
}
