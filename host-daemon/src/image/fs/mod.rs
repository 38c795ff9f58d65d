//! Files in directories that someone else may write, without following
//! their links.
//!
//! guestkeyd runs as root, but a pool directory may belong to the user of a
//! session libvirtd, or be group-writable for shared storage: whoever can
//! write it can plant a symbolic link where a volume is about to be made,
//! or swap one in while an image is re-encrypted or wiped, and root would
//! then create, chown, write or wipe the link's target. So every operation
//! on an image goes through a [`SafeDir`]:
//!
//! - the directory is opened component by component from `/`, each with
//!   `O_NOFOLLOW`; a symbolic link on the way is followed only when the
//!   directory holding it can be written by root alone (then only root can
//!   have made it), at most 40 of them;
//! - names inside it are opened with `O_NOFOLLOW` (and `O_EXCL` to create),
//!   must be regular files, and are renamed and removed relative to the
//!   directory's descriptor, never by path;
//! - owner and mode are set on the open descriptor (`fchown`, `fchmod`);
//! - programs (qemu-img, qemu-io) get the open file as `/dev/fd/N`, so they
//!   work on the inode that was checked, not on whatever the name points to
//!   by the time they open it.
//!
//! Imported by the image layer only.

mod walk;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;

/// Name of the staging directory in a pool directory (see [`SafeDir::staging`]).
pub const STAGING: &str = ".guestkey";

/// A file-system operation that was refused or failed; the message names
/// the path and says why.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The system call failed.
    #[error("cannot {what} {path}: {errno}")]
    Sys {
        /// What was done.
        what: &'static str,
        /// The path.
        path: String,
        /// The error.
        errno: Errno,
    },
    /// A symbolic link in a directory that others can write.
    #[error(
        "{path} is a symbolic link in a directory that uid {owner} or others can write: guestkeyd does not follow it (use the real path, or make the directory root's)"
    )]
    UntrustedLink {
        /// The link.
        path: String,
        /// Owner of the directory holding it.
        owner: u32,
    },
    /// Not what was expected at this name.
    #[error("{path} is {found}, not {wanted}: refused")]
    WrongType {
        /// The path.
        path: String,
        /// What is there.
        found: &'static str,
        /// What was expected.
        wanted: &'static str,
    },
    /// The path cannot name a file in a directory.
    #[error("{0:?} is not an absolute path to a file")]
    BadPath(String),
    /// Too many links.
    #[error("{0}: more than 40 symbolic links")]
    TooManyLinks(String),
    /// The staging directory was made by someone else.
    #[error(
        "{0} is not guestkeyd's (another owner, or writable by others): remove it; guestkeyd makes its own"
    )]
    NotOurs(String),
    /// The name changed between two steps.
    #[error(
        "{0} was replaced while guestkeyd worked on it: refused (is someone tampering with the pool?)"
    )]
    Replaced(String),
}

fn kind(mode: u32) -> &'static str {
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of unknown type",
    }
}

/// Splits an absolute path into its directory and file name.
pub fn split(path: &str) -> Result<(PathBuf, String), FsError> {
    let p = Path::new(path);
    let bad = || FsError::BadPath(path.to_owned());
    if !p.is_absolute() || path.ends_with('/') || path.split('/').any(|c| c == "." || c == "..") {
        return Err(bad());
    }
    let name = match p.components().next_back() {
        Some(Component::Normal(n)) => n.to_str().ok_or_else(bad)?.to_owned(),
        _ => return Err(bad()),
    };
    let dir = p.parent().ok_or_else(bad)?.to_path_buf();
    Ok((dir, name))
}

/// An open directory; every operation works relative to its descriptor.
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// Identity of an inode, to tell whether a name still means the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

