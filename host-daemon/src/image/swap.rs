//! Copies that replace an image: offline deep rekeys, conversions, and the
//! target of an online copy.
//!
//! A copy is made in the pool directory's staging directory (root's, mode
//! 0711: nobody else can list, create, rename or remove anything there),
//! written through an open descriptor, proven (read back, opened by QEMU
//! with the right key only, sample reads compared), and then put in the
//! image's place in one step within the file system (see [`Swap`]). The
//! replaced image is held open from before, and its blocks are overwritten
//! through that descriptor before it is let go: whatever its name points to
//! by then, only the old image is wiped. A copy left by a crash before the
//! swap is discarded and made again; the image stays intact until the swap.

use std::fs::File;

use super::fs::{SafeDir, file_id, owner_of, set_owner};
use super::qemu::{create_in, opens_fd, samples_agree};
use super::run::{Fds, qemu_img, run, said};
use super::shred::wipe;
use super::{ImageError, image_opts, luks1};
use crate::model::{Format, copy_path, legacy_copy_path};
use crate::progress::Tracker;

/// The pool directory of `path`, its staging directory, and the name.
fn stage(path: &str) -> Result<(SafeDir, SafeDir, String), ImageError> {
    let (pool, name) = SafeDir::of_file(path)?;
    let staging = pool.staging()?;
    Ok((pool, staging, name))
}

/// The name of the offline copy of the image `name` in the staging
/// directory (libvirt never sees it).
fn offline_name(name: &str) -> String {
    format!("{name}.new")
}

/// The name of the online copy of `name` for key `generation` (see
/// [`copy_path`]).
fn online_name(name: &str, generation: u64) -> String {
    format!("{name}.g{generation}")
}

/// A new, empty copy file (any leftover removed first).
fn fresh_copy(staging: &SafeDir, name: &str) -> Result<File, ImageError> {
    staging.remove(name)?;
    Ok(staging.create_new(name, 0o600)?)
}

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

/// How a copy replaces the image.
#[derive(Clone, Copy)]
enum Swap {
    /// One exchange of the two names: the old image comes into the staging
    /// directory, where nobody else can touch it, and only if it is the very
    /// file that was copied is it wiped and removed; anything else (the image
    /// moved away and a link put there at that instant) goes back where it
    /// was, untouched, and the swap is refused. A writer of the pool can then
    /// never have the copy put where it just removed something. Offline
    /// copies: after a crash, a leftover in the staging directory is always
    /// discarded, whichever file it is. Holds the identity of the image that
    /// was copied.
    Exchange(super::fs::FileId),
    /// A rename over the image (the online copy a guest already runs on: its
    /// leftover in the staging directory is taken for the copy after a
    /// crash, so it must never hold the old image).
    Rename,
}

/// Moves the copy `name` of `staging` over `name` of `pool` and wipes the
/// image it replaces (`encrypted`: it is a LUKS image, whose keys alone may
/// be destroyed, see [`wipe`]).
fn swap(
    pool: &SafeDir,
    staging: &SafeDir,
    (copy_name, name): (&str, &str),
    copy: &File,
    path: &str,
    how: Swap,
    encrypted: bool,
) -> Result<File, ImageError> {
    let old = pool.open_file(name, true)?;
    let len = old.metadata().map_err(io("inspect", path))?.len();
    // QEMU (whichever user it runs as) opens the copy like the original.
    let (uid, gid, mode) = owner_of(&old, path)?;
    let shown = staging.path().join(copy_name).display().to_string();
    set_owner(copy, uid, gid, mode, &shown)?;
    copy.sync_all().map_err(io("sync", &shown))?;
    let replaced = || ImageError::from(super::fs::FsError::Replaced(path.to_owned()));
    if let Swap::Exchange(copied) = how {
        if file_id(&old)? != copied {
            return Err(replaced());
        }
        staging.move_to(copy_name, pool, name, true)?;
        if !staging.is(copy_name, copied)? {
            staging.move_to(copy_name, pool, name, true)?;
            return Err(replaced());
        }
        pool.sync()?;
    } else {
        let id = file_id(copy)?;
        staging.move_to(copy_name, pool, name, false)?;
        pool.sync()?;
        if !pool.is(name, id)? {
            return Err(replaced());
        }
    }
    let t = std::time::Instant::now();
    let how_wiped = wipe(&old, len, encrypted, path)?;
    if matches!(how, Swap::Exchange(_)) {
        staging.remove(copy_name)?;
    }
    tracing::debug!(
        %path,
        wipe_ms = t.elapsed().as_millis() as u64,
        wiped = how_wiped,
        "swapped in, old image wiped"
    );
    Ok(old)
}

