//! Shallow rekeys of LUKS1 images in place, without qemu-img: a keyslot
//! for the new passphrase is added, and later every other keyslot is
//! disabled and its material overwritten. `qemu-img amend` does the same
//! two steps, but it measures the CPU to pick the key stretching first
//! (about half a second each time, and on a loaded machine it often fails);
//! the passphrases are random 256-bit keys, so the fixed minimum of 1,000
//! PBKDF2 iterations is used.
//!
//! Crash safety, as with `amend`: a keyslot's material is written and
//! synced before the keyslot is marked active in the header (and synced);
//! keyslots are disabled in the header (synced) before their material is
//! overwritten. So at every instant the old passphrase, the new one, or
//! both open the image. Adding is idempotent: if the new passphrase opens
//! the image already, nothing is written.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Unsupported;
use super::header::{HEADER_LEN, Luks1, add_keyslot, drop_keyslots_but};
use super::layout::{luks_region, read_at};
use crate::image::ImageError;
use crate::model::Format;

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

/// The LUKS region of the image open as `f`: where it is, its bytes, and
/// the parsed header.
type Region = (u64, Vec<u8>, Luks1);

fn region(f: &File, format: Format, path: &str) -> Result<Result<Region, Unsupported>, ImageError> {
    let len = f.metadata().map_err(io("inspect", path))?.len();
    let (at, n) = match luks_region(f, len, format, path)? {
        Ok(r) => r,
        Err(u) => return Ok(Err(u)),
    };
    let bytes = read_at(f, at, n as usize, path)?;
    Ok(Luks1::parse(&bytes).map(|l| (at, bytes, l)))
}

/// Writes `bytes` at `at` and syncs.
fn put(f: &File, at: u64, bytes: &[u8], path: &str) -> Result<(), ImageError> {
    f.write_all_at(bytes, at)
        .and_then(|()| f.sync_data())
        .map_err(io("write of the LUKS header of", path))
}

/// Adds a keyslot for `new` to the image open as `f`, unlocked with `old`.
/// `Ok(Err(_))`: not a header this module writes (nothing changed; the
/// caller uses `qemu-img amend`).
pub fn add_passphrase(
    f: &File,
    format: Format,
    old: &[u8],
    new: &[u8],
    path: &str,
) -> Result<Result<(), Unsupported>, ImageError> {
    let (at, bytes, luks) = match region(f, format, path)? {
        Ok(r) => r,
        Err(u) => return Ok(Err(u)),
    };
    if luks.unlock(&bytes, new).is_some() {
        return Ok(Ok(()));
    }
    let Some(mk) = luks.unlock(&bytes, old) else {
        return Err(ImageError::Check(format!(
            "the current key does not open {path}"
        )));
    };
    let (with_new, slot) = match add_keyslot(&bytes, &luks, &mk, new)? {
        Ok(h) => h,
        Err(u) => return Ok(Err(u)),
    };
    drop(mk);
    let (offset, len) = super::header::slot_material(&with_new, luks.key_bytes, slot)
        .map_err(|u| ImageError::Check(u.0))?;
    put(f, at + offset as u64, &with_new[offset..offset + len], path)?;
    put(f, at, &with_new[..HEADER_LEN], path)?;
    Ok(Ok(()))
}

