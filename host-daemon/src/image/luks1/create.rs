//! New, empty encrypted images written directly: a raw LUKS1 file, or a
//! qcow2 (version 3) file with a LUKS1 header inside, both as QEMU lays
//! them out. `qemu-img create` would measure the CPU to pick the key
//! stretching (about 2 s, and on a loaded machine it fails often); the
//! passphrase here is a random 256-bit key, so the header uses the fixed
//! minimum of 1,000 PBKDF2 iterations and nothing is calibrated.
//!
//! The data area is left as a hole, as `qemu-img create` leaves it. The
//! caller has QEMU open the image with its key before it is used.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::header::fresh_header;
use super::xts::SECTOR;
use crate::image::ImageError;
use crate::model::Format;

/// qcow2 cluster size (QEMU's default): 64 KiB.
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// qcow2 header extension: full disk encryption header pointer.
const QCOW2_FDE_EXT: u32 = 0x0537_be77;
/// Length of the version 3 header without optional fields.
const QCOW2_V3_HEADER: u32 = 104;
/// Refcounts of 16 bits (refcount order 4), QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

/// The guest-visible size QEMU gives an image asked for `size` bytes:
/// whole sectors, rounded up.
pub fn rounded(size: u64) -> u64 {
    size.div_ceil(SECTOR as u64) * SECTOR as u64
}

/// Writes an empty `format` image of `size` bytes (rounded up to whole
/// sectors) into the empty file `f`: a new random data key in keyslot 0
/// under passphrase `key`. `shown` names the file in messages.
pub fn write_new(
    f: &File,
    format: Format,
    size: u64,
    key: &[u8],
    shown: &str,
) -> Result<(), ImageError> {
    if size == 0 {
        return Err(ImageError::Unsuitable(format!(
            "{shown}: a volume needs at least 1 byte"
        )));
    }
    let size = rounded(size);
    let mk = crate::image::new_data_key(64)?;
    let region = fresh_header(&mk, key)?;
    drop(mk);
    match format {
        Format::Raw => {
            write_sparse(f, 0, &region, shown)?;
            let len = (region.len() as u64)
                .checked_add(size)
                .ok_or_else(|| ImageError::Unsuitable(format!("{shown}: size too large")))?;
            f.set_len(len).map_err(io("write of", shown))
        }
        Format::Qcow2 => {
            let q = Qcow2::plan(size, region.len() as u64)
                .ok_or_else(|| ImageError::Unsuitable(format!("{shown}: size too large")))?;
            for (at, bytes) in q.metadata() {
                f.write_all_at(&bytes, at).map_err(io("write of", shown))?;
            }
            write_sparse(f, q.luks_offset, &region, shown)?;
            f.set_len(q.file_len).map_err(io("write of", shown))
        }
    }
}

/// Writes `bytes` at `at`, leaving all-zero 4 KiB pieces as holes (the
/// unused keyslots of a new header).
fn write_sparse(f: &File, at: u64, bytes: &[u8], shown: &str) -> Result<(), ImageError> {
    for (i, piece) in bytes.chunks(4096).enumerate() {
        if piece.iter().any(|&b| b != 0) {
            f.write_all_at(piece, at + (i * 4096) as u64)
                .map_err(io("write of", shown))?;
        }
    }
    Ok(())
}

/// Where each part of a new qcow2 file goes: cluster 0 the header, 1 the
/// refcount table, 2 its one refcount block, then the L1 table (empty: no
/// data cluster is allocated yet), then the LUKS region.
struct Qcow2 {
    size: u64,
    l1_entries: u64,
    l1_offset: u64,
    luks_offset: u64,
    luks_len: u64,
    clusters: u64,
    file_len: u64,
}

