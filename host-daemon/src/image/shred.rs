//! What becomes of an image a copy replaced: crypto-shredded (its LUKS
//! header and keyslots overwritten) or overwritten in full.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{ImageError, luks1};
use crate::model::Format;
use crate::progress::Tracker;

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

/// Whether replaced encrypted images are overwritten completely rather
/// than crypto-shredded (guestkeyd's `--overwrite-old-images`).
static OVERWRITE_OLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, replaced encrypted images are overwritten in full (every
/// byte), not only their LUKS headers (set once, at start-up).
pub fn overwrite_old_images(yes: bool) {
    OVERWRITE_OLD.store(yes, std::sync::atomic::Ordering::Relaxed);
}

/// Wipes the replaced image `f` of `len` bytes and syncs; returns how.
///
/// A LUKS image (`encrypted`, raw or qcow2, with a LUKS1 header guestkeyd
/// can find) is crypto-shredded: its LUKS header and all keyslot material,
/// the only place its data key is stored, are overwritten with zeros; the
/// rest is ciphertext under a key that no longer exists anywhere (see
/// docs/threat-model.md, "Replaced images"). Anything else, a cleartext
/// image, or any image with `--overwrite-old-images`, is overwritten with
/// zeros from the first byte to the last.
pub(super) fn wipe(
    f: &File,
    len: u64,
    encrypted: bool,
    path: &str,
) -> Result<&'static str, ImageError> {
    let region = if encrypted && !OVERWRITE_OLD.load(std::sync::atomic::Ordering::Relaxed) {
        let mut magic = [0u8; 6];
        let format = match f.read_exact_at(&mut magic, 0) {
            Ok(()) if magic[..4] == *b"QFI\xfb" => Some(Format::Qcow2),
            Ok(()) if magic == *b"LUKS\xba\xbe" => Some(Format::Raw),
            _ => None,
        };
        match format {
            Some(format) => luks1::layout::luks_region(f, len, format, path)?.ok(),
            None => None,
        }
    } else {
        None
    };
    let (at, end, how) = match region {
        Some((at, n)) => (at, at + n, "LUKS header and keyslots"),
        None => (0, len, "every byte"),
    };
    let shown = Tracker::start(path, "wiping the old image", end - at);
    let zeros = vec![0u8; 1 << 20];
    let mut pos = at;
    while pos < end {
        let n = zeros.len().min((end - pos) as usize);
        f.write_all_at(&zeros[..n], pos)
            .map_err(io("wipe of the old image of", path))?;
        pos += n as u64;
        shown.set(pos - at, end - at);
    }
    f.sync_all().map_err(io("wipe of the old image of", path))?;
    Ok(how)
}