/// Closes the descriptors of a replaced image on a thread of its own: it
/// has no name any more, and closing its last descriptor makes the file
/// system free its blocks (a third of a second per GiB here), which nothing
/// needs to wait for.
fn close_later(old: Vec<File>) {
    std::thread::spawn(move || drop(old));
}

/// How an image is read or written: container, and whether encrypted.
#[derive(Clone, Copy)]
struct Codec {
    format: Format,
    keyed: bool,
}

/// The descriptors and arguments that give a tool `src` and `copy`:
/// `--object` arguments, then the `--image-opts` values of both.
struct Pair<'a> {
    fds: Fds<'a>,
    objects: Vec<String>,
    src_opts: String,
    copy_opts: String,
    copy_file: String,
}

impl<'a> Pair<'a> {
    /// `keys`: the source's key first (if `from` is keyed), then the copy's.
    fn new(src: &'a File, from: Codec, copy: &'a File, to: Codec, keys: &[&'a [u8]]) -> Self {
        const IDS: [&str; 2] = ["k0", "k1"];
        let mut fds = Fds::new();
        let mut objects = vec![];
        for (id, k) in IDS.iter().zip(keys) {
            objects.extend(["--object".to_owned(), fds.secret(id, k)]);
        }
        let src_id = from.keyed.then_some(IDS[0]);
        let copy_id = to.keyed.then_some(IDS[usize::from(from.keyed)]);
        let src_file = fds.file(src);
        let copy_file = fds.file(copy);
        Self {
            src_opts: image_opts(from.format, &src_file, src_id),
            copy_opts: image_opts(to.format, &copy_file, copy_id),
            copy_file,
            objects,
            fds,
        }
    }
}

/// Copies `src` (read as `from`) into `copy` (written as `to`) with
/// qemu-img convert, then proves them identical (qemu-img compare reads
/// both completely). `keys`: the source's key first (if keyed), then the
/// copy's.
#[allow(clippy::too_many_arguments)] // one call per conversion kind, all named
fn convert_verify(
    src: &File,
    from: Codec,
    copy: &File,
    to: Codec,
    keys: &[&[u8]],
    bandwidth: u64,
    phase: &'static str,
    path: &str,
) -> Result<(), ImageError> {
    // qemu-img tells no progress: the phase only.
    let shown = Tracker::start(path, phase, 0);
    let p = Pair::new(src, from, copy, to, keys);
    let mut a = vec!["convert".to_owned()];
    a.extend(p.objects.iter().cloned());
    // 16 requests in flight, written out of order: qemu-img's fastest mode.
    a.extend(["-m".into(), "16".into(), "-W".into()]);
    if bandwidth > 0 {
        a.extend(["-r".into(), bandwidth.to_string()]);
    }
    a.extend(["--image-opts".into(), p.src_opts.clone()]);
    let copy_key = if to.keyed {
        Some(if from.keyed { "k1" } else { "k0" })
    } else {
        None
    };
    match copy_key.and(keys.last()) {
        Some(key) => {
            // An encrypted copy gets guestkeyd's own header (no key
            // stretching to calibrate) and qemu-img writes into it.
            let size = super::qemu::virtual_size_fd(src, path)?;
            let shown = format!("the copy of {path}");
            luks1::create::write_new(copy, to.format, size, key, &shown)?;
            a.push("-n".into());
            if to.format == Format::Qcow2 {
                // No cluster is allocated yet: every one reads as zeros.
                a.push("--target-is-zero".into());
            }
            a.extend(["--target-image-opts".into(), p.copy_opts.clone()]);
        }
        None => {
            a.extend(["-O".into(), to.format.as_str().into()]);
            a.push(p.copy_file.clone());
        }
    }
    let out = qemu_img(&a, &p.fds)?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: "qemu-img",
            action: "convert",
            path: path.to_owned(),
            said: said(&out),
        });
    }
    shown.phase("checking the copy (qemu-img compare)", 0);
    let mut a = vec!["compare".to_owned()];
    a.extend(p.objects.iter().cloned());
    a.extend([
        "--image-opts".into(),
        p.src_opts.clone(),
        p.copy_opts.clone(),
    ]);
    let out = run("qemu-img", &a, &p.fds)?;
    if !out.status.success() {
        return Err(ImageError::Check(format!(
            "the converted copy of {path} differs: {}",
            said(&out)
        )));
    }
    Ok(())
}

