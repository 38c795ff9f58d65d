//! Benchmark: re-encryption throughput, each figure a ratio to the disk
//! ceiling measured in the same run (a plain copy of the same bytes,
//! written and synced to the same file system).
//!
//! - offline deep rekey of a full volume, qcow2 and raw LUKS, as guestkeyd
//!   does it (its own re-encrypting copy, read back and checked, QEMU's
//!   check, swap, old image crypto-shredded), next to a bare `qemu-img convert` and
//!   `cryptsetup reencrypt --force-offline-reencrypt` on the same data;
//! - online deep rekey of a running KVM guest's disk (block copy and pivot
//!   through libvirt), if libvirtd answers on qemu:///system;
//! - shallow rekey (new keyslot, old one erased): seconds per volume.
//!
//! `cargo bench -p host-daemon --bench rekey` (1 GiB volumes; `-- --quick`:
//! 128 MiB; `-- --online`: the online deep rekey only; `-- --offline`: the
//! offline ones only, without the references). Needs root,
//! qemu-utils, cryptsetup (scripts/setup).
//!
//! The disk of a shared machine changes speed from one minute to the next,
//! so the ceiling is measured right before and right after each figure,
//! and the figure is given as a ratio to the faster of the two.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use guestkey_testkit::cleanup::Made;
use host_daemon::image::{CALIBRATION_TRIES, Images, QemuImages};
use host_daemon::libvirt::{Hypervisor, Libvirt};
use host_daemon::model::{Format, VolumeEntry};
use host_daemon::ops::{Online, copy_online};
use xdr_wipe::packet::generate_passphrase;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let quick = std::env::args().any(|a| a == "--quick");
    let mib: u64 = if quick { 128 } else { 1024 };
    let size = mib << 20;
    let dir = PathBuf::from(format!("/var/tmp/gk-rekey-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Removed at the end, on a panic, and on Ctrl-C (SIGINT/SIGTERM/SIGHUP).
    let _made = Made::dir(&dir);
    let a = generate_passphrase().unwrap();
    let b = generate_passphrase().unwrap();
    let (a, b) = (a.expose_secret(), b.expose_secret());
    let cold = drop_caches();
    println!(
        "re-encryption of {mib} MiB volumes in {} ({})",
        dir.display(),
        if cold {
            "page cache dropped before each measurement"
        } else {
            "page cache NOT dropped (no permission): reads may come from memory"
        }
    );
    println!();
    if std::env::args().any(|a| a == "--online") {
        online(&dir, size, a, b);
        return;
    }

    let offline_only = std::env::args().any(|a| a == "--offline");
    for format in [Format::Qcow2, Format::Raw] {
        let name = match format {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw LUKS",
        };
        let img = dir.join(format!("vol-{name}").replace(' ', "-"));
        let img = img.to_str().unwrap();
        make_full_volume(&dir, img, format, size, a);
        let c1 = ceiling(img);
        let convert = (!offline_only).then(|| timed(|| qemu_img_convert(&dir, img, format, a, b)));
        let c2 = ceiling(img);
        let ours = timed(|| QemuImages.deep_rekey(img, format, a, b, 0).unwrap());
        let c3 = ceiling(img);
        println!("offline deep rekey, {name}:");
        ceilings(&[c1, c2, c3], size);
        if let Some(convert) = convert {
            row(
                "qemu-img convert alone (reference)",
                convert,
                c1.min(c2),
                size,
            );
        }
        row(
            "guestkeyd deep rekey (copy, read-back check, swap, shred)",
            ours,
            c2.min(c3),
            size,
        );
        if format == Format::Qcow2 {
            let shallow: Vec<Duration> = (0..3)
                .map(|i| {
                    let (o, n) = if i % 2 == 0 { (b, a) } else { (a, b) };
                    timed(|| QemuImages.replace_passphrase(img, format, o, n).unwrap())
                })
                .collect();
            let mut s = shallow.clone();
            s.sort();
            println!(
                "shallow rekey of the same volume: {:.2} s (median of 3; independent of size)",
                s[1].as_secs_f64()
            );
        }
        std::fs::remove_file(img).unwrap();
        println!();
    }

    if offline_only {
        return;
    }
    // cryptsetup's own offline re-encryption of a LUKS2 file of the same size.
    let c = dir.join("vol-luks2");
    let c = c.to_str().unwrap();
    let kf = dir.join("cryptsetup.key");
    write_key(&kf, a);
    // Every byte written (not a sparse file), as for the other volumes.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(c).unwrap();
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..(size >> 20) + 16 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    cryptsetup(&[
        "luksFormat",
        "--type",
        "luks2",
        "-q",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        kf.to_str().unwrap(),
        c,
    ]);
    let c1 = ceiling(c);
    let reenc = timed(|| {
        cryptsetup(&[
            "reencrypt",
            "--force-offline-reencrypt",
            "-q",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            kf.to_str().unwrap(),
            c,
        ])
    });
    let c2 = ceiling(c);
    println!("cryptsetup reencrypt --force-offline-reencrypt, LUKS2 (reference):");
    ceilings(&[c1, c2], size);
    row("cryptsetup reencrypt", reenc, c1.min(c2), size);
    std::fs::remove_file(c).unwrap();
    std::fs::remove_file(&kf).unwrap();
    println!();

    online(&dir, size, a, b);
}

/// Online deep rekey of a running guest's qcow2 disk, as guestkeyd does it.
fn online(dir: &Path, size: u64, a: &[u8], b: &[u8]) {
    let hv = Libvirt::new("qemu:///system");
    if !hv.ping() {
        println!("online deep rekey: skipped (libvirtd does not answer on qemu:///system)");
        return;
    }
    let img = dir.join("vol-online");
    let img = img.to_str().unwrap();
    make_full_volume(dir, img, Format::Qcow2, size, a);
    let c1 = ceiling(img);
    let secret = uuid::Uuid::new_v4().to_string();
    let name = format!("gk-bench-online-{}", std::process::id());
    let uuid = uuid::Uuid::new_v4().to_string();
    let xml = format!(
        "<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>
         <driver name='qemu' type='qcow2'/><source file='{img}'><encryption format='luks'>
         <secret type='passphrase' uuid='{secret}'/></encryption></source><target dev='vda' bus='virtio'/></disk></devices></domain>"
    );
    let _guest = Made::domain("qemu:///system", &name);
    let _secret = Made::secret("qemu:///system", &secret);
    let xml_file = dir.join("online.xml");
    std::fs::write(&xml_file, xml).unwrap();
    hv.set_secret(&secret, img, a).unwrap();
    let started = Command::new("virsh")
        .args(["-c", "qemu:///system", "create"])
        .arg(&xml_file)
        .output()
        .unwrap();
    hv.remove_secret(&secret).unwrap();
    if !started.status.success() {
        println!(
            "online deep rekey: skipped (the guest did not start: {})",
            String::from_utf8_lossy(&started.stderr).trim()
        );
        return;
    }
    let v = VolumeEntry {
        volume_id: uuid::Uuid::new_v4().to_string(),
        name: "vol-online".into(),
        pool: String::new(),
        path: img.to_owned(),
        secret_uuid: secret,
    };
    let t = timed(|| {
        let o = Online {
            guest: &uuid,
            volume: &v,
            generation: 2,
            format: Format::Qcow2,
            size,
            bandwidth: 0,
        };
        copy_online(&hv, &QemuImages, &o, b, &|s| hv.remove_secret(s).is_ok()).unwrap();
    });
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "destroy", &name])
        .output();
    assert!(QemuImages.opens_with(img, Format::Qcow2, b).unwrap());
    let c2 = ceiling(img);
    println!("online deep rekey of a running guest's qcow2 disk:");
    ceilings(&[c1, c2], size);
    row(
        "guestkeyd online rekey (block copy + pivot + shred)",
        t,
        c1.min(c2),
        size,
    );
    // QEMU's block copy decrypts every byte with the old key and encrypts
    // it with the new one, in one thread: its own ceiling, whatever the disk.
    let (dec, enc) = qemu_crypto(a);
    let both = 1.0 / (1.0 / dec + 1.0 / enc);
    let mib = size as f64 / (1u64 << 20) as f64;
    println!(
        "  QEMU's AES-XTS in one thread (qemu-io on tmpfs): decrypt {dec:.0} MiB/s, encrypt {enc:.0} MiB/s: a block copy needs both, at most {both:.0} MiB/s; the online rekey reached {:.2} of that",
        mib / t.as_secs_f64() / both
    );
}

