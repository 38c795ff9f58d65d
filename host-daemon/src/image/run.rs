//! Running qemu-img and qemu-io: keys go on inherited pipes and images as
//! inherited descriptors (`/dev/fd/N`), never in argv, the environment or a
//! file, and never by a path someone could swap.

#![allow(unsafe_code)] // pre_exec with dup2, with a SAFETY comment

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use super::ImageError;

/// What qemu-img (QEMU 7.2) says when its PBKDF calibration fails.
pub const CALIBRATION_FAILED: &str = "Unable to get accurate CPU usage";

/// How often qemu-img is tried when its PBKDF calibration fails.
///
/// Before it writes a LUKS keyslot, qemu-img times 32,768 PBKDF2 rounds
/// with `getrusage(RUSAGE_THREAD)` and reads only the user time. Linux
/// splits a thread's precise run time into user and system time by tick
/// samples, so a young process that has not yet been sampled in user mode
/// reads 0 ms, and qemu-img gives up. Measured on this project's 2-core
/// machines: 30% of tries fail when idle, about 55% with both cores busy
/// (mean 2.1 tries, at most 11 in 60 creations). Tries are independent and
/// a failed one costs a few milliseconds and changes nothing on disk;
/// 30 tries leave about 1 failure in 10^8 even under load.
///
/// guestkeyd itself no longer asks qemu-img to write keyslots for the
/// images it makes (it writes their LUKS headers and keyslots itself, see
/// [`super::luks1`]); this is for the headers it does not know (a shallow
/// rekey of an image whose LUKS header another tool wrote) and for the
/// tests, which make images with qemu-img and libvirt.
pub const CALIBRATION_TRIES: u32 = 30;

enum Item<'a> {
    Secret(&'a [u8]),
    File(&'a File),
}

/// The descriptors a child gets, numbered from 3 in the order added.
#[derive(Default)]
pub(super) struct Fds<'a> {
    items: Vec<Item<'a>>,
}

impl<'a> Fds<'a> {
    /// No descriptors yet.
    pub(super) fn new() -> Self {
        Self::default()
    }

    fn next(&self) -> usize {
        3 + self.items.len()
    }

    /// Adds `key` as QEMU secret object `id`; returns the `--object` value.
    pub(super) fn secret(&mut self, id: &str, key: &'a [u8]) -> String {
        let n = self.next();
        self.items.push(Item::Secret(key));
        format!("secret,id={id},file=/dev/fd/{n},format=raw")
    }

    /// Adds an open image; returns the name the child opens it by.
    pub(super) fn file(&mut self, f: &'a File) -> String {
        let n = self.next();
        self.items.push(Item::File(f));
        format!("/dev/fd/{n}")
    }
}

/// Runs `program args` with `fds`.
pub(super) fn run(program: &str, args: &[String], fds: &Fds<'_>) -> Result<Output, ImageError> {
    let pipe_err = |e: std::io::Error| ImageError::Spawn {
        program: program.to_owned(),
        source: e,
    };
    // Every descriptor first copied to 10 or above (close-on-exec), so that
    // dup2 below always makes a new descriptor (dup2 of a descriptor onto
    // itself would keep its close-on-exec flag) and no target overwrites a
    // source not yet copied.
    let mut high: Vec<OwnedFd> = Vec::with_capacity(fds.items.len());
    for item in &fds.items {
        let fd = match item {
            Item::Secret(s) => {
                let (r, mut w) = std::io::pipe().map_err(pipe_err)?;
                // A key is far below the pipe buffer (64 KiB): never blocks.
                w.write_all(s).map_err(pipe_err)?;
                drop(w);
                rustix::io::fcntl_dupfd_cloexec(r.as_fd(), 10)
            }
            Item::File(f) => rustix::io::fcntl_dupfd_cloexec(f.as_fd(), 10),
        }
        .map_err(|e| pipe_err(e.into()))?;
        high.push(fd);
    }
    let raw: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only dup2 runs, which is
    // async-signal-safe, on descriptors open in the parent (kept open by
    // `high` until the child has exec'd). dup2 clears FD_CLOEXEC on the new
    // descriptor, so the child inherits exactly fds 3.. and nothing else of
    // ours.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    drop(high);
    Ok(out)
}

/// qemu-img with `fds`, tried again (up to [`CALIBRATION_TRIES`]) when its
/// PBKDF calibration fails.
pub(super) fn qemu_img(args: &[String], fds: &Fds<'_>) -> Result<Output, ImageError> {
    let mut tries = 0;
    loop {
        let out = run("qemu-img", args, fds)?;
        tries += 1;
        if out.status.success()
            || tries == CALIBRATION_TRIES
            || !String::from_utf8_lossy(&out.stderr).contains(CALIBRATION_FAILED)
        {
            if tries > 1 {
                tracing::debug!(tries, "qemu-img needed more than one PBKDF calibration");
            }
            return Ok(out);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What a failed tool said, one line.
pub(super) fn said(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned()
        + String::from_utf8_lossy(&out.stdout).trim();
    text.replace('\n', " ")
}

/// Arguments as owned strings.
pub(super) fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}
