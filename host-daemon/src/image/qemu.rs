//! [`QemuImages`]: the image operations with qemu-img and qemu-io.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::fs::{SafeDir, file_id, set_owner};
use super::run::{Fds, args, qemu_img, run, said};
use super::{ImageError, ImageInfo, Images, image_opts};
use crate::model::Format;

/// The real images: qemu-img and qemu-io, and guestkeyd's own LUKS1
/// re-encryption for offline deep rekeys.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuImages;

/// Whether `key` opens the image open as `f` (qemu-io reads sector 0).
pub(super) fn opens_fd(
    f: &File,
    format: Format,
    key: &[u8],
    shown: &str,
) -> Result<bool, ImageError> {
    let mut fds = Fds::new();
    let secret = fds.secret("k0", key);
    let file = fds.file(f);
    let a = vec![
        "-r".into(),
        "-U".into(),
        "--object".into(),
        secret,
        "--image-opts".into(),
        image_opts(format, &file, Some("k0")),
        "-c".into(),
        "read 0 512".into(),
    ];
    let out = run("qemu-io", &a, &fds)?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.contains("read 512/512") {
        return Ok(true);
    }
    if text.contains("Invalid password") {
        return Ok(false);
    }
    Err(ImageError::Tool {
        tool: "qemu-io",
        action: "read",
        path: shown.to_owned(),
        said: said(&out),
    })
}

/// Whether QEMU reads the same data from `a` (key `ka`) and `b` (key `kb`)
/// at eight sample ranges spread over the first `size` bytes.
pub(super) fn samples_agree(
    a: (&File, &[u8]),
    b: (&File, &[u8]),
    format: Format,
    size: u64,
    shown: &str,
) -> Result<bool, ImageError> {
    const LEN: u64 = 16 << 10;
    let mut cmds = vec![];
    for i in 0..8u64 {
        let at = (size / 8 * i) / LEN * LEN;
        let len = LEN.min(size - at);
        if len > 0 {
            cmds.push(format!("read -v {at} {len}"));
        }
    }
    let dump = |f: &File, key: &[u8]| -> Result<Vec<String>, ImageError> {
        let mut fds = Fds::new();
        let secret = fds.secret("k0", key);
        let file = fds.file(f);
        let mut a = vec![
            "-r".into(),
            "-U".into(),
            "--object".into(),
            secret,
            "--image-opts".into(),
            image_opts(format, &file, Some("k0")),
        ];
        for c in &cmds {
            a.extend(["-c".to_owned(), c.clone()]);
        }
        let out = run("qemu-io", &a, &fds)?;
        if !out.status.success() {
            return Err(ImageError::Tool {
                tool: "qemu-io",
                action: "sample reads",
                path: shown.to_owned(),
                said: said(&out),
            });
        }
        // The hex dump lines only (not the timings).
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.len() > 9 && l.as_bytes()[8] == b':')
            .map(str::to_owned)
            .collect())
    };
    // Both at once: two QEMU processes, one per core.
    let (x, y) = std::thread::scope(|sc| {
        let other = sc.spawn(|| dump(b.0, b.1));
        let x = dump(a.0, a.1);
        (x, other.join())
    });
    let y = y.map_err(|_| ImageError::Check("a sample read thread panicked".into()))?;
    let (x, y) = (x?, y?);
    Ok(!x.is_empty() && x == y)
}

/// How long a `qemu-img info` may take.
const INFO_TIMEOUT: &str = "60s";

