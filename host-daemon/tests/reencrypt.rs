//! guestkeyd's own re-encryption (`host_daemon::image::luks1`) against
//! QEMU: images made by guestkeyd and by qemu-img (volumes made before
//! guestkeyd wrote its own headers), data written and read back by qemu-io with
//! the old and the new passphrase; and the whole deep rekey of the image
//! layer (engine or qemu-img fallback, checks, swap, wipe). Needs
//! qemu-utils (scripts/setup).

#![allow(clippy::unwrap_used, missing_docs)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use host_daemon::image::luks1::reencrypt;
use host_daemon::image::{ImageError, Images, QemuImages};
use host_daemon::model::Format;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gk-reenc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// qemu-io on `path` with `key`; returns (success, output).
fn qemu_io(dir: &Path, path: &str, format: Format, key: &[u8], cmds: &[&str]) -> (bool, String) {
    let kf = dir.join("k");
    std::fs::write(&kf, key).unwrap();
    let opts = match format {
        Format::Qcow2 => format!("driver=qcow2,file.filename={path},encrypt.key-secret=k"),
        Format::Raw => format!("driver=luks,file.filename={path},key-secret=k"),
    };
    let mut c = Command::new("qemu-io");
    c.args(["--object", &format!("secret,id=k,file={}", kf.display())])
        .args(["--image-opts", &opts]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.output().unwrap();
    std::fs::remove_file(kf).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

/// Two passphrases as the server makes them (QEMU wants UTF-8 text).
fn keys() -> (Vec<u8>, Vec<u8>) {
    let k = || {
        xdr_wipe::packet::generate_passphrase()
            .unwrap()
            .expose_secret()
            .to_vec()
    };
    (k(), k())
}

/// An empty LUKS image made by `qemu-img create` (with its calibrated key
/// stretching), as guestkeyd made them before it wrote its own headers.
fn qemu_img_create(d: &Path, path: &str, format: Format, size: u64, key: &[u8]) {
    let kf = d.join("k");
    std::fs::write(&kf, key).unwrap();
    let (fmt, o) = match format {
        Format::Qcow2 => (
            "qcow2",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=1",
        ),
        Format::Raw => ("luks", "key-secret=k,iter-time=1"),
    };
    let object = format!("secret,id=k,file={}", kf.display());
    let size = size.to_string();
    let args = [
        "create", "-q", "-f", fmt, "--object", &object, "-o", o, path, &size,
    ];
    let mut tries = 0;
    loop {
        tries += 1;
        let out = Command::new("qemu-img").args(args).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            break;
        }
        assert!(
            tries < host_daemon::image::CALIBRATION_TRIES
                && said.contains(host_daemon::image::CALIBRATION_FAILED),
            "{said}"
        );
        let _ = std::fs::remove_file(path);
    }
    std::fs::remove_file(kf).unwrap();
}

fn roundtrip(format: Format, tag: &str, by_qemu_img: bool) {
    let d = dir(tag);
    let path = d.join("vol");
    let path = path.to_str().unwrap();
    let (a, b) = keys();
    if by_qemu_img {
        qemu_img_create(&d, path, format, 8 << 20, &a);
    } else {
        QemuImages.create(path, format, 8 << 20, &a).unwrap();
    }
    // Some data, a hole, and (qcow2) an allocated cluster that reads as zeros.
    let writes = [
        "write -P 0x11 0 1M",
        "write -P 0x22 3M 64k",
        "write -P 0x33 7M 1M",
    ];
    assert!(qemu_io(&d, path, format, &a, &writes).0);
    if format == Format::Qcow2 {
        assert!(qemu_io(&d, path, format, &a, &["write -z 7M 64k"]).0);
    }
    // What the hole reads as (zeros in qcow2; in raw LUKS, zero ciphertext
    // decrypted): the same before and after.
    let hole = |p: &str, key: &[u8]| {
        let (ok, out) = qemu_io(&d, p, format, key, &["read -v 1M 4k"]);
        assert!(ok, "{out}");
        out.lines()
            .filter(|l| l.len() > 9 && l.as_bytes()[8] == b':')
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let hole_before = hole(path, &a);
    let allocated = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let before = allocated(path);
    let copy = d.join("copy");
    let (src, dst) = (File::open(path).unwrap(), File::create_new(&copy).unwrap());
    reencrypt(&src, &dst, format, &a, &b, 0, path)
        .unwrap()
        .unwrap_or_else(|u| panic!("declined: {}", u.0));
    let copy = copy.to_str().unwrap();
    if format == Format::Qcow2 {
        // Holes stay holes: a thin image stays thin.
        assert!(
            allocated(copy) <= before + (1 << 20),
            "{} > {before}",
            allocated(copy)
        );
    }
    let reads = [
        "read -P 0x11 0 1M",
        "read -P 0x22 3M 64k",
        "read -P 0x33 7405568 960k",
    ];
    let (ok, out) = qemu_io(&d, copy, format, &b, &reads);
    assert!(ok, "{out}");
    assert_eq!(hole(copy, &b), hole_before);
    if format == Format::Qcow2 {
        let (ok, out) = qemu_io(&d, copy, format, &b, &["read -P 0 7M 64k"]);
        assert!(ok, "{out}");
    }
    let (ok, out) = qemu_io(&d, copy, format, &a, &["read 0 512"]);
    assert!(!ok && out.contains("Invalid password"), "{out}");
    // The whole deep rekey of the image layer: the same result in place,
    // no copy left in the staging directory.
    QemuImages.deep_rekey(path, format, &a, &b, 0).unwrap();
    let (ok, out) = qemu_io(&d, path, format, &b, &reads);
    assert!(ok, "{out}");
    assert!(!QemuImages.opens_with(path, format, &a).unwrap());
    assert_eq!(std::fs::read_dir(d.join(".guestkey")).unwrap().count(), 0);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_qcow2_luks_image_is_re_encrypted_and_qemu_reads_it_with_the_new_key_only() {
    roundtrip(Format::Qcow2, "qcow2", false);
    roundtrip(Format::Qcow2, "qcow2-qemu-img", true);
}

#[test]
fn a_raw_luks_image_is_re_encrypted_and_qemu_reads_it_with_the_new_key_only() {
    roundtrip(Format::Raw, "raw", false);
    roundtrip(Format::Raw, "raw-qemu-img", true);
}

/// A shallow rekey of an image whose header qemu-img wrote (guestkeyd's
/// own keyslot writes apply: the same LUKS1 layout) and of one of its own.
#[test]
fn a_shallow_rekey_replaces_the_keyslot_of_either_kind_of_image() {
    for (format, by_qemu_img) in [
        (Format::Qcow2, true),
        (Format::Raw, true),
        (Format::Qcow2, false),
    ] {
        let d = dir(&format!("shallow-{}-{by_qemu_img}", format.as_str()));
        let path = d.join("vol");
        let path = path.to_str().unwrap();
        let (a, b) = keys();
        if by_qemu_img {
            qemu_img_create(&d, path, format, 4 << 20, &a);
        } else {
            QemuImages.create(path, format, 4 << 20, &a).unwrap();
        }
        assert!(qemu_io(&d, path, format, &a, &["write -P 0x44 1M 64k"]).0);
        QemuImages.replace_passphrase(path, format, &a, &b).unwrap();
        assert!(!QemuImages.opens_with(path, format, &a).unwrap());
        let (ok, out) = qemu_io(&d, path, format, &b, &["read -P 0x44 1M 64k"]);
        assert!(ok, "{out}");
        // A wrong current key: refused, the image as it was.
        let before = std::fs::read(path).unwrap();
        let e = QemuImages
            .replace_passphrase(path, format, &a, b"another-passphrase")
            .unwrap_err();
        assert!(e.to_string().contains("does not open"), "{e}");
        assert!(std::fs::read(path).unwrap() == before);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// What a deep rekey leaves of the image it replaced (read through a
/// descriptor opened before): by default its LUKS header and keyslots are
/// zeros and the rest still ciphertext (crypto-shredding); with
/// `overwrite_old_images(true)` every byte is zero. The only test that sets
/// it, and it sets it back.
#[test]
fn replaced_images_are_shredded_or_overwritten() {
    use std::os::unix::fs::FileExt;
    for format in [Format::Raw, Format::Qcow2] {
        for overwrite in [false, true] {
            let d = dir(&format!("shred-{}-{overwrite}", format.as_str()));
            let path = d.join("vol");
            let path = path.to_str().unwrap();
            let (a, b) = keys();
            QemuImages.create(path, format, 4 << 20, &a).unwrap();
            assert!(qemu_io(&d, path, format, &a, &["write -P 0x55 0 4M"]).0);
            let old = File::open(path).unwrap();
            let len = old.metadata().unwrap().len();
            let mut before = vec![0u8; len as usize];
            old.read_exact_at(&mut before, 0).unwrap();
            let lay = host_daemon::image::luks1::layout::luks_region(&old, len, format, path)
                .unwrap()
                .unwrap_or_else(|u| panic!("{}", u.0));
            host_daemon::image::overwrite_old_images(overwrite);
            QemuImages.deep_rekey(path, format, &a, &b, 0).unwrap();
            host_daemon::image::overwrite_old_images(false);
            let mut after = vec![0u8; len as usize];
            old.read_exact_at(&mut after, 0).unwrap();
            let (at, n) = (lay.0 as usize, lay.1 as usize);
            assert!(before[at..at + n].iter().any(|&x| x != 0));
            assert!(
                after[at..at + n].iter().all(|&x| x == 0),
                "keyslots shredded"
            );
            let rest_zero = after[..at].iter().chain(&after[at + n..]).all(|&x| x == 0);
            if overwrite {
                assert!(rest_zero, "{format:?}: every byte overwritten");
            } else {
                assert!(!rest_zero, "{format:?}: only the keys shredded");
                assert!(
                    !after.windows(512).any(|w| w.iter().all(|&x| x == 0x55)),
                    "no plaintext in the old file"
                );
            }
            let (ok, out) = qemu_io(&d, path, format, &b, &["read -P 0x55 0 4M"]);
            assert!(ok, "{out}");
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
}

#[test]
fn unknown_layouts_are_declined_untouched_and_a_wrong_key_is_an_error() {
    let d = dir("decline");
    let path = d.join("vol");
    let path = path.to_str().unwrap();
    let (a, b) = keys();
    QemuImages.create(path, Format::Qcow2, 4 << 20, &a).unwrap();
    assert!(qemu_io(&d, path, Format::Qcow2, &a, &["write -P 0x44 0 64k"]).0);
    let before = std::fs::read(path).unwrap();
    // The wrong current key: an error, nothing written.
    let copy = d.join("copy");
    let (src, dst) = (File::open(path).unwrap(), File::create_new(&copy).unwrap());
    let err = reencrypt(&src, &dst, Format::Qcow2, &b, &a, 0, path)
        .err()
        .unwrap();
    assert!(
        matches!(&err, ImageError::Check(m) if m.contains("does not open")),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 0);
    // The whole deep rekey with the wrong key: refused, the image untouched.
    assert!(
        QemuImages
            .deep_rekey(path, Format::Qcow2, &b, &a, 0)
            .is_err()
    );
    assert_eq!(std::fs::read(path).unwrap(), before);
    // An internal snapshot: declined (the caller uses qemu-img instead).
    let kf = d.join("k");
    std::fs::write(&kf, &a).unwrap();
    let out = Command::new("qemu-img")
        .args(["snapshot", "-c", "s1", "--object"])
        .arg(format!("secret,id=k,file={}", kf.display()))
        .args(["--image-opts"])
        .arg(format!(
            "driver=qcow2,file.filename={path},encrypt.key-secret=k"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = std::fs::read(path).unwrap();
    assert_ne!(before, snap);
    let src = File::open(path).unwrap();
    let declined = reencrypt(&src, &dst, Format::Qcow2, &a, &b, 0, path).unwrap();
    assert!(declined.is_err());
    assert_eq!(std::fs::read(path).unwrap(), snap, "untouched");
    // The full deep rekey still works, through qemu-img.
    QemuImages
        .deep_rekey(path, Format::Qcow2, &a, &b, 0)
        .unwrap();
    assert!(qemu_io(&d, path, Format::Qcow2, &b, &["read -P 0x44 0 64k"]).0);
    std::fs::remove_dir_all(&d).unwrap();
}