/// QEMU's LUKS read and write speed in MiB/s (decrypt, encrypt) with no
/// disk in the way: a 256 MiB raw LUKS image in /dev/shm, written once to
/// allocate it, then timed by qemu-io itself (best of 3 each).
fn qemu_crypto(key: &[u8]) -> (f64, f64) {
    let d = PathBuf::from(format!("/dev/shm/gk-rekey-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let _made = Made::dir(&d);
    let img = d.join("crypto.luks");
    let img = img.to_str().unwrap();
    QemuImages.create(img, Format::Raw, 256 << 20, key).unwrap();
    let kf = d.join("k");
    write_key(&kf, key);
    let speed = |cmd: &str| -> f64 {
        let out = Command::new("qemu-io")
            .args(["--object", &format!("secret,id=k,file={}", kf.display())])
            .args([
                "--image-opts",
                &format!("driver=luks,file.filename={img},key-secret=k"),
            ])
            .args(["-c", cmd])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // "256 MiB, 1 ops; 00:00:00.55 (462.6 MiB/sec and 1.8 ops/sec)"
        let at = text
            .find(" MiB/sec")
            .unwrap_or_else(|| panic!("qemu-io said: {text}"));
        let start = text[..at].rfind('(').unwrap() + 1;
        text[start..at].parse().unwrap()
    };
    let _ = speed("write -P 0x11 0 256M");
    let best = |cmd: &str| (0..3).map(|_| speed(cmd)).fold(0.0, f64::max);
    (best("read 0 256M"), best("write -P 0x22 0 256M"))
}

/// A LUKS volume of `size` bytes under `key`, every byte written (so that
/// every cluster is allocated and re-encryption has the full size to do).
fn make_full_volume(dir: &Path, path: &str, format: Format, size: u64, key: &[u8]) {
    let _ = std::fs::remove_file(path);
    QemuImages.create(path, format, size, key).unwrap();
    let kf = dir.join("fill.key");
    write_key(&kf, key);
    let opts = match format {
        Format::Qcow2 => format!("driver=qcow2,file.filename={path},encrypt.key-secret=k"),
        Format::Raw => format!("driver=luks,file.filename={path},key-secret=k"),
    };
    let out = Command::new("qemu-io")
        .args(["--object", &format!("secret,id=k,file={}", kf.display())])
        .args([
            "--image-opts",
            &opts,
            "-c",
            &format!("write -P 0x5a 0 {size}"),
        ])
        .output()
        .unwrap();
    std::fs::remove_file(&kf).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sync();
}

fn write_key(path: &Path, key: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(key).unwrap();
}

/// The disk ceiling: every byte read and written once, then synced.
fn plain_copy(from: &str, to: &str) {
    let mut src = std::fs::File::open(from).unwrap();
    let mut dst = std::fs::File::create(to).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    dst.sync_all().unwrap();
}

fn qemu_img_convert(dir: &Path, path: &str, format: Format, a: &[u8], b: &[u8]) {
    let (ka, kb) = (dir.join("a.key"), dir.join("b.key"));
    write_key(&ka, a);
    write_key(&kb, b);
    let (src, fmt, opts) = match format {
        Format::Qcow2 => (
            format!("driver=qcow2,file.filename={path},encrypt.key-secret=ka"),
            "qcow2",
            "encrypt.format=luks,encrypt.key-secret=kb,encrypt.iter-time=1",
        ),
        Format::Raw => (
            format!("driver=luks,file.filename={path},key-secret=ka"),
            "luks",
            "key-secret=kb,iter-time=1",
        ),
    };
    let out_path = format!("{path}.convert");
    // qemu-img's PBKDF calibration often fails on a busy machine: try
    // again, as guestkeyd does (see CALIBRATION_TRIES).
    let mut tries = 0;
    let out = loop {
        let out = Command::new("qemu-img")
            .args([
                "convert",
                "--object",
                &format!("secret,id=ka,file={}", ka.display()),
            ])
            .args(["--object", &format!("secret,id=kb,file={}", kb.display())])
            .args(["--image-opts", &src, "-O", fmt, "-o", opts, &out_path])
            .output()
            .unwrap();
        tries += 1;
        if out.status.success() || tries == CALIBRATION_TRIES {
            break out;
        }
        let _ = std::fs::remove_file(&out_path);
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sync();
    std::fs::remove_file(&out_path).unwrap();
    std::fs::remove_file(&ka).unwrap();
    std::fs::remove_file(&kb).unwrap();
}

fn cryptsetup(args: &[&str]) {
    let out = Command::new("cryptsetup").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "cryptsetup {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// Drops the page cache (so that every measurement reads from disk).
fn drop_caches() -> bool {
    sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn timed(f: impl FnOnce()) -> Duration {
    drop_caches();
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The disk ceiling now: a plain copy of `img` (removed again).
fn ceiling(img: &str) -> Duration {
    let t = timed(|| plain_copy(img, &format!("{img}.copy")));
    std::fs::remove_file(format!("{img}.copy")).unwrap();
    t
}

fn ceilings(c: &[Duration], size: u64) {
    let shown: Vec<String> = c
        .iter()
        .map(|t| {
            format!(
                "{:.2} s ({:.0} MiB/s)",
                t.as_secs_f64(),
                size as f64 / (1u64 << 20) as f64 / t.as_secs_f64()
            )
        })
        .collect();
    println!(
        "  disk ceiling (plain copy of the same bytes), before and after each: {}",
        shown.join(", ")
    );
}

fn row(what: &str, t: Duration, ceiling: Duration, size: u64) {
    let mib_s = size as f64 / (1u64 << 20) as f64 / t.as_secs_f64();
    println!(
        "  {what:<58} {:>7.2} s {:>7.0} MiB/s   {:.2} of the faster ceiling next to it",
        t.as_secs_f64(),
        mib_s,
        ceiling.as_secs_f64() / t.as_secs_f64()
    );
}