impl Qcow2 {
    fn plan(size: u64, luks_len: u64) -> Option<Self> {
        // One L2 table maps cluster / 8 clusters.
        let per_l2 = CLUSTER * (CLUSTER / 8);
        let l1_entries = size.div_ceil(per_l2);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
        let l1_offset = 3 * CLUSTER;
        let luks_offset = l1_offset + l1_clusters * CLUSTER;
        let clusters = luks_offset / CLUSTER + luks_len.div_ceil(CLUSTER);
        // One refcount block of 16-bit entries counts this many clusters;
        // QEMU's own limit on L1 tables (32 MiB) comes first.
        let per_block = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
        if clusters > per_block || l1_entries * 8 > 32 << 20 {
            return None;
        }
        Some(Self {
            size,
            l1_entries,
            l1_offset,
            luks_offset,
            luks_len,
            clusters,
            file_len: clusters * CLUSTER,
        })
    }

    /// The header cluster, the refcount table and the refcount block (the
    /// L1 table is zeros: the file's hole).
    fn metadata(&self) -> [(u64, Vec<u8>); 3] {
        let mut h = vec![0u8; 4096];
        let put32 =
            |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        h[..4].copy_from_slice(b"QFI\xfb");
        put32(&mut h, 4, 3); // version
        // 8: no backing file (offset 0, size 0).
        put32(&mut h, 20, CLUSTER_BITS);
        put64(&mut h, 24, self.size);
        put32(&mut h, 32, 2); // crypt_method: LUKS
        put32(&mut h, 36, self.l1_entries as u32);
        put64(&mut h, 40, self.l1_offset);
        put64(&mut h, 48, CLUSTER); // refcount table
        put32(&mut h, 56, 1); // refcount table clusters
        // 60: no snapshots; 72..96: no incompatible, compatible or
        // autoclear features.
        put32(&mut h, 96, REFCOUNT_ORDER);
        put32(&mut h, 100, QCOW2_V3_HEADER);
        let e = QCOW2_V3_HEADER as usize;
        put32(&mut h, e, QCOW2_FDE_EXT);
        put32(&mut h, e + 4, 16);
        put64(&mut h, e + 8, self.luks_offset);
        put64(&mut h, e + 16, self.luks_len);
        // Then the end of the extensions (type 0, length 0): zeros.

        let mut table = vec![0u8; 8];
        put64(&mut table, 0, 2 * CLUSTER);
        let mut block = vec![0u8; (self.clusters * 2) as usize];
        for c in block.chunks_exact_mut(2) {
            c.copy_from_slice(&1u16.to_be_bytes());
        }
        [(0, h), (CLUSTER, table), (2 * CLUSTER, block)]
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::fresh_len;
    use super::*;
    use std::process::Command;

    const KEY: &str = "a-test-passphrase-of-the-volume";

    fn tmp(tag: &str) -> std::path::PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        std::env::temp_dir().join(format!("gk-create-{tag}-{}", hex::encode(b)))
    }

    fn new_image(format: Format, size: u64) -> std::path::PathBuf {
        let p = tmp(format.as_str());
        let f = File::create_new(&p).unwrap();
        write_new(&f, format, size, KEY.as_bytes(), "test image").unwrap();
        p
    }

    fn opts(format: Format, p: &std::path::Path, secret: &str) -> String {
        let file = p.display();
        match format {
            Format::Qcow2 => {
                format!("driver=qcow2,file.filename={file},encrypt.key-secret={secret}")
            }
            Format::Raw => format!("driver=luks,file.filename={file},key-secret={secret}"),
        }
    }

