//! What an escrow packet needs from a LUKS1 image, and what recovery does
//! with one: the data key behind a passphrase (for the packet), a new
//! passphrase added with the data key, and a damaged header rebuilt from
//! the data key in QEMU's layout.
//!
//! A rebuilt header is what [`super::header::fresh_header`] writes (the
//! layout of every image guestkeyd or QEMU creates: payload at sector
//! 4040) with the packet's data key, passphrase and header UUID. Headers of
//! another layout are declined with the reason; so is a header that still
//! parses (nothing is damaged, or it is another volume's), and an image
//! whose size is not the packet's.

use std::fs::File;
use std::os::unix::fs::FileExt;

use zeroize::Zeroizing;

use super::header::{
    HEADER_LEN, Luks1, add_keyslot, fresh_header, fresh_len, fresh_payload, set_uuid,
    slot_material, uuid_of,
};
use super::layout::{luks_region, read_at, virtual_size};
use super::xts::SECTOR;
use crate::image::ImageError;
use crate::model::Format;

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

fn len_of(f: &File, shown: &str) -> Result<u64, ImageError> {
    Ok(f.metadata().map_err(io("inspect", shown))?.len())
}

/// What an image's LUKS header holds behind a passphrase.
pub struct HeaderKey {
    /// The data key (aes-xts-plain64, 64 bytes).
    pub data_key: Zeroizing<Vec<u8>>,
    /// The header's UUID.
    pub uuid: String,
    /// Payload offset, in sectors.
    pub payload_sectors: u64,
    /// Where the LUKS region is in the file: (offset, length).
    pub region: (u64, u64),
    /// The size the guest sees.
    pub virtual_size: u64,
}

/// A LUKS region: where it is, its bytes, and the parsed header (or why it
/// does not parse).
type Region = (u64, Vec<u8>, Result<Luks1, String>);

/// The LUKS region of `f`.
fn region(f: &File, format: Format, shown: &str) -> Result<Region, ImageError> {
    let len = len_of(f, shown)?;
    let (at, n) = luks_region(f, len, format, shown)?
        .map_err(|u| ImageError::Unsuitable(format!("{shown}: {}", u.0)))?;
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= 64 << 20)
        .ok_or_else(|| ImageError::Unsuitable(format!("{shown}: a LUKS region over 64 MiB")))?;
    let bytes = read_at(f, at, n, shown)?;
    let parsed = Luks1::parse(&bytes).map_err(|u| u.0);
    Ok((at, bytes, parsed))
}

/// The data key that `passphrase` unlocks in the image `f`, and the facts
/// of its header a recovery checks against.
pub fn header_key(
    f: &File,
    format: Format,
    passphrase: &[u8],
    shown: &str,
) -> Result<HeaderKey, ImageError> {
    let (at, bytes, parsed) = region(f, format, shown)?;
    let luks = parsed.map_err(|why| {
        ImageError::Unsuitable(format!(
            "{shown}: its LUKS header cannot be read ({why}): an escrow packet needs a LUKS1 aes-xts-plain64 header"
        ))
    })?;
    let data_key = luks
        .unlock(&bytes, passphrase)
        .ok_or_else(|| ImageError::Check(format!("the volume's key does not open {shown}")))?;
    Ok(HeaderKey {
        data_key,
        uuid: uuid_of(&bytes),
        payload_sectors: luks.payload_sectors,
        region: (at, bytes.len() as u64),
        virtual_size: virtual_size(f, format, shown)?,
    })
}

/// Adds a keyslot for `new` to the image `f`, unlocked with the data key
/// `mk` (no passphrase needed). Nothing is written when `new` opens it
/// already.
pub fn add_passphrase_with_key(
    f: &File,
    format: Format,
    mk: &[u8],
    new: &[u8],
    shown: &str,
) -> Result<(), ImageError> {
    let (at, bytes, parsed) = region(f, format, shown)?;
    let luks = parsed.map_err(|why| {
        ImageError::Unsuitable(format!(
            "{shown}: its LUKS header cannot be read ({why}): restore it first (guestkey-recover restore-header)"
        ))
    })?;
    if !luks.is_data_key(mk) {
        return Err(ImageError::Unsuitable(format!(
            "the packet's data key does not open {shown}: the packet is for another volume, or the volume was deep-rekeyed since it was made"
        )));
    }
    if luks.unlock(&bytes, new).is_some() {
        return Ok(());
    }
    let (with_new, slot) = add_keyslot(&bytes, &luks, mk, new)?
        .map_err(|u| ImageError::Unsuitable(format!("{shown}: {}", u.0)))?;
    let (offset, len) =
        slot_material(&with_new, luks.key_bytes, slot).map_err(|u| ImageError::Check(u.0))?;
    // Material first, then the header that makes the keyslot active.
    put(
        f,
        at + offset as u64,
        &with_new[offset..offset + len],
        shown,
    )?;
    put(f, at, &with_new[..HEADER_LEN], shown)
}

