//! Running qemu-img and qemu-io: keys go on inherited pipes and images as
//! inherited descriptors (`/dev/fd/N`), never in argv, the environment or a
//! file, and never by a path someone could swap.

#![allow(unsafe_code)] // posix_spawnp and waitpid, each with a SAFETY comment

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::process::Output;

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

/// Runs `program args` with `fds` (stdin `/dev/null`, stdout and stderr
/// captured).
///
/// Started by `posix_spawnp`, which glibc does with `CLONE_VM |
/// CLONE_VFORK`: no copy of this process's page tables. guestkeyd locks
/// all its memory (every thread's whole stack included), so a `fork` (as
/// `Command` with `pre_exec` does) copied hundreds of megabytes of page
/// tables and made every page copy-on-write, for each qemu-io of a batch
/// of new volumes: measured, a fifth of the host's CPU went to it.
pub(super) fn run(program: &str, args: &[String], fds: &Fds<'_>) -> Result<Output, ImageError> {
    let spawn_err = |e: std::io::Error| ImageError::Spawn {
        program: program.to_owned(),
        source: e,
    };
    let (out_r, out_w) = std::io::pipe().map_err(spawn_err)?;
    let (err_r, err_w) = std::io::pipe().map_err(spawn_err)?;
    // Every descriptor the child gets is first copied above every target
    // number (close-on-exec), so that no dup2 of the child's overwrites a
    // source not yet copied and each target is a new descriptor (dup2 of a
    // descriptor onto itself would keep its close-on-exec flag).
    let base = 10.max(3 + fds.items.len() as u32);
    let high = |fd: std::os::fd::BorrowedFd<'_>| {
        rustix::io::fcntl_dupfd_cloexec(fd, base as i32).map_err(|e| spawn_err(e.into()))
    };
    let mut mapped: Vec<(OwnedFd, i32)> = Vec::with_capacity(fds.items.len() + 2);
    mapped.push((high(out_w.as_fd())?, 1));
    mapped.push((high(err_w.as_fd())?, 2));
    drop((out_w, err_w));
    for (i, item) in fds.items.iter().enumerate() {
        let fd = match item {
            Item::Secret(s) => {
                let (r, mut w) = std::io::pipe().map_err(spawn_err)?;
                // A key is far below the pipe buffer (64 KiB): never blocks.
                w.write_all(s).map_err(spawn_err)?;
                drop(w);
                high(r.as_fd())?
            }
            Item::File(f) => high(f.as_fd())?,
        };
        mapped.push((fd, 3 + i as i32));
    }
    let cstr = |s: &[u8]| {
        CString::new(s).map_err(|_| {
            spawn_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an argument holds a NUL byte",
            ))
        })
    };
    let prog = cstr(program.as_bytes())?;
    let argv: Vec<CString> = std::iter::once(Ok(prog.clone()))
        .chain(args.iter().map(|a| cstr(a.as_bytes())))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            cstr(&kv)
        })
        .collect::<Result<_, _>>()?;
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(std::ptr::null_mut());
    let mut envp_p: Vec<*mut libc::c_char> = envp.iter().map(|a| a.as_ptr().cast_mut()).collect();
    envp_p.push(std::ptr::null_mut());
    let pairs: Vec<(i32, i32)> = mapped
        .iter()
        .map(|(fd, to)| (fd.as_raw_fd(), *to))
        .collect();
    let pid = spawn(&prog, &argv_p, &envp_p, &pairs).map_err(spawn_err)?;
    // The child has exec'd (vfork semantics): our copies can go.
    drop(mapped);
    let (stdout, stderr) = read_both(out_r.into(), err_r.into());
    let status = wait(pid).map_err(spawn_err)?;
    let (stdout, stderr) = (stdout.map_err(spawn_err)?, stderr.map_err(spawn_err)?);
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// `posix_spawnp` of `prog` with stdin `/dev/null`, `pairs` (descriptor,
/// number in the child) dup'ed into place, signals unblocked and SIGPIPE
/// back to its default (Rust ignores it in this process).
fn spawn(
    prog: &CString,
    argv: &[*mut libc::c_char],
    envp: &[*mut libc::c_char],
    pairs: &[(i32, i32)],
) -> std::io::Result<libc::pid_t> {
    let check = |rc: libc::c_int| match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    };
    let null = c"/dev/null";
    // SAFETY: the file actions and attributes are initialised before use
    // and destroyed once, after the spawn; every pointer passed (program,
    // argv, envp, "/dev/null") points to a NUL-terminated string or
    // NULL-terminated array alive for the whole call; the descriptors are
    // open in this process until it returns.
    unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut fa))?;
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut fa);
            return Err(e);
        }
        let mut r = check(libc::posix_spawn_file_actions_addopen(
            &mut fa,
            0,
            null.as_ptr(),
            libc::O_RDONLY,
            0,
        ));
        for (fd, to) in pairs {
            if r.is_ok() {
                r = check(libc::posix_spawn_file_actions_adddup2(&mut fa, *fd, *to));
            }
        }
        // Whatever else is open (a descriptor some library opened without
        // close-on-exec): not the child's.
        let first_free = pairs
            .iter()
            .map(|(_, to)| *to + 1)
            .max()
            .unwrap_or(3)
            .max(3);
        if r.is_ok() {
            r = check(libc::posix_spawn_file_actions_addclosefrom_np(
                &mut fa, first_free,
            ));
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        if r.is_ok() {
            r = check(libc::posix_spawnattr_setsigmask(&mut attr, &none))
                .and_then(|()| check(libc::posix_spawnattr_setsigdefault(&mut attr, &pipe)))
                .and_then(|()| {
                    check(libc::posix_spawnattr_setflags(
                        &mut attr,
                        (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF)
                            as libc::c_short,
                    ))
                });
        }
        let mut pid: libc::pid_t = 0;
        if r.is_ok() {
            r = check(libc::posix_spawnp(
                &mut pid,
                prog.as_ptr(),
                &fa,
                &attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ));
        }
        libc::posix_spawnattr_destroy(&mut attr);
        libc::posix_spawn_file_actions_destroy(&mut fa);
        r.map(|()| pid)
    }
}

