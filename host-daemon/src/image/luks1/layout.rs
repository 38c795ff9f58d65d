//! Where the LUKS header is in an image and which bytes are encrypted
//! data: raw LUKS (header, then the payload) or qcow2 with LUKS inside (the
//! header in a header extension, data clusters found through the L1/L2
//! tables). Anything else is declined.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Unsupported;
use super::header::{HEADER_LEN, Luks1, be32};
use super::xts::SECTOR;
use crate::image::ImageError;
use crate::model::Format;

/// qcow2 header extension: full disk encryption header pointer.
const QCOW2_FDE_EXT: u32 = 0x0537_be77;

/// Where the LUKS header is and which bytes of the file are encrypted data.
pub struct Layout {
    /// Offset and length of the LUKS header (with its keyslots).
    pub luks: (u64, u64),
    /// Data extents: (file offset, length, first IV sector).
    pub data: Vec<(u64, u64, u64)>,
    /// Allocated clusters that read as zeros: written as zeros.
    pub zeroed: Vec<(u64, u64)>,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// `len` bytes at `at`.
pub fn read_at(f: &File, at: u64, len: usize, shown: &str) -> Result<Vec<u8>, ImageError> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at)
        .map_err(|source| ImageError::Io {
            what: "read of",
            path: format!("{shown} at {at}"),
            source,
        })?;
    Ok(b)
}

/// The layout of the image `f` of `len` bytes.
pub fn layout(
    f: &File,
    len: u64,
    format: Format,
    shown: &str,
) -> Result<Result<Layout, Unsupported>, ImageError> {
    match format {
        Format::Raw => {
            if len < HEADER_LEN as u64 {
                return Ok(Err(Unsupported("shorter than a LUKS header".into())));
            }
            let h = read_at(f, 0, HEADER_LEN, shown)?;
            let l = match Luks1::parse(&h) {
                Ok(l) => l,
                Err(u) => return Ok(Err(u)),
            };
            let start = l.payload_sectors * SECTOR as u64;
            if start > len || !(len - start).is_multiple_of(SECTOR as u64) {
                return Ok(Err(Unsupported("payload not whole sectors".into())));
            }
            Ok(Ok(Layout {
                luks: (0, start),
                data: vec![(start, len - start, 0)],
                zeroed: vec![],
            }))
        }
        Format::Qcow2 => qcow2(f, len, shown),
    }
}

/// The guest-visible size of the LUKS image open as `f`, from its own
/// header (raw: the payload; qcow2: the size field), for sample reads.
pub fn virtual_size(f: &File, format: Format, shown: &str) -> Result<u64, ImageError> {
    let len = f
        .metadata()
        .map_err(|source| ImageError::Io {
            what: "inspect",
            path: shown.to_owned(),
            source,
        })?
        .len();
    let unknown = |u: Unsupported| ImageError::Check(format!("{shown}: {}", u.0));
    match format {
        Format::Raw => {
            let (_, payload) = luks_region(f, len, format, shown)?.map_err(unknown)?;
            Ok(len - payload)
        }
        Format::Qcow2 => {
            qcow2_header(f, len, shown)?.map_err(unknown)?;
            Ok(be64(&read_at(f, 24, 8, shown)?, 0))
        }
    }
}

/// Only where the LUKS header is (offset, length), without walking a
/// qcow2 file's cluster tables.
pub fn luks_region(
    f: &File,
    len: u64,
    format: Format,
    shown: &str,
) -> Result<Result<(u64, u64), Unsupported>, ImageError> {
    match format {
        Format::Raw => Ok(layout(f, len, format, shown)?.map(|l| l.luks)),
        Format::Qcow2 => Ok(qcow2_header(f, len, shown)?.map(|h| h.luks)),
    }
}

/// What a qcow2 header says: cluster size, L1 table, LUKS header.
struct Qcow2Header {
    cluster: u64,
    l1_size: u64,
    l1_offset: u64,
    luks: (u64, u64),
}