    /// `program` (qemu-io or qemu-img) with the key as secret `k0`;
    /// (ok, output).
    fn qemu(program: &str, key: &str, args: &[&str]) -> (bool, String) {
        // qemu-img takes its subcommand first.
        let (sub, rest) = if program == "qemu-img" {
            args.split_at(1)
        } else {
            (&[][..], args)
        };
        let out = Command::new(program)
            .args(sub)
            .arg("--object")
            .arg(format!("secret,id=k0,data={key},format=raw"))
            .args(rest)
            .output()
            .expect("qemu-utils (scripts/setup)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn writes_and_reads_back(format: Format, p: &std::path::Path) {
        let o = opts(format, p, "k0");
        let (ok, text) = qemu(
            "qemu-io",
            KEY,
            &[
                "--image-opts",
                &o,
                "-c",
                "write -P 0x5a 1M 64k",
                "-c",
                "read -P 0x5a 1M 64k",
            ],
        );
        assert!(ok && text.contains("read 65536/65536"), "{text}");
        assert!(!text.contains("Pattern verification failed"), "{text}");
        let (_, text) = qemu(
            "qemu-io",
            "another-passphrase",
            &["-r", "--image-opts", &o, "-c", "read 0 512"],
        );
        assert!(
            text.contains("Invalid password"),
            "a wrong key is refused: {text}"
        );
    }

    fn virtual_size(format: Format, p: &std::path::Path) -> u64 {
        let (ok, text) = qemu(
            "qemu-img",
            KEY,
            &[
                "info",
                "--output=json",
                "--image-opts",
                &opts(format, p, "k0"),
            ],
        );
        assert!(ok, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["virtual-size"].as_u64().unwrap()
    }

    #[test]
    fn qemu_and_cryptsetup_open_a_new_raw_luks_image() {
        let p = new_image(Format::Raw, (8 << 20) + 1);
        assert_eq!(virtual_size(Format::Raw, &p), (8 << 20) + 512);
        writes_and_reads_back(Format::Raw, &p);
        let run = |args: &[&str], key: &str| -> (bool, String) {
            use std::io::Write;
            let mut c = Command::new("cryptsetup")
                .args(args)
                .arg("--key-file=-")
                .arg(&p)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("cryptsetup (scripts/setup)");
            c.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
            let out = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        };
        let (ok, dump) = run(&["luksDump"], "");
        assert!(ok, "{dump}");
        assert!(dump.contains("Payload offset:\t4040"), "{dump}");
        assert_eq!(dump.matches("ENABLED").count(), 1, "{dump}");
        let (ok, text) = run(&["open", "--test-passphrase"], KEY);
        assert!(ok, "cryptsetup opens it with the key: {text}");
        let (ok, _) = run(&["open", "--test-passphrase"], "another-passphrase");
        assert!(!ok, "and not with another");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn qemu_opens_and_checks_a_new_qcow2_image() {
        for size in [512, 64 << 20, (3 << 30) + 4096] {
            let p = new_image(Format::Qcow2, size);
            assert_eq!(virtual_size(Format::Qcow2, &p), size);
            let (ok, text) = qemu(
                "qemu-img",
                KEY,
                &["check", "--image-opts", &opts(Format::Qcow2, &p, "k0")],
            );
            assert!(ok && text.contains("No errors were found"), "{text}");
            if size > 2 << 20 {
                writes_and_reads_back(Format::Qcow2, &p);
                let (ok, text) = qemu(
                    "qemu-img",
                    KEY,
                    &["check", "--image-opts", &opts(Format::Qcow2, &p, "k0")],
                );
                assert!(
                    ok && text.contains("No errors were found"),
                    "after a write: {text}"
                );
            }
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn an_empty_size_is_refused() {
        let p = tmp("empty");
        let f = File::create_new(&p).unwrap();
        let e = write_new(&f, Format::Raw, 0, KEY.as_bytes(), "test image").unwrap_err();
        assert!(e.to_string().contains("at least 1 byte"), "{e}");
        assert_eq!(f.metadata().unwrap().len(), 0, "nothing written");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn qcow2_plans_fit_from_one_sector_to_a_pebibyte() {
        let luks = fresh_len() as u64;
        let small = Qcow2::plan(512, luks).unwrap();
        assert_eq!(small.l1_entries, 1);
        assert_eq!(small.luks_offset, 4 * CLUSTER);
        // QEMU's own file for 64 MiB: 36 clusters.
        assert_eq!(Qcow2::plan(64 << 20, luks).unwrap().clusters, 36);
        let big = Qcow2::plan(1 << 50, luks).unwrap();
        assert_eq!(big.l1_entries, 1 << 21);
        assert_eq!(big.luks_offset, (3 + 256) * CLUSTER);
        assert!(Qcow2::plan(1 << 62, luks).is_none());
    }

    #[test]
    fn sizes_are_whole_sectors() {
        assert_eq!(rounded(1), 512);
        assert_eq!(rounded(512), 512);
        assert_eq!(rounded(513), 1024);
    }
}
