//! A key in a file that only its owner may read.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Encoding, KeyProtector, ProtectError, ProtectedKey};

/// Key files are small: a PEM key or 32 bytes of base64 at most a few KiB.
const MAX_FILE: u64 = 64 << 10;

/// A key kept in a file with mode 0600, in raw bytes or base64 text.
///
/// Reading refuses a symbolic link (`O_NOFOLLOW`), anything but a regular
/// file, a file of another user, and a file that group or others may read
/// or write. Writing makes the file with `O_EXCL`, mode 0600, syncs it, and
/// links it into place atomically, so a crash leaves no half-written key.
#[derive(Debug, Clone)]
pub struct FileProtector {
    path: PathBuf,
    encoding: Encoding,
}

impl FileProtector {
    /// The key in `path`, written as `encoding`.
    pub fn new(path: impl Into<PathBuf>, encoding: Encoding) -> Self {
        Self {
            path: path.into(),
            encoding,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ProtectError + '_ {
        move |source| ProtectError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `key` to a new temporary file beside the target and returns it.
    fn write_temp(&self, key: &ProtectedKey) -> Result<PathBuf, ProtectError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .map_or("key".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{name}.new-{}", std::process::id()));
        // A leftover of a crashed write (ours: same pid is impossible across
        // boots only by luck, so remove whatever is there; O_EXCL below).
        let _ = std::fs::remove_file(&tmp);
        let io = |what| {
            let tmp = tmp.clone();
            move |source| ProtectError::Io {
                what,
                path: tmp,
                source,
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io("create"))?;
        let text = encode(key, self.encoding);
        let written = f
            .write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(io("write"));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    fn sync_dir(&self) {
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
    }
}

/// The text a key file holds.
fn encode(key: &ProtectedKey, encoding: Encoding) -> zeroize::Zeroizing<Vec<u8>> {
    use base64::Engine as _;
    match encoding {
        Encoding::Raw => zeroize::Zeroizing::new(key.expose_secret().to_vec()),
        Encoding::Base64 => {
            let mut out = zeroize::Zeroizing::new(vec![
                0u8;
                base64::encoded_len(key.len(), true)
                    .unwrap_or(0)
            ]);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(key.expose_secret(), &mut out)
                .unwrap_or(0);
            out.truncate(n);
            out
        }
    }
}

/// The key in `text` (from `origin`, for messages).
pub(crate) fn decode(
    text: &[u8],
    encoding: Encoding,
    origin: &str,
) -> Result<ProtectedKey, ProtectError> {
    use base64::Engine as _;
    match encoding {
        Encoding::Raw => Ok(ProtectedKey::copy_from_secret_slice(text)),
        Encoding::Base64 => {
            let trimmed = text.trim_ascii();
            let bad = |why: &str| ProtectError::Format {
                origin: origin.to_owned(),
                why: why.to_owned(),
            };
            let max = base64::decoded_len_estimate(trimmed.len());
            let mut buf = zeroize::Zeroizing::new(vec![0u8; max]);
            let n = base64::engine::general_purpose::STANDARD
                .decode_slice(trimmed, &mut buf)
                .map_err(|_| bad("it is not base64 text"))?;
            Ok(ProtectedKey::copy_from_secret_slice(&buf[..n]))
        }
    }
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory
    // of ours.
    unsafe { libc::geteuid() }
}

impl KeyProtector for FileProtector {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn exists(&self) -> Result<bool, ProtectError> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io("inspect")(e)),
        }
    }

    fn create(&self, key: &ProtectedKey) -> Result<(), ProtectError> {
        if self.exists()? {
            return Err(ProtectError::Exists(self.describe()));
        }
        let tmp = self.write_temp(key)?;
        // link(2) fails if the target exists: never replaces a key that
        // appeared meanwhile.
        let linked = std::fs::hard_link(&tmp, &self.path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                self.sync_dir();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(ProtectError::Exists(self.describe()))
            }
            Err(e) => Err(self.io("create")(e)),
        }
    }