fn put(f: &File, at: u64, bytes: &[u8], shown: &str) -> Result<(), ImageError> {
    f.write_all_at(bytes, at)
        .and_then(|()| f.sync_data())
        .map_err(io("write of the LUKS header of", shown))
}

/// What a packet says of the header it was made from.
pub struct Expected<'a> {
    /// Header UUID.
    pub uuid: &'a str,
    /// Payload offset, in sectors.
    pub payload_sectors: u64,
    /// Offset of the LUKS region in the file.
    pub region_offset: u64,
    /// The size the guest sees.
    pub virtual_size: u64,
}

/// Rebuilds the damaged LUKS header of `f` from the data key `mk`, with
/// `passphrase` in keyslot 0. `save` gets the damaged region's bytes
/// before anything is written (and may refuse). Returns the number of
/// bytes written.
pub fn restore_header(
    f: &File,
    format: Format,
    expected: &Expected<'_>,
    mk: &[u8],
    passphrase: &[u8],
    shown: &str,
    save: impl FnOnce(&[u8]) -> Result<(), ImageError>,
) -> Result<u64, ImageError> {
    let refuse = |why: String| Err(ImageError::Unsuitable(format!("{shown}: {why}")));
    if expected.payload_sectors != fresh_payload() {
        return refuse(format!(
            "the packet's header had its payload at sector {}; only QEMU's layout (sector {}) can be rebuilt: restore a header backup instead",
            expected.payload_sectors,
            fresh_payload()
        ));
    }
    let len = len_of(f, shown)?;
    let want = fresh_len() as u64;
    let (at, room) = match format {
        Format::Raw => (0, expected.payload_sectors * SECTOR as u64),
        Format::Qcow2 => luks_region(f, len, format, shown)?
            .map_err(|u| ImageError::Unsuitable(format!("{shown}: {}", u.0)))?,
    };
    if at != expected.region_offset {
        return refuse(format!(
            "its LUKS header is at byte {at}, the packet's was at {}: a packet of another volume",
            expected.region_offset
        ));
    }
    if room < want || len < at + want {
        return refuse(format!(
            "no room for a LUKS header of {want} bytes at byte {at}"
        ));
    }
    let old = read_at(f, at, want as usize, shown)?;
    if let Ok(luks) = Luks1::parse(&old) {
        let why = if luks.is_data_key(mk) && luks.unlock(&old, passphrase).is_some() {
            "its LUKS header is intact and the packet's passphrase opens it: nothing to restore"
                .to_owned()
        } else if luks.is_data_key(mk) {
            "its LUKS header is intact and holds the packet's data key under other passphrases: add one with guestkey-recover add-passphrase".to_owned()
        } else {
            format!(
                "its LUKS header is intact and holds another data key (header UUID {}, the packet's {}): a packet of another volume, or an obsolete one",
                uuid_of(&old),
                expected.uuid
            )
        };
        return refuse(why);
    }
    if format == Format::Raw && old.starts_with(b"QFI\xfb") {
        return refuse(
            "it is a qcow2 image, the packet's volume a raw LUKS one: a packet of another volume"
                .into(),
        );
    }
    // What is left of the damaged header may still name its UUID.
    let left = uuid_of(&old);
    if uuid::Uuid::parse_str(&left).is_ok() && left != expected.uuid {
        return refuse(format!(
            "its damaged header still names LUKS UUID {left}, the packet's is {}: a packet of another volume",
            expected.uuid
        ));
    }
    let size = match format {
        Format::Raw => len.checked_sub(room),
        Format::Qcow2 => Some(virtual_size(f, format, shown)?),
    };
    if size != Some(expected.virtual_size) {
        return refuse(format!(
            "its size ({} bytes for the guest) is not the packet's volume's ({} bytes): a packet of another volume",
            size.map_or_else(|| "?".to_owned(), |s| s.to_string()),
            expected.virtual_size
        ));
    }
    let mut fresh = fresh_header(mk, passphrase)?;
    let Ok(u) = uuid::Uuid::parse_str(expected.uuid) else {
        return refuse(format!(
            "the packet's LUKS UUID {:?} is not a UUID",
            expected.uuid
        ));
    };
    set_uuid(&mut fresh, &u);
    let check = Luks1::parse(&fresh).map_err(|u| ImageError::Check(u.0))?;
    if !check.is_data_key(mk) || check.unlock(&fresh, passphrase).is_none() {
        return Err(ImageError::Check(
            "the rebuilt header does not open with the packet's keys".into(),
        ));
    }
    save(&old)?;
    // Keyslot material first, the header that refers to it last.
    put(f, at + HEADER_LEN as u64, &fresh[HEADER_LEN..], shown)?;
    put(f, at, &fresh[..HEADER_LEN], shown)?;
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        std::env::temp_dir().join(format!("gk-recovery-{tag}-{}", hex::encode(b)))
    }

    fn opts(format: Format, p: &std::path::Path) -> String {
        let file = p.display();
        match format {
            Format::Qcow2 => format!("driver=qcow2,file.filename={file},encrypt.key-secret=k0"),
            Format::Raw => format!("driver=luks,file.filename={file},key-secret=k0"),
        }
    }

    /// qemu-io with passphrase `key` on `p`: `cmd`'s output, or None when
    /// the key does not open it.
    fn qemu_io(format: Format, p: &std::path::Path, key: &str, cmd: &str) -> Option<String> {
        let out = Command::new("qemu-io")
            .args(["--object", &format!("secret,id=k0,data={key},format=raw")])
            .args(["--image-opts", &opts(format, p), "-c", cmd])
            .output()
            .expect("qemu-io (scripts/setup)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("failed") || text.contains("Invalid password") {
            return None;
        }
        Some(text)
    }

    fn reads_pattern(format: Format, p: &std::path::Path, key: &str) -> bool {
        qemu_io(format, p, key, "read -P 0x5a 1M 64k")
            .is_some_and(|t| t.contains("read 65536/65536"))
    }

    /// A 4 MiB image under `key` made by guestkeyd's own code, or by
    /// qemu-img, with a pattern written at 1 MiB.
    fn image(format: Format, key: &str, by_qemu_img: bool) -> (std::path::PathBuf, File) {
        let p = tmp(format.as_str());
        if by_qemu_img {
            let (fmt, enc) = match format {
                Format::Qcow2 => (
                    "qcow2",
                    "encrypt.format=luks,encrypt.key-secret=k0,encrypt.iter-time=10",
                ),
                Format::Raw => ("luks", "key-secret=k0,iter-time=10"),
            };
            // qemu-img's PBKDF calibration fails on some tries (see
            // CALIBRATION_TRIES): tried as often as guestkeyd tries it.
            let mut said = String::new();
            let made = (0..crate::image::CALIBRATION_TRIES).any(|_| {
                let out = Command::new("qemu-img")
                    .args([
                        "create",
                        "--object",
                        &format!("secret,id=k0,data={key},format=raw"),
                    ])
                    .args(["-f", fmt, "-o", enc])
                    .arg(&p)
                    .arg("4M")
                    .output()
                    .unwrap();
                said = String::from_utf8_lossy(&out.stderr).into_owned();
                out.status.success() || !said.contains(crate::image::CALIBRATION_FAILED)
            });
            assert!(made && said.is_empty(), "{said}");
        } else {
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .unwrap();
            super::super::create::write_new(&f, format, 4 << 20, key.as_bytes(), "test").unwrap();
        }
        assert!(qemu_io(format, &p, key, "write -P 0x5a 1M 64k").is_some());
        let f = File::options().read(true).write(true).open(&p).unwrap();
        (p, f)
    }

    fn expected(k: &HeaderKey) -> Expected<'_> {
        Expected {
            uuid: &k.uuid,
            payload_sectors: k.payload_sectors,
            region_offset: k.region.0,
            virtual_size: k.virtual_size,
        }
    }

    #[test]
    fn a_destroyed_header_is_rebuilt_from_the_data_key_and_the_data_reads_back() {
        for by_qemu_img in [false, true] {
            for format in [Format::Raw, Format::Qcow2] {
                let (p, f) = image(format, "volume-key", by_qemu_img);
                let k = header_key(&f, format, b"volume-key", "test").unwrap();
                assert_eq!(k.data_key.len(), 64);
                assert_eq!(k.virtual_size, 4 << 20);
                assert_eq!(k.payload_sectors, 4040, "{format:?} {by_qemu_img}");
                // The header and the first keyslot's material destroyed.
                f.write_all_at(&[0u8; 8192], k.region.0).unwrap();
                assert!(!reads_pattern(format, &p, "volume-key"));
                let mut saved = vec![];
                let n = restore_header(
                    &f,
                    format,
                    &expected(&k),
                    &k.data_key,
                    b"volume-key",
                    "test",
                    |old| {
                        saved = old.to_vec();
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(n, fresh_len() as u64);
                assert!(
                    saved[..8192].iter().all(|&b| b == 0),
                    "the damaged bytes were saved"
                );
                assert!(
                    reads_pattern(format, &p, "volume-key"),
                    "{format:?} {by_qemu_img}"
                );
                let again = header_key(&f, format, b"volume-key", "test").unwrap();
                assert_eq!(again.uuid, k.uuid, "the header keeps its UUID");
                assert!(again.data_key == k.data_key);
                if format == Format::Raw {
                    let out = Command::new("cryptsetup")
                        .args(["--test-passphrase", "--key-file", "-", "open"])
                        .arg(&p)
                        .stdin(std::process::Stdio::piped())
                        .spawn()
                        .and_then(|mut c| {
                            use std::io::Write;
                            c.stdin.take().unwrap().write_all(b"volume-key")?;
                            c.wait_with_output()
                        })
                        .unwrap();
                    assert!(out.status.success(), "cryptsetup opens the rebuilt header");
                }
                std::fs::remove_file(p).unwrap();
            }
        }
    }

    #[test]
    fn an_intact_or_foreign_header_or_another_size_is_refused_and_nothing_changes() {
        for format in [Format::Raw, Format::Qcow2] {
            let (p, f) = image(format, "volume-key", false);
            let (q, g) = image(format, "other-key", false);
            let k = header_key(&f, format, b"volume-key", "test").unwrap();
            let other = header_key(&g, format, b"other-key", "test").unwrap();
            let before = std::fs::read(&p).unwrap();
            let no_save = |_: &[u8]| -> Result<(), ImageError> { panic!("nothing to save") };
            let e = restore_header(
                &f,
                format,
                &expected(&k),
                &k.data_key,
                b"volume-key",
                "test",
                no_save,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("nothing to restore"), "{e}");
            // Another volume's packet on an intact header.
            let e = restore_header(
                &f,
                format,
                &expected(&other),
                &other.data_key,
                b"other-key",
                "test",
                no_save,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("another data key"), "{e}");
            // Another volume's packet on a damaged header of another size.
            f.write_all_at(&[0u8; 100], k.region.0).unwrap();
            let damaged = std::fs::read(&p).unwrap();
            let mut big = expected(&other);
            big.virtual_size += 1 << 20;
            let e = restore_header(
                &f,
                format,
                &big,
                &other.data_key,
                b"other-key",
                "test",
                no_save,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("a packet of another volume"), "{e}");
            // Another volume's packet of the same size, on a header whose
            // UUID survived the damage.
            let e = restore_header(
                &f,
                format,
                &expected(&other),
                &other.data_key,
                b"other-key",
                "test",
                no_save,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("still names LUKS UUID"), "{e}");
            // A layout that is not QEMU's.
            let mut odd = expected(&k);
            odd.payload_sectors = 4096;
            let e = restore_header(
                &f,
                format,
                &odd,
                &k.data_key,
                b"volume-key",
                "test",
                no_save,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("only QEMU's layout"), "{e}");
            assert!(std::fs::read(&p).unwrap() == damaged, "nothing written");
            assert!(before != damaged);
            std::fs::remove_file(p).unwrap();
            std::fs::remove_file(q).unwrap();
        }
    }

    #[test]
    fn a_passphrase_is_added_with_the_data_key_alone() {
        for format in [Format::Raw, Format::Qcow2] {
            let (p, f) = image(format, "volume-key", false);
            let k = header_key(&f, format, b"volume-key", "test").unwrap();
            add_passphrase_with_key(&f, format, &k.data_key, b"custodian-pass", "test").unwrap();
            assert!(reads_pattern(format, &p, "custodian-pass"));
            assert!(
                reads_pattern(format, &p, "volume-key"),
                "the volume's key still opens it"
            );
            // Again: nothing added.
            let before = std::fs::read(&p).unwrap();
            add_passphrase_with_key(&f, format, &k.data_key, b"custodian-pass", "test").unwrap();
            assert!(std::fs::read(&p).unwrap() == before);
            // A wrong data key (another volume's packet) changes nothing.
            let e = add_passphrase_with_key(&f, format, &[7u8; 64], b"x", "test")
                .unwrap_err()
                .to_string();
            assert!(e.contains("the packet's data key does not open"), "{e}");
            assert!(std::fs::read(&p).unwrap() == before);
            std::fs::remove_file(p).unwrap();
        }
    }
}