/// `qemu-img info` of the image open as `f`, read as `format` if given.
fn info_json(
    f: &File,
    format: Option<Format>,
    shown: &str,
) -> Result<serde_json::Value, ImageError> {
    let mut fds = Fds::new();
    let file = fds.file(f);
    // `qemu-img info` reads headers only: under coreutils' timeout, so that
    // an image that makes it hang (a stuck NFS file, a crafted header)
    // cannot hold this host's work.
    let mut a = args(&[
        "--kill-after=5",
        INFO_TIMEOUT,
        "qemu-img",
        "info",
        "-U",
        "--output=json",
    ]);
    if let Some(fmt) = format {
        a.extend(["-f".to_owned(), fmt.as_str().to_owned()]);
    }
    a.push(file);
    let out = run("timeout", &a, &fds)?;
    if out.status.code() == Some(124) || out.status.code() == Some(137) {
        return Err(ImageError::Tool {
            tool: "qemu-img",
            action: "info",
            path: shown.to_owned(),
            said: format!("gave no answer within {INFO_TIMEOUT}"),
        });
    }
    if !out.status.success() {
        return Err(match format {
            Some(fmt) => ImageError::Unsuitable(format!(
                "{shown} is not a {} image: {}",
                fmt.as_str(),
                said(&out)
            )),
            None => ImageError::Tool {
                tool: "qemu-img",
                action: "info",
                path: shown.to_owned(),
                said: said(&out),
            },
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| ImageError::Tool {
        tool: "qemu-img",
        action: "info",
        path: shown.to_owned(),
        said: e.to_string(),
    })
}

/// Creates an empty LUKS image in the open, empty file `f`: the header
/// written by guestkeyd ([`super::luks1::create`], no key stretching to
/// calibrate), then opened by QEMU with `key` as proof.
pub(super) fn create_in(
    f: &File,
    format: Format,
    size: u64,
    key: &[u8],
    shown: &str,
) -> Result<(), ImageError> {
    let t0 = std::time::Instant::now();
    super::luks1::create::write_new(f, format, size, key, shown)?;
    let t_header = t0.elapsed();
    let opens = opens_fd(f, format, key, shown)?;
    tracing::debug!(
        header_ms = t_header.as_secs_f64() * 1e3,
        check_ms = (t0.elapsed() - t_header).as_secs_f64() * 1e3,
        "image made"
    );
    if opens {
        Ok(())
    } else {
        Err(ImageError::Check(format!(
            "QEMU does not open the new image {shown} with its key"
        )))
    }
}

/// The virtual size of the image open as `f`.
pub(super) fn virtual_size_fd(f: &File, shown: &str) -> Result<u64, ImageError> {
    info_json(f, None, shown)?["virtual-size"]
        .as_u64()
        .ok_or_else(|| ImageError::Tool {
            tool: "qemu-img",
            action: "info",
            path: shown.to_owned(),
            said: "no virtual-size".into(),
        })
}

/// The last steps of a new image `name` (open as `f`, file `id`) in
/// `dir`: QEMU (whichever user it runs as) opens it like the pool's other
/// volumes, and its data and its name are on disk.
fn settle_in(
    dir: &SafeDir,
    name: &str,
    f: &File,
    id: super::fs::FileId,
    path: &str,
) -> Result<(), ImageError> {
    let (uid, gid) = dir.owner();
    let mode = if dir.group_writable() { 0o660 } else { 0o600 };
    set_owner(f, uid, gid, mode, path)?;
    let t0 = std::time::Instant::now();
    f.sync_all().map_err(|source| ImageError::Io {
        what: "sync",
        path: path.to_owned(),
        source,
    })?;
    if !dir.is(name, id)? {
        return Err(super::fs::FsError::Replaced(path.to_owned()).into());
    }
    dir.sync()?;
    tracing::debug!(sync_ms = t0.elapsed().as_secs_f64() * 1e3, "image synced");
    Ok(())
}

impl Images for QemuImages {
    fn create(&self, path: &str, format: Format, size: u64, key: &[u8]) -> Result<(), ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        if dir.exists(&name)? {
            return Err(ImageError::Unsuitable(format!(
                "{path} already exists: pick another volume name, or remove the file"
            )));
        }
        let f = dir.create_new(&name, 0o600)?;
        let id = file_id(&f)?;
        let made = create_in(&f, format, size, key, path)
            .and_then(|()| settle_in(&dir, &name, &f, id, path));
        if made.is_err() && dir.is(&name, id).unwrap_or(false) {
            let _ = dir.remove(&name);
        }
        made
    }

    fn settle(&self, path: &str) -> Result<(), ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, false)?;
        let id = file_id(&f)?;
        settle_in(&dir, &name, &f, id, path)
    }

    fn opens_with(&self, path: &str, format: Format, key: &[u8]) -> Result<bool, ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, false)?;
        opens_fd(&f, format, key, path)
    }

    fn info(&self, path: &str, format: Format) -> Result<ImageInfo, ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, false)?;
        let v = info_json(&f, Some(format), path)?;
        let mut magic = [0u8; 6];
        let read = f.read_exact_at(&mut magic, 0).is_ok();
        if format == Format::Raw && read && magic[..4] == *b"QFI\xfb" {
            return Err(ImageError::Unsuitable(format!(
                "{path} is a qcow2 image, not raw: use --format qcow2"
            )));
        }
        let raw_luks = format == Format::Raw && read && magic == *b"LUKS\xba\xbe";
        // An external data file is another file the image's data lives
        // in, like a backing file: reading the image reads it.
        let data_file = v["format-specific"]["data"].get("data-file").is_some();
        Ok(ImageInfo {
            virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
            encrypted: v["encrypted"].as_bool().unwrap_or(false) || raw_luks,
            backing: v.get("backing-filename").is_some() || data_file,
        })
    }

    fn backing_path(&self, path: &str, format: Format) -> Result<Option<String>, ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, false)?;
        let v = info_json(&f, Some(format), path)?;
        let named = v
            .get("full-backing-filename")
            .or_else(|| v.get("backing-filename"))
            .and_then(|b| b.as_str());
        Ok(named.map(|b| {
            if b.starts_with('/') {
                b.to_owned()
            } else {
                // Relative to the image's directory.
                std::path::Path::new(path).parent().map_or_else(
                    || b.to_owned(),
                    |d| d.join(b).to_string_lossy().into_owned(),
                )
            }
        }))
    }

    fn virtual_size(&self, path: &str) -> Result<u64, ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, false)?;
        virtual_size_fd(&f, path)
    }

    fn header_key(
        &self,
        path: &str,
        format: Format,
        key: &[u8],
    ) -> Result<super::luks1::recovery::HeaderKey, ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, false)?;
        super::luks1::recovery::header_key(&f, format, key, path)
    }

    fn replace_passphrase(
        &self,
        path: &str,
        format: Format,
        old: &[u8],
        new: &[u8],
    ) -> Result<(), ImageError> {
        let (dir, name) = SafeDir::of_file(path)?;
        let f = dir.open_file(&name, true)?;
        // guestkeyd's own keyslot writes where it knows the header (no key
        // stretching to calibrate), qemu-img amend otherwise. QEMU proves
        // each step either way.
        let native = super::luks1::keyslots::add_passphrase(&f, format, old, new, path)?;
        if let Err(why) = &native {
            tracing::info!(%path, reason = %why.0, "shallow rekey through qemu-img amend");
        }
        let amend = |unlock: &str, options: &str| -> Result<(), ImageError> {
            let mut fds = Fds::new();
            let k0 = fds.secret("k0", old);
            let k1 = fds.secret("k1", new);
            let file = fds.file(&f);
            let opts = match format {
                Format::Qcow2 => options
                    .split(',')
                    .map(|p| format!("encrypt.{p}"))
                    .collect::<Vec<_>>()
                    .join(","),
                Format::Raw => options.to_owned(),
            };
            let a = vec![
                "amend".into(),
                "--object".into(),
                k0,
                "--object".into(),
                k1,
                "--image-opts".into(),
                image_opts(format, &file, Some(unlock)),
                "-o".into(),
                opts,
            ];
            let out = qemu_img(&a, &fds)?;
            if out.status.success() {
                Ok(())
            } else {
                Err(ImageError::Tool {
                    tool: "qemu-img",
                    action: "amend",
                    path: path.to_owned(),
                    said: said(&out),
                })
            }
        };
        if native.is_err() {
            amend("k0", "state=active,new-secret=k1,iter-time=1")?;
        }
        if !opens_fd(&f, format, new, path)? {
            return Err(ImageError::Check(format!(
                "the new keyslot of {path} does not open it"
            )));
        }
        match native {
            Ok(()) => {
                if let Err(why) = super::luks1::keyslots::keep_only(&f, format, new, path)? {
                    return Err(ImageError::Check(format!(
                        "the old keyslots of {path} could not be erased: {}",
                        why.0
                    )));
                }
            }
            Err(_) => amend("k1", "state=inactive,old-secret=k0")?,
        }
        if opens_fd(&f, format, old, path)? {
            return Err(ImageError::Check(format!(
                "the old key still opens {path} after its keyslot was erased"
            )));
        }
        Ok(())
    }

    fn deep_rekey(
        &self,
        path: &str,
        format: Format,
        old: &[u8],
        new: &[u8],
        bandwidth: u64,
    ) -> Result<(), ImageError> {
        super::swap::deep_rekey(path, format, old, new, bandwidth)
    }

    fn encrypt(&self, path: &str, format: Format, key: &[u8]) -> Result<(), ImageError> {
        super::swap::encrypt(path, format, key)
    }

    fn decrypt(&self, path: &str, format: Format, key: &[u8]) -> Result<(), ImageError> {
        super::swap::decrypt(path, format, key)
    }

    fn new_copy(
        &self,
        path: &str,
        generation: u64,
        format: Format,
        size: u64,
        key: &[u8],
    ) -> Result<String, ImageError> {
        super::swap::new_copy(path, generation, format, size, key)
    }

    fn discard_copies(&self, path: &str) -> Result<(), ImageError> {
        super::swap::discard_copies(path)
    }

    fn swap_in_copy(&self, path: &str, generation: u64) -> Result<bool, ImageError> {
        super::swap::swap_in_copy(path, generation)
    }
}