    fn replace(&self, key: &ProtectedKey) -> Result<(), ProtectError> {
        let tmp = self.write_temp(key)?;
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io("replace")(e));
        }
        self.sync_dir();
        Ok(())
    }

    fn unseal(&self) -> Result<ProtectedKey, ProtectError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    ProtectError::NotAKeyFile {
                        path: self.path.clone(),
                        what: "a symbolic link",
                    }
                } else {
                    self.io("read")(e)
                }
            })?;
        // Checked on the open file: what is read is what was checked.
        let meta = f.metadata().map_err(self.io("inspect"))?;
        if !meta.file_type().is_file() {
            return Err(ProtectError::NotAKeyFile {
                path: self.path.clone(),
                what: "not a regular file",
            });
        }
        if meta.uid() != effective_uid() {
            return Err(ProtectError::NotAKeyFile {
                path: self.path.clone(),
                what: "owned by another user",
            });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(ProtectError::Permissions(self.path.clone()));
        }
        if meta.len() > MAX_FILE {
            return Err(ProtectError::Format {
                origin: self.describe(),
                why: format!("it is {} bytes, more than a key file holds", meta.len()),
            });
        }
        // Sized up front: a growing buffer would leave copies behind.
        let mut buf = zeroize::Zeroizing::new(vec![0u8; meta.len() as usize]);
        let mut f = f;
        f.read_exact(&mut buf).map_err(self.io("read"))?;
        decode(&buf, self.encoding, &self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!(
            "gk-protect-{}-{}",
            std::process::id(),
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn create_unseal_replace_in_both_encodings() {
        let d = dir();
        for enc in [Encoding::Raw, Encoding::Base64] {
            let p = FileProtector::new(d.join(format!("{enc:?}.key")), enc);
            assert!(!p.exists().unwrap());
            let k = ProtectedKey::random(32).unwrap();
            p.create(&k).unwrap();
            let mode = std::fs::metadata(p.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert_eq!(p.unseal().unwrap().expose_secret(), k.expose_secret());
            let again = p.create(&ProtectedKey::random(32).unwrap()).unwrap_err();
            assert!(again.to_string().contains("already exists"), "{again}");
            assert_eq!(p.unseal().unwrap().expose_secret(), k.expose_secret());
            let k2 = ProtectedKey::random(32).unwrap();
            p.replace(&k2).unwrap();
            assert_eq!(p.unseal().unwrap().expose_secret(), k2.expose_secret());
        }
        // Base64 files are text an operator can copy.
        let text = std::fs::read_to_string(d.join("Base64.key")).unwrap();
        assert_eq!(text.len(), 44, "{text}");
        // No temporary file is left.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn links_loose_modes_and_junk_are_refused() {
        let d = dir();
        let real = FileProtector::new(d.join("real.key"), Encoding::Raw);
        real.create(&ProtectedKey::random(32).unwrap()).unwrap();
        std::os::unix::fs::symlink(d.join("real.key"), d.join("link.key")).unwrap();
        let link = FileProtector::new(d.join("link.key"), Encoding::Raw);
        let e = link.unseal().unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // A link where a key is to be created is not followed either.
        let e = link.create(&ProtectedKey::random(32).unwrap()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");

        std::fs::set_permissions(d.join("real.key"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let e = real.unseal().unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");

        std::fs::create_dir(d.join("dir.key")).unwrap();
        let e = FileProtector::new(d.join("dir.key"), Encoding::Raw)
            .unseal()
            .unwrap_err()
            .to_string();
        assert!(e.contains("regular file"), "{e}");

        let junk = d.join("junk.key");
        std::fs::write(&junk, "not base64!").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = FileProtector::new(&junk, Encoding::Base64)
            .unseal()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not base64"), "{e}");
        assert!(!e.contains("not base64!"), "the content is not echoed: {e}");

        let missing = FileProtector::new(d.join("missing.key"), Encoding::Raw);
        let e = missing.unseal().unwrap_err().to_string();
        assert!(e.contains("missing.key"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