/// The identity of an open file.
pub fn file_id(f: &File) -> Result<FileId, FsError> {
    let st = rustix::fs::fstat(f).map_err(|errno| FsError::Sys {
        what: "inspect",
        path: "an open file".into(),
        errno,
    })?;
    Ok(FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

impl SafeDir {
    /// The directory containing the file at `path`, and the file's name.
    pub fn of_file(path: &str) -> Result<(Self, String), FsError> {
        let (dir, name) = split(path)?;
        Ok((Self::open(&dir)?, name))
    }

    /// The directory's path, as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    /// Owner and group of the directory.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Whether its group may write it (storage shared by several users).
    pub fn group_writable(&self) -> bool {
        self.mode & 0o020 != 0
    }

    /// Creates `name` (it must not exist, not even as a link), read-write,
    /// with `mode`.
    pub fn create_new(&self, name: &str, mode: u32) -> Result<File, FsError> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|errno| FsError::Sys {
            what: "create",
            path: self.shown(name),
            errno,
        })?;
        Ok(File::from(fd))
    }

    /// Opens the existing regular file `name`, read-only or read-write.
    pub fn open_file(&self, name: &str, write: bool) -> Result<File, FsError> {
        let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            access | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            Errno::LOOP => FsError::WrongType {
                path: self.shown(name),
                found: "a symbolic link",
                wanted: "a regular file",
            },
            errno => FsError::Sys {
                what: "open",
                path: self.shown(name),
                errno,
            },
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|errno| FsError::Sys {
            what: "inspect",
            path: self.shown(name),
            errno,
        })?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(FsError::WrongType {
                path: self.shown(name),
                found: kind(st.st_mode),
                wanted: "a regular file",
            });
        }
        // A second name for the inode: it may be another file that someone
        // linked here (an image never has two names).
        if st.st_nlink != 1 {
            return Err(FsError::WrongType {
                path: self.shown(name),
                found: "a file with other hard links",
                wanted: "an image with one name",
            });
        }
        // NONBLOCK only kept a FIFO planted at the name from hanging the
        // open; regular files ignore it, but clear it anyway.
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|errno| FsError::Sys {
            what: "inspect",
            path: self.shown(name),
            errno,
        })?;
        rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(|errno| FsError::Sys {
            what: "open",
            path: self.shown(name),
            errno,
        })?;
        Ok(File::from(fd))
    }

    /// Whether something (anything, links too) has this name.
    pub fn exists(&self, name: &str) -> Result<bool, FsError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(errno) => Err(FsError::Sys {
                what: "inspect",
                path: self.shown(name),
                errno,
            }),
        }
    }

    /// Whether `name` is still the file `id` (not replaced, not a link).
    pub fn is(&self, name: &str, id: FileId) -> Result<bool, FsError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(st.st_dev == id.dev && st.st_ino == id.ino),
            Err(Errno::NOENT) => Ok(false),
            Err(errno) => Err(FsError::Sys {
                what: "inspect",
                path: self.shown(name),
                errno,
            }),
        }
    }

    /// Removes the name (a link is removed, never followed). Returns
    /// whether there was one.
    pub fn remove(&self, name: &str) -> Result<bool, FsError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(errno) => Err(FsError::Sys {
                what: "remove",
                path: self.shown(name),
                errno,
            }),
        }
    }

    /// Renames `from` to `to` within this directory, replacing `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FsError> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(|errno| FsError::Sys {
            what: "rename",
            path: format!("{} to {to}", self.shown(from)),
            errno,
        })
    }

    /// The staging directory `.guestkey` inside this one (made if missing):
    /// owned by this process's user (root), mode 0711, so that nobody else
    /// can list it, create or rename anything in it, or move or remove it
    /// while it holds a file; QEMU, whatever user it runs as, can still
    /// open a file in it by path. Copies of images are made there.
    pub fn staging(&self) -> Result<SafeDir, FsError> {
        match rustix::fs::mkdirat(&self.fd, STAGING, Mode::from_raw_mode(0o711)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(errno) => {
                return Err(FsError::Sys {
                    what: "create",
                    path: self.shown(STAGING),
                    errno,
                });
            }
        }
        let shown = self.shown(STAGING);
        let fd = rustix::fs::openat(
            &self.fd,
            STAGING,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            Errno::LOOP | Errno::NOTDIR => FsError::WrongType {
                path: shown.clone(),
                found: "not a directory",
                wanted: "guestkeyd's staging directory",
            },
            errno => FsError::Sys {
                what: "open",
                path: shown.clone(),
                errno,
            },
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|errno| FsError::Sys {
            what: "inspect",
            path: shown.clone(),
            errno,
        })?;
        if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
            return Err(FsError::NotOurs(shown));
        }
        Ok(Self {
            fd,
            path: self.path.join(STAGING),
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        })
    }

    /// Moves `from` of this directory to `to` of `dest` (same file system),
    /// replacing `to`; with `exchange`, in one step each name gets what the
    /// other had (both must exist; links are moved, never followed).
    pub fn move_to(
        &self,
        from: &str,
        dest: &SafeDir,
        to: &str,
        exchange: bool,
    ) -> Result<(), FsError> {
        let flags = match exchange {
            true => rustix::fs::RenameFlags::EXCHANGE,
            false => rustix::fs::RenameFlags::empty(),
        };
        rustix::fs::renameat_with(&self.fd, from, &dest.fd, to, flags).map_err(|errno| {
            let verb = if exchange { "exchange" } else { "rename" };
            FsError::Sys {
                what: verb,
                path: format!("{} and {}", self.shown(from), dest.shown(to)),
                errno,
            }
        })
    }

    /// The names in the directory (not `.` and `..`).
    pub fn names(&self) -> Result<Vec<String>, FsError> {
        let sys = |errno| FsError::Sys {
            what: "list",
            path: self.path.display().to_string(),
            errno,
        };
        let mut out = vec![];
        for entry in rustix::fs::Dir::read_from(&self.fd).map_err(sys)? {
            let entry = entry.map_err(sys)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> Result<(), FsError> {
        rustix::fs::fsync(&self.fd).map_err(|errno| FsError::Sys {
            what: "sync",
            path: self.path.display().to_string(),
            errno,
        })
    }
}

/// Sets owner, group and mode on an open file.
pub fn set_owner(f: &File, uid: u32, gid: u32, mode: u32, shown: &str) -> Result<(), FsError> {
    let sys = |errno| FsError::Sys {
        what: "set the owner and mode of",
        path: shown.to_owned(),
        errno,
    };
    rustix::fs::fchown(
        f.as_fd(),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )
    .map_err(sys)?;
    rustix::fs::fchmod(f.as_fd(), Mode::from_raw_mode(mode & 0o7777)).map_err(sys)
}

/// Owner, group and mode of an open file.
pub fn owner_of(f: &File, shown: &str) -> Result<(u32, u32, u32), FsError> {
    let st = rustix::fs::fstat(f).map_err(|errno| FsError::Sys {
        what: "inspect",
        path: shown.to_owned(),
        errno,
    })?;
    Ok((st.st_uid, st.st_gid, st.st_mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(tag: &str) -> PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("gk-fs-{tag}-{}", hex::encode(b)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_are_split() {
        assert_eq!(
            split("/var/lib/p/v.qcow2").unwrap(),
            (PathBuf::from("/var/lib/p"), "v.qcow2".to_owned())
        );
        for bad in ["v.qcow2", "/", "/p/", "/p/..", "/p/."] {
            assert!(split(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_are_created_opened_renamed_and_removed_without_following_links() {
        let d = tmp("ops");
        let dir = SafeDir::open(&d).unwrap();
        let f = dir.create_new("a", 0o600).unwrap();
        let id = file_id(&f).unwrap();
        assert!(dir.is("a", id).unwrap());
        assert!(dir.create_new("a", 0o600).is_err(), "O_EXCL");
        // A planted link is never followed: not to open, not to create.
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("link")).unwrap();
        let e = dir.open_file("link", true).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(dir.create_new("link", 0o600).is_err());
        assert!(dir.remove("link").unwrap());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A FIFO does not hang the open and is refused.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.join("fifo").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = dir.open_file("fifo", false).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        dir.rename("a", "b").unwrap();
        assert!(dir.is("b", id).unwrap() && !dir.exists("a").unwrap());
        set_owner(&f, 0, 0, 0o640, "b").unwrap();
        assert_eq!(owner_of(&f, "b").unwrap().2, 0o640);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_to_directories_are_followed_only_where_only_root_can_write() {
        let d = tmp("links");
        let real = d.join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&real, d.join("abs")).unwrap();
        std::os::unix::fs::symlink("real", d.join("rel")).unwrap();
        // Root-owned (tests run as root), 0755: links are trusted.
        for l in ["abs", "rel"] {
            let dir = SafeDir::open(&d.join(l)).unwrap();
            dir.create_new(&format!("via-{l}"), 0o600).unwrap();
            assert!(real.join(format!("via-{l}")).exists());
        }
        // A directory others can write: its links are not followed.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = SafeDir::open(&d.join("abs")).err().unwrap().to_string();
        assert!(e.contains("does not follow"), "{e}");
        // A directory of another user: the same.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
        let e = SafeDir::open(&d.join("rel")).err().unwrap().to_string();
        assert!(e.contains("uid 65534"), "{e}");
        std::os::unix::fs::chown(&d, Some(0), None).unwrap();
        // A file where a directory is expected.
        std::fs::write(d.join("file"), b"").unwrap();
        let e = SafeDir::open(&d.join("file")).err().unwrap().to_string();
        assert!(
            e.contains("not a directory") || e.contains("Not a directory"),
            "{e}"
        );
        // A loop.
        std::os::unix::fs::symlink(d.join("loop"), d.join("loop")).unwrap();
        let e = SafeDir::open(&d.join("loop")).err().unwrap().to_string();
        assert!(e.contains("40 symbolic links"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