/// Disables every keyslot of the image open as `f` that `keep` does not
/// open, and overwrites their material with random bytes.
pub fn keep_only(
    f: &File,
    format: Format,
    keep: &[u8],
    path: &str,
) -> Result<Result<(), Unsupported>, ImageError> {
    let (at, bytes, luks) = match region(f, format, path)? {
        Ok(r) => r,
        Err(u) => return Ok(Err(u)),
    };
    let Some((slot, _mk)) = luks.unlock_slot(&bytes, keep) else {
        return Err(ImageError::Check(format!(
            "the new key does not open {path}: its old keyslots are kept"
        )));
    };
    let (without, wiped) = match drop_keyslots_but(&bytes, &luks, slot)? {
        Ok(h) => h,
        Err(u) => return Ok(Err(u)),
    };
    put(f, at, &without[..HEADER_LEN], path)?;
    for (offset, len) in wiped {
        put(f, at + offset as u64, &without[offset..offset + len], path)?;
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        std::env::temp_dir().join(format!("gk-keyslots-{tag}-{}", hex::encode(b)))
    }

    /// QEMU's options to open `p` with secret `k0`.
    fn opts(format: Format, p: &std::path::Path) -> String {
        let file = p.display();
        match format {
            Format::Qcow2 => format!("driver=qcow2,file.filename={file},encrypt.key-secret=k0"),
            Format::Raw => format!("driver=luks,file.filename={file},key-secret=k0"),
        }
    }

    /// Whether QEMU opens `p` with `key` (and reads the pattern written
    /// with the first key).
    fn qemu_reads(format: Format, p: &std::path::Path, key: &str) -> bool {
        let opts = opts(format, p);
        let out = Command::new("qemu-io")
            .args(["--object", &format!("secret,id=k0,data={key},format=raw")])
            .args(["-r", "--image-opts", &opts, "-c", "read -P 0x3c 64k 4k"])
            .output()
            .expect("qemu-io (scripts/setup)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if text.contains("Invalid password") {
            return false;
        }
        assert!(
            out.status.success() && text.contains("read 4096/4096") && !text.contains("failed"),
            "{text}"
        );
        true
    }

    fn image(format: Format, key: &str) -> (std::path::PathBuf, File) {
        let p = tmp(format.as_str());
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        super::super::create::write_new(&f, format, 4 << 20, key.as_bytes(), "test").unwrap();
        let opts = opts(format, &p);
        let out = Command::new("qemu-io")
            .args(["--object", &format!("secret,id=k0,data={key},format=raw")])
            .args(["--image-opts", &opts, "-c", "write -P 0x3c 64k 4k"])
            .output()
            .unwrap();
        assert!(out.status.success());
        (p, f)
    }

    #[test]
    fn a_passphrase_is_replaced_in_place_in_both_formats() {
        for format in [Format::Raw, Format::Qcow2] {
            let (p, f) = image(format, "old-key");
            add_passphrase(&f, format, b"old-key", b"new-key", "test")
                .unwrap()
                .unwrap();
            assert!(qemu_reads(format, &p, "old-key"), "{format:?}: both open");
            assert!(qemu_reads(format, &p, "new-key"), "{format:?}: both open");
            // Again (a retry after a crash): nothing is added.
            let before = std::fs::read(&p).unwrap();
            add_passphrase(&f, format, b"old-key", b"new-key", "test")
                .unwrap()
                .unwrap();
            assert!(std::fs::read(&p).unwrap() == before, "idempotent");
            keep_only(&f, format, b"new-key", "test").unwrap().unwrap();
            assert!(
                !qemu_reads(format, &p, "old-key"),
                "{format:?}: old key gone"
            );
            assert!(qemu_reads(format, &p, "new-key"), "{format:?}: data kept");
            // And the next rekey uses the freed keyslot.
            add_passphrase(&f, format, b"new-key", b"third-key", "test")
                .unwrap()
                .unwrap();
            keep_only(&f, format, b"third-key", "test")
                .unwrap()
                .unwrap();
            assert!(!qemu_reads(format, &p, "new-key"));
            assert!(qemu_reads(format, &p, "third-key"));
            if format == Format::Raw {
                let out = Command::new("cryptsetup")
                    .arg("luksDump")
                    .arg(&p)
                    .output()
                    .unwrap();
                let dump = String::from_utf8_lossy(&out.stdout);
                assert_eq!(dump.matches("ENABLED").count(), 1, "{dump}");
            }
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_wrong_key_changes_nothing() {
        let (p, f) = image(Format::Qcow2, "old-key");
        let before = std::fs::read(&p).unwrap();
        let e = add_passphrase(&f, Format::Qcow2, b"not-the-key", b"new-key", "test").unwrap_err();
        assert!(
            e.to_string().contains("the current key does not open"),
            "{e}"
        );
        let e = keep_only(&f, Format::Qcow2, b"new-key", "test").unwrap_err();
        assert!(e.to_string().contains("the new key does not open"), "{e}");
        assert!(std::fs::read(&p).unwrap() == before, "nothing written");
        assert!(qemu_reads(Format::Qcow2, &p, "old-key"));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn other_headers_are_left_to_qemu_img() {
        let p = tmp("clear");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let f = File::open(&p).unwrap();
        assert!(
            add_passphrase(&f, Format::Raw, b"a", b"b", "test")
                .unwrap()
                .is_err()
        );
        std::fs::remove_file(p).unwrap();
    }
}