fn qcow2_header(
    f: &File,
    len: u64,
    shown: &str,
) -> Result<Result<Qcow2Header, Unsupported>, ImageError> {
    macro_rules! no {
        ($why:expr) => {
            return Ok(Err(Unsupported($why.into())))
        };
    }
    if len < 72 {
        no!("not qcow2");
    }
    let h = read_at(f, 0, 104.min(len as usize), shown)?;
    if &h[..4] != b"QFI\xfb" {
        no!("not qcow2");
    }
    let version = be32(&h, 4);
    if be64(&h, 8) != 0 {
        no!("backing file");
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        no!("cluster size");
    }
    let cluster = 1u64 << cluster_bits;
    if be32(&h, 32) != 2 {
        no!("not LUKS-encrypted qcow2");
    }
    let l1_size = u64::from(be32(&h, 36));
    let l1_offset = be64(&h, 40);
    if be32(&h, 60) != 0 {
        no!("internal snapshots");
    }
    let header_len = if version >= 3 {
        if h.len() < 104 {
            no!("short header");
        }
        if be64(&h, 72) != 0 {
            no!("incompatible features (dirty, extended L2, external data...)");
        }
        if be32(&h, 96) != 4 {
            no!("refcount width");
        }
        u64::from(be32(&h, 100))
    } else {
        72
    };
    if header_len >= cluster || cluster > len {
        no!("header larger than a cluster");
    }
    // Header extensions, up to the end marker (type 0).
    let ext = read_at(f, header_len, (cluster - header_len) as usize, shown)?;
    let mut at = 0usize;
    let mut luks = None;
    while at + 8 <= ext.len() {
        let (t, l) = (be32(&ext, at), be32(&ext, at + 4) as usize);
        if t == 0 {
            break;
        }
        if t == QCOW2_FDE_EXT && l >= 16 && at + 24 <= ext.len() {
            luks = Some((be64(&ext, at + 8), be64(&ext, at + 16)));
        }
        at += 8 + l.div_ceil(8) * 8;
    }
    let Some(luks) = luks else {
        no!("no LUKS header extension");
    };
    if luks.0.checked_add(luks.1).is_none_or(|end| end > len)
        || luks.1 < HEADER_LEN as u64
        || luks.1 > 64 << 20
    {
        no!("LUKS header outside the file");
    }
    Ok(Ok(Qcow2Header {
        cluster,
        l1_size,
        l1_offset,
        luks,
    }))
}

fn qcow2(f: &File, len: u64, shown: &str) -> Result<Result<Layout, Unsupported>, ImageError> {
    macro_rules! no {
        ($why:expr) => {
            return Ok(Err(Unsupported($why.into())))
        };
    }
    let Qcow2Header {
        cluster,
        l1_size,
        l1_offset,
        luks,
    } = match qcow2_header(f, len, shown)? {
        Ok(h) => h,
        Err(u) => return Ok(Err(u)),
    };
    if l1_size > (64 << 20) / 8
        || l1_offset
            .checked_add(l1_size * 8)
            .is_none_or(|end| end > len)
    {
        no!("L1 table size");
    }
    let l1 = read_at(f, l1_offset, (l1_size * 8) as usize, shown)?;
    let entries_per_l2 = cluster / 8;
    let mut data = vec![];
    let mut zeroed = vec![];
    for l1e in l1.chunks_exact(8) {
        let l2_offset = be64(l1e, 0) & 0x00ff_ffff_ffff_fe00;
        if l2_offset == 0 {
            continue;
        }
        if l2_offset.checked_add(cluster).is_none_or(|end| end > len) {
            no!("L2 table outside the file");
        }
        let l2 = read_at(f, l2_offset, cluster as usize, shown)?;
        for e in l2.chunks_exact(8).take(entries_per_l2 as usize) {
            let e = be64(e, 0);
            if e & (1 << 62) != 0 {
                no!("compressed cluster");
            }
            let host = e & 0x00ff_ffff_ffff_fe00;
            if host == 0 {
                continue;
            }
            if !host.is_multiple_of(cluster) || host + cluster > len {
                no!("cluster outside the file");
            }
            if e & 1 != 0 {
                zeroed.push((host, cluster));
            } else {
                data.push((host, cluster, host / SECTOR as u64));
            }
        }
    }
    data.sort_unstable();
    zeroed.sort_unstable();
    Ok(Ok(Layout { luks, data, zeroed }))
}
