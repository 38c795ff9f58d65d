//! Reading and writing LUKS images directly with qemu-io and a key the
//! test holds (a read with the key is the only proof that it opens them).

use std::path::Path;

use crate::run;

/// Runs `qemu-io -c CMD` on the LUKS image at `path` (`format` qcow2 or raw)
/// with `key`; read commands open it read-only and shared, as the guest may
/// run. Returns its output.
pub fn qemu_io_fmt(
    dir: &Path,
    path: &Path,
    format: &str,
    key: &[u8],
    cmd: &str,
) -> Result<String, String> {
    let f = dir.join("qemu-io.key");
    std::fs::write(&f, key).expect("key file");
    let opts = match format {
        "raw" => format!("driver=luks,file.filename={},key-secret=k", path.display()),
        _ => format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=k",
            path.display()
        ),
    };
    let secret = format!("secret,id=k,file={}", f.display());
    let mut args = vec!["--object", &secret, "--image-opts", &opts, "-c", cmd];
    if cmd.starts_with("read") {
        // Read-only and shared: the guest may be running.
        args.splice(0..0, ["-r", "-U"]);
    }
    let r = run("qemu-io", &args);
    std::fs::remove_file(f).expect("key file");
    r.map_err(|e| e.0)
}

/// `qemu_io_fmt` on a qcow2 image.
pub fn qemu_io(dir: &Path, path: &Path, key: &[u8], cmd: &str) -> Result<String, String> {
    qemu_io_fmt(dir, path, "qcow2", key, cmd)
}

/// Whether `key` opens the LUKS image at `path` (a real read with qemu-io).
pub fn opens_with(dir: &Path, path: &Path, format: &str, key: &[u8]) -> bool {
    qemu_io_fmt(dir, path, format, key, "read 0 512").is_ok()
}

/// Reads the pattern `byte` back over `len` bytes of a qcow2 image.
pub fn pattern_intact(
    dir: &Path,
    path: &Path,
    key: &[u8],
    byte: u8,
    len: &str,
) -> Result<(), String> {
    pattern_intact_fmt(dir, path, "qcow2", key, byte, len)
}

/// Reads the pattern `byte` back over `len` bytes of a `format` (qcow2 or
/// raw) LUKS image.
pub fn pattern_intact_fmt(
    dir: &Path,
    path: &Path,
    format: &str,
    key: &[u8],
    byte: u8,
    len: &str,
) -> Result<(), String> {
    let out = qemu_io_fmt(
        dir,
        path,
        format,
        key,
        &format!("read -P {byte:#x} 0 {len}"),
    )?;
    if out.contains("Pattern verification failed") {
        Err(out)
    } else {
        Ok(())
    }
}
