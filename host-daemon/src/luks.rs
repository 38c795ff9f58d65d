//! LUKS keyslot work on volume files with qemu-img and qemu-io, keys passed
//! on inherited pipes (`/dev/fd/3`, `/dev/fd/4`): never in argv, the
//! environment or a file.

#![allow(unsafe_code)] // pre_exec with dup2, with a SAFETY comment

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::hypervisor::{Format, HvError};

/// Runs `program args`, giving it `secrets[i]` on fd 3 + i.
fn run_with_secrets(
    program: &str,
    args: &[String],
    secrets: &[&[u8]],
) -> Result<std::process::Output, HvError> {
    let mut readers = vec![];
    for s in secrets {
        let (r, mut w) = std::io::pipe().map_err(|e| HvError(format!("pipe: {e}")))?;
        // A key is far below the pipe buffer (64 KiB): this never blocks.
        w.write_all(s).map_err(|e| HvError(format!("pipe: {e}")))?;
        drop(w);
        readers.push(r);
    }
    // Copies at fd 10 or above: never one of the targets 3.., so dup2 below
    // always makes a new descriptor (dup2 of a descriptor onto itself would
    // keep its close-on-exec flag, and the child would not get it), and no
    // target overwrites a source not yet copied.
    let mut high = Vec::with_capacity(readers.len());
    for r in &readers {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open descriptor returns a new
        // descriptor that nothing else owns; OwnedFd takes it over.
        let fd = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if fd < 0 {
            return Err(HvError(format!(
                "fcntl: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: see above: `fd` is new and owned by no one else.
        high.push(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    drop(readers);
    let fds: Vec<i32> = high.iter().map(|r| r.as_raw_fd()).collect();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec we only call dup2, which is
    // async-signal-safe, on descriptors that are open in the parent. dup2
    // clears FD_CLOEXEC on the new descriptor, so the child inherits exactly
    // fds 3.. and nothing else of ours.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().map_err(|e| {
        HvError(format!(
            "cannot run {program}: {e} (is qemu-utils installed?)"
        ))
    })?;
    drop(high);
    Ok(out)
}

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
pub const CALIBRATION_TRIES: u32 = 30;

/// qemu-img with `secrets`, tried again (up to [`CALIBRATION_TRIES`]) when
/// its PBKDF calibration fails.
fn qemu_img(args: &[String], secrets: &[&[u8]]) -> Result<std::process::Output, HvError> {
    let mut tries = 0;
    loop {
        let out = run_with_secrets("qemu-img", args, secrets)?;
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

fn image_opts(format: Format, path: &str, secret_id: &str) -> String {
    let path = path.replace(',', ",,");
    match format {
        Format::Qcow2 => {
            format!("driver=qcow2,file.filename={path},encrypt.key-secret={secret_id}")
        }
        Format::Raw => format!("driver=luks,file.filename={path},key-secret={secret_id}"),
    }
}

fn opt(format: Format, o: &str) -> String {
    match format {
        Format::Qcow2 => o
            .split(',')
            .map(|p| format!("encrypt.{p}"))
            .collect::<Vec<_>>()
            .join(","),
        Format::Raw => o.to_owned(),
    }
}

/// `--object secret` arguments for `n` keys on fds 3, 4, ... (ids k0, k1).
fn secrets_args(n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| {
            [
                "--object".to_owned(),
                format!("secret,id=k{i},file=/dev/fd/{},format=raw", 3 + i),
            ]
        })
        .collect()
}

/// Whether `key` unlocks the image (a real read, not `qemu-img info`).
pub fn opens_with(path: &str, format: Format, key: &[u8]) -> Result<bool, HvError> {
    let args: Vec<String> = vec![
        "-r".into(),
        "-U".into(),
        "--object".into(),
        "secret,id=k0,file=/dev/fd/3,format=raw".into(),
        "--image-opts".into(),
        image_opts(format, path, "k0"),
        "-c".into(),
        "read 0 512".into(),
    ];
    let out = run_with_secrets("qemu-io", &args, &[key])?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.contains("read 512/512") {
        return Ok(true);
    }
    if text.contains("Invalid password") {
        return Ok(false);
    }
    Err(HvError(format!(
        "qemu-io cannot read {path}: {}",
        text.trim()
    )))
}

/// Shallow rekey: adds a keyslot for `new` (unlocked with `old`), checks
/// that `new` opens the image, then erases the keyslots of `old`.
pub fn replace_passphrase(
    path: &str,
    format: Format,
    old: &[u8],
    new: &[u8],
) -> Result<(), HvError> {
    let amend = |unlock: &str, options: String| -> Result<(), HvError> {
        let mut args = vec!["amend".to_owned()];
        args.extend(secrets_args(2));
        args.extend([
            "--image-opts".to_owned(),
            image_opts(format, path, unlock),
            "-o".to_owned(),
            options,
        ]);
        let out = qemu_img(&args, &[old, new])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HvError(format!(
                "qemu-img amend of {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    amend("k0", opt(format, "state=active,new-secret=k1,iter-time=1"))?;
    if !opens_with(path, format, new)? {
        return Err(HvError(format!(
            "the new keyslot of {path} does not open it"
        )));
    }
    amend("k1", opt(format, "state=inactive,old-secret=k0"))?;
    if opens_with(path, format, old)? {
        return Err(HvError(format!(
            "the old key still opens {path} after its keyslot was erased"
        )));
    }
    Ok(())
}

/// How an image is read or written: its container, and the secret object
/// (`k0` on fd 3, `k1` on fd 4) of its key when it is encrypted.
#[derive(Clone, Copy)]
struct Codec {
    format: Format,
    key: Option<&'static str>,
}

impl Codec {
    fn clear(format: Format) -> Self {
        Self { format, key: None }
    }

    /// Encrypted, its key in secret object `key` (k0 or k1).
    fn keyed(format: Format, key: &'static str) -> Self {
        Self {
            format,
            key: Some(key),
        }
    }

    /// `--image-opts` to open `path` this way.
    fn open_opts(self, path: &str) -> String {
        match self.key {
            Some(k) => image_opts(self.format, path, k),
            None => {
                let path = path.replace(',', ",,");
                match self.format {
                    Format::Qcow2 => format!("driver=qcow2,file.filename={path}"),
                    Format::Raw => format!("driver=raw,file.filename={path}"),
                }
            }
        }
    }

    /// `-O FORMAT` and `-o OPTIONS` to create an image this way.
    fn create_args(self) -> Vec<String> {
        let (fmt, opts) = match (self.format, self.key) {
            (Format::Qcow2, Some(k)) => (
                "qcow2",
                Some(format!(
                    "encrypt.format=luks,encrypt.key-secret={k},encrypt.iter-time=1"
                )),
            ),
            (Format::Raw, Some(k)) => ("luks", Some(format!("key-secret={k},iter-time=1"))),
            (Format::Qcow2, None) => ("qcow2", None),
            (Format::Raw, None) => ("raw", None),
        };
        let mut v = vec!["-O".to_owned(), fmt.to_owned()];
        if let Some(o) = opts {
            v.extend(["-o".to_owned(), o]);
        }
        v
    }
}

/// Copies the data of `path` (read as `from`) into a new image `PATH.gk-rekey`
/// (written as `to`), proves the copy identical by reading both images
/// completely (`qemu-img compare`, with their keys), swaps it in with a
/// rename, then overwrites the old image's blocks before letting them go.
/// A leftover copy from a crash before the swap is discarded and made
/// again; the old image stays intact until the swap.
fn copy_verify_swap(
    path: &str,
    phase: &'static str,
    from: Codec,
    to: Codec,
    keys: &[&[u8]],
    bandwidth: u64,
) -> Result<(), HvError> {
    // qemu-img tells no progress: the phase only.
    let shown = crate::progress::Tracker::start(path, phase, 0);
    let tmp = format!("{path}.gk-rekey");
    let _ = std::fs::remove_file(&tmp);
    let mut args = vec!["convert".to_owned()];
    args.extend(secrets_args(keys.len()));
    // 16 requests in flight, written out of order: qemu-img's fastest mode.
    args.extend(["-m".into(), "16".into(), "-W".into()]);
    if bandwidth > 0 {
        args.extend(["-r".into(), bandwidth.to_string()]);
    }
    args.extend(["--image-opts".into(), from.open_opts(path)]);
    args.extend(to.create_args());
    args.push(tmp.clone());
    let out = qemu_img(&args, keys)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(HvError(format!(
            "qemu-img convert of {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut args = vec!["compare".to_owned()];
    args.extend(secrets_args(keys.len()));
    args.extend([
        "--image-opts".into(),
        from.open_opts(path),
        to.open_opts(&tmp),
    ]);
    shown.phase("checking the copy (qemu-img compare)", 0);
    let out = run_with_secrets("qemu-img", &args, keys)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(HvError(format!(
            "the converted copy of {path} differs: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    drop(shown);
    swap_and_wipe(&tmp, path)
}

/// Deep rekey, offline: the data copied into a new image under the new key
/// (so a new data key), checked, swapped in, the old image wiped (its LUKS
/// header held the old data key); see [`copy_verify_swap`].
/// At most `bandwidth` bytes/s written (0: no limit).
pub fn deep_rekey(
    path: &str,
    format: Format,
    old: &[u8],
    new: &[u8],
    bandwidth: u64,
) -> Result<(), HvError> {
    // guestkeyd's own re-encryption (crate::reencrypt) when it knows the
    // image's layout, qemu-img otherwise.
    match crate::reencrypt::deep_rekey_copy(path, format, old, new, bandwidth)? {
        Ok(tmp) => {
            let t = std::time::Instant::now();
            swap_and_wipe(&tmp, path)?;
            tracing::debug!(%path, wipe_ms = t.elapsed().as_millis() as u64, "swapped in, old image wiped");
        }
        Err(why) => {
            tracing::info!(%path, reason = %why.0, "deep rekey through qemu-img convert");
            copy_verify_swap(
                path,
                "re-encrypting (qemu-img)",
                Codec::keyed(format, "k0"),
                Codec::keyed(format, "k1"),
                &[old, new],
                bandwidth,
            )?;
        }
    }
    if !opens_with(path, format, new)? {
        return Err(HvError(format!(
            "the re-encrypted {path} does not open with the new key"
        )));
    }
    Ok(())
}

/// Encrypts the cleartext image at `path` under `key`, offline: a LUKS copy
/// (qcow2 with LUKS inside, or raw LUKS), checked, swapped in, and the
/// cleartext blocks overwritten.
pub fn encrypt_offline(path: &str, format: Format, key: &[u8]) -> Result<(), HvError> {
    copy_verify_swap(
        path,
        "encrypting",
        Codec::clear(format),
        Codec::keyed(format, "k0"),
        &[key],
        0,
    )?;
    if !opens_with(path, format, key)? {
        return Err(HvError(format!(
            "the encrypted {path} does not open with its key"
        )));
    }
    Ok(())
}

/// Decrypts the LUKS image at `path` (qcow2 with LUKS inside, or raw LUKS)
/// into a cleartext image of the same container, offline.
pub fn decrypt_offline(path: &str, format: Format, key: &[u8]) -> Result<(), HvError> {
    copy_verify_swap(
        path,
        "decrypting",
        Codec::keyed(format, "k0"),
        Codec::clear(format),
        &[key],
        0,
    )
}

/// Whether QEMU reads the same data from `a` (key `ka`) and `b` (key `kb`)
/// at eight sample ranges spread over the first `size` bytes.
pub fn samples_agree(
    a: &str,
    ka: &[u8],
    b: &str,
    kb: &[u8],
    format: Format,
    size: u64,
) -> Result<bool, HvError> {
    const LEN: u64 = 16 << 10;
    let mut cmds = vec![];
    for i in 0..8u64 {
        let at = (size / 8 * i) / LEN * LEN;
        let len = LEN.min(size - at);
        if len == 0 {
            continue;
        }
        cmds.push(format!("read -v {at} {len}"));
    }
    let dump = |path: &str, key: &[u8]| -> Result<Vec<String>, HvError> {
        let mut args: Vec<String> = vec![
            "-r".into(),
            "-U".into(),
            "--object".into(),
            "secret,id=k0,file=/dev/fd/3,format=raw".into(),
            "--image-opts".into(),
            image_opts(format, path, "k0"),
        ];
        for c in &cmds {
            args.extend(["-c".to_owned(), c.clone()]);
        }
        let out = run_with_secrets("qemu-io", &args, &[key])?;
        if !out.status.success() {
            return Err(HvError(format!(
                "qemu-io cannot read {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // The hex dump lines only (not the timings).
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.len() > 9 && l.as_bytes()[8] == b':')
            .map(str::to_owned)
            .collect())
    };
    let (x, y) = (dump(a, ka)?, dump(b, kb)?);
    Ok(!x.is_empty() && x == y)
}

/// What `qemu-img info` says about a cleartext candidate for encryption.
pub struct ImageInfo {
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Already encrypted (qcow2 encryption, or a LUKS header in a raw file).
    pub encrypted: bool,
    /// It has a backing file (guestkey encrypts self-contained images only).
    pub backing: bool,
}

/// Reads `path` as `format` (no format probing) and tells whether it is
/// encrypted or has a backing file.
pub fn image_info(path: &str, format: Format) -> Result<ImageInfo, HvError> {
    let fmt = match format {
        Format::Qcow2 => "qcow2",
        Format::Raw => "raw",
    };
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", fmt, path])
        .output()
        .map_err(|e| HvError(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(HvError(format!(
            "{path} is not a {fmt} image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| HvError(format!("qemu-img info of {path}: {e}")))?;
    let mut magic = [0u8; 6];
    let read = std::fs::File::open(path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut magic, 0)
        })
        .is_ok();
    if format == Format::Raw && read && magic[..4] == *b"QFI\xfb" {
        return Err(HvError(format!(
            "{path} is a qcow2 image, not raw: use --format qcow2"
        )));
    }
    let raw_luks = format == Format::Raw && read && magic == *b"LUKS\xba\xbe";
    Ok(ImageInfo {
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
        encrypted: v["encrypted"].as_bool().unwrap_or(false) || raw_luks,
        backing: v.get("backing-filename").is_some(),
    })
}

/// Overwrites `len` bytes of an (unlinked) file with zeros and syncs.
fn wipe(f: &std::fs::File, len: u64, shown: &crate::progress::Tracker) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = zeros.len().min((len - at) as usize);
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
        shown.set(at, len);
    }
    f.sync_all()
}

/// The virtual size of an image (no key needed).
pub fn virtual_size(path: &str) -> Result<u64, HvError> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", path])
        .output()
        .map_err(|e| HvError(format!("cannot run qemu-img: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\"virtual-size\":")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            HvError(format!(
                "cannot read the size of {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })
}

/// Creates an empty LUKS image of `size` bytes under `key` (1 ms of key
/// stretching: the key is random).
pub fn create_image(path: &str, format: Format, size: u64, key: &[u8]) -> Result<(), HvError> {
    let (fmt, opts) = match format {
        Format::Qcow2 => (
            "qcow2",
            "encrypt.format=luks,encrypt.key-secret=k0,encrypt.iter-time=1",
        ),
        Format::Raw => ("luks", "key-secret=k0,iter-time=1"),
    };
    let args: Vec<String> = [
        "create",
        "-q",
        "-f",
        fmt,
        "--object",
        "secret,id=k0,file=/dev/fd/3,format=raw",
        "-o",
        opts,
        path,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(std::iter::once(size.to_string()))
    .collect();
    let out = qemu_img(&args, &[key])?;
    if out.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(path);
        Err(HvError(format!(
            "qemu-img could not create {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Gives `to` the owner, group and mode of `from`: a re-encrypted image must
/// be usable by whoever QEMU runs as, exactly like the image it replaces.
pub fn copy_ownership(from: &str, to: &str) -> Result<(), HvError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(from).map_err(|e| HvError(format!("{from}: {e}")))?;
    set_ownership(to, m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Gives a new volume `path` the owner and group of its pool directory
/// `dir`, and mode 0660 if the directory is group-writable (storage shared
/// by several users, e.g. between hosts), 0600 otherwise.
pub fn adopt_directory_ownership(dir: &std::path::Path, path: &str) -> Result<(), HvError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).map_err(|e| HvError(format!("{}: {e}", dir.display())))?;
    let mode = if m.mode() & 0o020 != 0 { 0o660 } else { 0o600 };
    set_ownership(path, m.uid(), m.gid(), mode)
}

fn set_ownership(path: &str, uid: u32, gid: u32, mode: u32) -> Result<(), HvError> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| HvError(format!("cannot set the owner and mode of {path}: {e}")))
}

/// Renames `new` over `path`, then overwrites the old image's blocks.
pub fn swap_and_wipe(new: &str, path: &str) -> Result<(), HvError> {
    let old_file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| HvError(format!("{path}: {e}")))?;
    let len = old_file
        .metadata()
        .map_err(|e| HvError(format!("{path}: {e}")))?
        .len();
    copy_ownership(path, new)?;
    std::fs::File::open(new)
        .and_then(|f| f.sync_all())
        .map_err(|e| HvError(format!("{new}: {e}")))?;
    std::fs::rename(new, path).map_err(|e| HvError(format!("cannot swap in {new}: {e}")))?;
    if let Some(dir) = std::path::Path::new(path).parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    let shown = crate::progress::Tracker::start(path, "wiping the old image", len);
    wipe(&old_file, len, &shown)
        .map_err(|e| HvError(format!("wipe of the old image of {path}: {e}")))
}
