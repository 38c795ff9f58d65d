//! guestkeyd's own re-encryption (`host_daemon::image::luks1`) against
//! QEMU: images made by qemu-img, data written and read back by qemu-io with
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

fn roundtrip(format: Format, tag: &str) {
    let d = dir(tag);
    let path = d.join("vol");
    let path = path.to_str().unwrap();
    let (a, b) = keys();
    QemuImages.create(path, format, 8 << 20, &a).unwrap();
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
    roundtrip(Format::Qcow2, "qcow2");
}

#[test]
fn a_raw_luks_image_is_re_encrypted_and_qemu_reads_it_with_the_new_key_only() {
    roundtrip(Format::Raw, "raw");
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