/// Runs `work` on a fresh copy of `path`; swaps it in when `work` succeeds,
/// removes it when it fails. `encrypted`: the image replaced is a LUKS
/// image (see [`wipe`]).
fn with_copy(
    path: &str,
    encrypted: bool,
    work: impl FnOnce(&File, &File) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let (pool, staging, name) = stage(path)?;
    let src = pool.open_file(&name, false)?;
    let copy_name = offline_name(&name);
    let copy = fresh_copy(&staging, &copy_name)?;
    let done = work(&src, &copy).and_then(|()| {
        let how = Swap::Exchange(file_id(&src)?);
        swap(
            &pool,
            &staging,
            (&copy_name, &name),
            &copy,
            path,
            how,
            encrypted,
        )
    });
    match done {
        Ok(old) => {
            close_later(vec![old, src]);
            Ok(())
        }
        Err(e) => {
            let _ = staging.remove(&copy_name);
            Err(e)
        }
    }
}

pub(super) fn deep_rekey(
    path: &str,
    format: Format,
    old: &[u8],
    new: &[u8],
    bandwidth: u64,
) -> Result<(), ImageError> {
    with_copy(path, true, |src, copy| {
        // guestkeyd's own re-encryption when it knows the image's layout,
        // qemu-img otherwise.
        match luks1::reencrypt(src, copy, format, old, new, bandwidth, path)? {
            Ok(()) => {
                // QEMU opens the copy with the new passphrase only, and
                // reads the same data from both images.
                // The sample reads open the copy with the new key; at the
                // same time (one QEMU process per core) QEMU must refuse the
                // old key.
                let shown = format!("the re-encrypted copy of {path}");
                let size = luks1::layout::virtual_size(src, format, path)?;
                let (agree, old_opens) = std::thread::scope(|sc| {
                    let old_opens = sc.spawn(|| opens_fd(copy, format, old, &shown));
                    let agree = samples_agree((src, old), (copy, new), format, size, path);
                    (agree, old_opens.join())
                });
                let old_opens =
                    old_opens.map_err(|_| ImageError::Check("a check thread panicked".into()))?;
                if old_opens? {
                    return Err(ImageError::Check(format!(
                        "QEMU opens the re-encrypted copy of {path} with the old key"
                    )));
                }
                if !agree? {
                    return Err(ImageError::Check(format!(
                        "QEMU reads different data from the re-encrypted copy of {path}"
                    )));
                }
                Ok(())
            }
            Err(why) => {
                tracing::info!(%path, reason = %why.0, "deep rekey through qemu-img convert");
                let keyed = Codec {
                    format,
                    keyed: true,
                };
                convert_verify(
                    src,
                    keyed,
                    copy,
                    keyed,
                    &[old, new],
                    bandwidth,
                    "re-encrypting (qemu-img)",
                    path,
                )
            }
        }
    })?;
    if !super::Images::opens_with(&super::QemuImages, path, format, new)? {
        return Err(ImageError::Check(format!(
            "the re-encrypted {path} does not open with the new key"
        )));
    }
    Ok(())
}