/// Waits for child `pid` to end.
fn wait(pid: libc::pid_t) -> std::io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int, ours, for a child we spawned.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads two pipes to their ends at once (a child writing much to one
/// while we wait on the other would block). A pipe that fails is closed
/// at once, so that a child still writing to it gets EPIPE instead of
/// blocking forever (and so the other pipe, and the wait for the child,
/// come to an end).
fn read_both(a: OwnedFd, b: OwnedFd) -> (std::io::Result<Vec<u8>>, std::io::Result<Vec<u8>>) {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut pipes: [Option<OwnedFd>; 2] = [Some(a), Some(b)];
    let mut out = [Vec::new(), Vec::new()];
    let mut failed: [Option<std::io::Error>; 2] = [None, None];
    let mut buf = vec![0u8; 16 * 1024];
    while pipes.iter().any(Option::is_some) {
        let live: Vec<usize> = (0..2).filter(|&i| pipes[i].is_some()).collect();
        let ready: Vec<usize> = {
            let mut polls: Vec<PollFd<'_>> = live
                .iter()
                .filter_map(|&i| pipes[i].as_ref())
                .map(|fd| PollFd::new(fd, PollFlags::IN))
                .collect();
            match poll(&mut polls, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    for &i in &live {
                        failed[i] = Some(e.into());
                        pipes[i] = None;
                    }
                    break;
                }
            }
            live.iter()
                .zip(&polls)
                .filter(|(_, p)| !p.revents().is_empty())
                .map(|(&i, _)| i)
                .collect()
        };
        for i in ready {
            let Some(fd) = pipes[i].as_ref() else {
                continue;
            };
            match rustix::io::read(fd, &mut buf[..]) {
                Ok(0) => pipes[i] = None,
                Ok(n) => out[i].extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(e) => {
                    failed[i] = Some(e.into());
                    pipes[i] = None;
                }
            }
        }
    }
    let [oa, ob] = out;
    let [fa, fb] = failed;
    (fa.map_or(Ok(oa), Err), fb.map_or(Ok(ob), Err))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A child sees stdin `/dev/null`, its own output pipes and exactly the
    /// descriptors it was given (here a key pipe as 3): nothing else of
    /// ours, even while other threads spawn children with other keys, and
    /// not a descriptor left without close-on-exec.
    #[test]
    fn children_get_exactly_their_own_descriptors_while_others_spawn() {
        let script = "ls /proc/self/fd | tr '\\n' ' '; echo; readlink /proc/self/fd/0; \
                      cat /dev/fd/3; echo said >&2; exit 3";
        // 0-2, the key as 3 and ls's own listing (4): nothing else, not
        // even a descriptor of ours left open across exec (as a C library
        // might leave one) nor what cargo gave this test process.
        let leaked = rustix::io::dup(std::io::stdout().as_fd()).unwrap();
        assert!(rustix::io::fcntl_getfd(&leaked).unwrap().is_empty());
        let want: std::collections::BTreeSet<i32> = (0..=4).collect();
        let want = &want;
        let _keep = &leaked;
        std::thread::scope(|scope| {
            for t in 0..8 {
                scope.spawn(move || {
                    for i in 0..10 {
                        let key = format!("key-{t}-{i}");
                        let mut fds = Fds::new();
                        fds.secret("k0", key.as_bytes());
                        let out = run("sh", &args(&["-c", script]), &fds).unwrap();
                        let text = String::from_utf8(out.stdout).unwrap();
                        let lines: Vec<&str> = text.lines().collect();
                        let got: std::collections::BTreeSet<i32> = lines[0]
                            .split_whitespace()
                            .map(|n| n.parse().unwrap())
                            .collect();
                        assert_eq!(&got, want, "{text}");
                        assert_eq!(lines[1], "/dev/null");
                        assert_eq!(lines[2], key, "each child reads its own key");
                        assert_eq!(String::from_utf8_lossy(&out.stderr), "said\n");
                        assert_eq!(out.status.code(), Some(3));
                    }
                });
            }
        });
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_naming_it_and_big_output_is_read() {
        let e = run("no-such-tool-here", &[], &Fds::new()).unwrap_err();
        assert!(e.to_string().contains("no-such-tool-here"), "{e}");
        // Both pipes far beyond their buffers, stderr first: a reader of
        // stdout alone until its end would wait forever.
        let script = "head -c 300000 /dev/zero >&2; head -c 300000 /dev/zero";
        let out = run("sh", &args(&["-c", script]), &Fds::new()).unwrap();
        assert_eq!((out.stdout.len(), out.stderr.len()), (300_000, 300_000));
        assert!(out.status.success());
    }
}
