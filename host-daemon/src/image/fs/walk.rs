//! Opening a directory without following links that others could plant.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{FsError, SafeDir, kind};

/// Symbolic links followed at most while opening a directory.
const MAX_LINKS: usize = 40;

impl SafeDir {
    /// Opens the directory `path` (absolute) without following a link that
    /// someone other than root could have planted.
    pub fn open(path: &Path) -> Result<Self, FsError> {
        let shown = path.display().to_string();
        if !path.is_absolute() {
            return Err(FsError::BadPath(shown));
        }
        let sys = |what: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |errno| FsError::Sys { what, path, errno }
        };
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let root = || rustix::fs::openat(rustix::fs::CWD, "/", dir_flags, Mode::empty());
        let mut fd = root().map_err(sys("open", Path::new("/")))?;
        let mut at = PathBuf::from("/");
        // Components still to walk, first one last.
        let mut todo: Vec<Vec<u8>> = components(path).into_iter().rev().collect();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c == b".." {
                // The physical parent of where we are (no path re-walked).
                fd = rustix::fs::openat(&fd, "..", dir_flags, Mode::empty())
                    .map_err(sys("open", &at))?;
                at.pop();
                continue;
            }
            let name = OsStr::from_bytes(&c);
            let next = at.join(name);
            match rustix::fs::openat(&fd, name, dir_flags, Mode::empty()) {
                Ok(sub) => {
                    fd = sub;
                    at = next;
                }
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    let st = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(sys("inspect", &next))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                        return Err(FsError::WrongType {
                            path: next.display().to_string(),
                            found: kind(st.st_mode),
                            wanted: "a directory",
                        });
                    }
                    let parent = rustix::fs::fstat(&fd).map_err(sys("inspect", &at))?;
                    if parent.st_uid != 0 || parent.st_mode & 0o022 != 0 {
                        return Err(FsError::UntrustedLink {
                            path: next.display().to_string(),
                            owner: parent.st_uid,
                        });
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(FsError::TooManyLinks(shown));
                    }
                    let target = rustix::fs::readlinkat(&fd, name, Vec::new())
                        .map_err(sys("read the link", &next))?;
                    let target = Path::new(OsStr::from_bytes(target.as_bytes())).to_path_buf();
                    if target.is_absolute() {
                        fd = root().map_err(sys("open", Path::new("/")))?;
                        at = PathBuf::from("/");
                    }
                    for t in components(&target).into_iter().rev() {
                        todo.push(t);
                    }
                }
                Err(errno) => {
                    return Err(FsError::Sys {
                        what: "open",
                        path: next.display().to_string(),
                        errno,
                    });
                }
            }
        }
        let st = rustix::fs::fstat(&fd).map_err(sys("inspect", path))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        })
    }
}

impl SafeDir {
    /// The first directory, from this one up to `/`, through which a user
    /// other than root could put another file at a name below it: one not
    /// root's, or one that group or others can write, unless it is sticky
    /// (`/tmp`: nobody can then move root's entry in it). This directory
    /// itself may not be sticky: it must be root's and writable by root
    /// only. None when the whole chain is root's.
    pub fn first_untrusted_ancestor(&self) -> Result<Option<PathBuf>, FsError> {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let sys = |path: &Path| {
            let path = path.display().to_string();
            move |errno| FsError::Sys {
                what: "inspect",
                path,
                errno,
            }
        };
        let mut at = self.path.clone();
        let mut st = rustix::fs::fstat(&self.fd).map_err(sys(&at))?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
            return Ok(Some(at));
        }
        let mut fd =
            rustix::fs::openat(&self.fd, "..", dir_flags, Mode::empty()).map_err(sys(&at))?;
        // Bounded: a path has at most PATH_MAX / 2 components.
        for _ in 0..4096 {
            let parent = rustix::fs::fstat(&fd).map_err(sys(&at))?;
            if (parent.st_dev, parent.st_ino) == (st.st_dev, st.st_ino) {
                // `/` is its own parent.
                return Ok(None);
            }
            if !at.pop() {
                at = PathBuf::from("/");
            }
            let sticky = parent.st_mode & 0o1000 != 0;
            if parent.st_uid != 0 || (parent.st_mode & 0o022 != 0 && !sticky) {
                return Ok(Some(at));
            }
            st = parent;
            fd = rustix::fs::openat(&fd, "..", dir_flags, Mode::empty()).map_err(sys(&at))?;
        }
        Ok(Some(at))
    }
}

/// The normal components of `p` as bytes (`.` dropped, `..` kept).
fn components(p: &Path) -> Vec<Vec<u8>> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_bytes().to_vec()),
            Component::ParentDir => Some(b"..".to_vec()),
            _ => None,
        })
        .collect()
}