pub(super) fn encrypt(path: &str, format: Format, key: &[u8]) -> Result<(), ImageError> {
    with_copy(path, false, |src, copy| {
        let (clear, keyed) = (
            Codec {
                format,
                keyed: false,
            },
            Codec {
                format,
                keyed: true,
            },
        );
        convert_verify(src, clear, copy, keyed, &[key], 0, "encrypting", path)
    })?;
    if !super::Images::opens_with(&super::QemuImages, path, format, key)? {
        return Err(ImageError::Check(format!(
            "the encrypted {path} does not open with its key"
        )));
    }
    Ok(())
}

pub(super) fn decrypt(path: &str, format: Format, key: &[u8]) -> Result<(), ImageError> {
    with_copy(path, true, |src, copy| {
        let (keyed, clear) = (
            Codec {
                format,
                keyed: true,
            },
            Codec {
                format,
                keyed: false,
            },
        );
        convert_verify(src, keyed, copy, clear, &[key], 0, "decrypting", path)
    })
}

pub(super) fn new_copy(
    path: &str,
    generation: u64,
    format: Format,
    size: u64,
    key: &[u8],
) -> Result<String, ImageError> {
    let (pool, staging, name) = stage(path)?;
    let img = pool.open_file(&name, false)?;
    let shown = copy_path(path, generation);
    let copy_name = online_name(&name, generation);
    let copy = fresh_copy(&staging, &copy_name)?;
    let made = create_in(&copy, format, size, key, &shown).and_then(|()| {
        let (uid, gid, mode) = owner_of(&img, path)?;
        set_owner(&copy, uid, gid, mode, &shown)?;
        copy.sync_all().map_err(io("sync", &shown))?;
        Ok(staging.sync()?)
    });
    if let Err(e) = made {
        let _ = staging.remove(&copy_name);
        return Err(e);
    }
    Ok(shown)
}

pub(super) fn discard_copies(path: &str) -> Result<(), ImageError> {
    let (pool, staging, name) = stage(path)?;
    for n in staging.names()? {
        let Some(rest) = n.strip_prefix(&format!("{name}.")) else {
            continue;
        };
        if rest == "new"
            || rest
                .strip_prefix('g')
                .is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
        {
            staging.remove(&n)?;
        }
    }
    // A copy an older guestkeyd left beside the image (a name is removed,
    // never followed).
    let legacy = legacy_copy_path(path);
    if let Some(legacy_name) = legacy.rsplit('/').next() {
        pool.remove(legacy_name)?;
    }
    Ok(())
}

pub(super) fn swap_in_copy(path: &str, generation: u64) -> Result<bool, ImageError> {
    let (pool, staging, name) = stage(path)?;
    let copy_name = online_name(&name, generation);
    if !staging.exists(&copy_name)? {
        return Ok(false);
    }
    let copy = staging.open_file(&copy_name, true)?;
    let old = swap(
        &pool,
        &staging,
        (&copy_name, &name),
        &copy,
        path,
        Swap::Rename,
        true,
    )?;
    close_later(vec![old]);
    Ok(true)
}

/// Copies the encrypted image `src` (`format`, opened with `key`) into the
/// empty file `dst` as a cleartext `to` image and checks the copy against
/// it (qemu-img compare); `src` is only read. For `guestkey-recover copy`.
pub fn copy_cleartext(
    src: &File,
    format: Format,
    key: &[u8],
    dst: &File,
    to: Format,
    shown: &str,
) -> Result<(), ImageError> {
    let from = Codec {
        format,
        keyed: true,
    };
    let to = Codec {
        format: to,
        keyed: false,
    };
    convert_verify(src, from, dst, to, &[key], 0, "copying", shown)
}
