//! Protector specifications as operators write them: `file:PATH`,
//! `env:VARIABLE`, `prompt`.

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
}

impl ProtectorSpec {
    /// The protector this names; files hold `file_encoding`.
    pub fn protector(&self, file_encoding: Encoding, what: &str) -> Box<dyn KeyProtector> {
        match self {
            Self::File(p) => Box::new(FileProtector::new(p, file_encoding)),
            Self::Env(v) => Box::new(EnvProtector::new(v)),
            Self::Prompt => Box::new(PromptProtector::new(what)),
        }
    }
}

impl FromStr for ProtectorSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(path.into())),
            Some(("env", var)) if !var.is_empty() => Ok(Self::Env(var.to_owned())),
            None if s == "prompt" => Ok(Self::Prompt),
            _ => Err(format!(
                "`{s}` is not a key source: use file:PATH, env:VARIABLE or prompt"
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
        ] {
            assert_eq!(text.parse::<ProtectorSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["", "file:", "env:", "vault:x", "promptx"] {
            assert!(bad.parse::<ProtectorSpec>().is_err(), "{bad}");
        }
    }
}
