//! Offline deep rekey without QEMU's crypto.
//!
//! `qemu-img convert` re-encrypts at a fraction of the disk's speed here
//! (QEMU's AES-XTS runs in one thread, about 45 MiB/s of data on this
//! machine's cores), so guestkeyd re-encrypts the images it creates itself,
//! with AES-NI through the `aes` crate, on every core, and in one
//! sequential pass over the file:
//!
//! 1. the old LUKS1 header is unlocked with the old passphrase (PBKDF2,
//!    keyslot decryption, anti-forensic merge, master key digest: the LUKS1
//!    on-disk format) to get the old data key;
//! 2. a new header in the same layout gets a new random data key in
//!    keyslot 0 under the new passphrase (anti-forensic split, PBKDF2; the
//!    other keyslots disabled and their material overwritten with random
//!    bytes), and replaces the old header in the copy;
//! 3. the copy `PATH.gk-rekey` is the old file byte for byte, except the
//!    LUKS header and the data sectors, each decrypted with the old data key
//!    and encrypted with the new one (aes-xts-plain64, the IV being the
//!    sector number: of the payload for raw LUKS, of the host file for qcow2
//!    with LUKS inside, whose data clusters are found through its L1/L2
//!    tables);
//! 4. checks: the copy is read back and decrypted with the new key and must
//!    hash to the plaintext seen in step 3, QEMU must open it with the new
//!    passphrase and not with the old one, and QEMU's reads of sample ranges
//!    of both images (old key, new key) must agree;
//! 5. the caller swaps it in and overwrites the old image
//!    ([`crate::luks::swap_and_wipe`]).
//!
//! Anything this module does not know (other ciphers or hashes, LUKS2,
//! qcow2 snapshots, backing files, compressed or extended-L2 clusters, a
//! new header of another size) makes it decline, and the caller uses
//! `qemu-img convert` instead.

use std::fs::File;
use std::os::unix::fs::FileExt;

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::hypervisor::{Format, HvError};

const SECTOR: usize = 512;
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// qcow2 header extension: full disk encryption header pointer.
const QCOW2_FDE_EXT: u32 = 0x0537_be77;
/// Bytes read, transformed and written at a time.
const CHUNK: usize = 8 << 20;
/// Zero runs of this size are not written (they stay holes).
const ZERO_RUN: usize = 64 << 10;

/// Why the fast path does not apply; the caller falls back to qemu-img.
#[derive(Debug)]
pub struct Unsupported(pub String);

fn bad(why: impl Into<String>) -> Result<std::convert::Infallible, Unsupported> {
    Err(Unsupported(why.into()))
}

/// An aes-xts-plain64 data key (two AES-256 keys), never Clone or Debug.
pub struct XtsKey {
    data: Aes256,
    tweak: Aes256,
}

impl XtsKey {
    fn new(key: &[u8]) -> Result<Self, Unsupported> {
        if key.len() != 64 {
            bad(format!("{}-byte XTS key", key.len()))?;
        }
        let data = Aes256::new_from_slice(&key[..32]).map_err(|_| Unsupported("key".into()))?;
        let tweak = Aes256::new_from_slice(&key[32..]).map_err(|_| Unsupported("key".into()))?;
        Ok(Self { data, tweak })
    }

    /// Decrypts (`encrypt` false) or encrypts whole sectors in place, the
    /// first one being sector number `first` (plain64 IV). Works on 16
    /// sectors at a time, so that AES runs over long runs of blocks.
    fn apply(&self, buf: &mut [u8], first: u64, encrypt: bool) {
        const PER_SECTOR: usize = SECTOR / 16;
        const BATCH: usize = 16;
        let mut blocks = vec![Array::from([0u8; 16]); BATCH * PER_SECTOR];
        let mut tweaks = vec![0u128; BATCH * PER_SECTOR];
        let mut ivs = [Array::from([0u8; 16]); BATCH];
        let word = |b: &[u8]| {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            u128::from_le_bytes(a)
        };
        for (n, batch) in buf.chunks_mut(BATCH * SECTOR).enumerate() {
            let sectors = batch.len() / SECTOR;
            for (i, iv) in ivs.iter_mut().enumerate().take(sectors) {
                let sector = first + (n * BATCH + i) as u64;
                *iv = Array::from(u128::from(sector).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut ivs[..sectors]);
            for (iv, ts) in ivs
                .iter()
                .zip(tweaks.chunks_exact_mut(PER_SECTOR))
                .take(sectors)
            {
                let mut tw = word(iv);
                for t in ts {
                    *t = tw;
                    // Multiply by x in GF(2^128), little-endian (IEEE 1619).
                    tw = (tw << 1) ^ ((tw >> 127) * 0x87);
                }
            }
            let count = sectors * PER_SECTOR;
            for ((b, chunk), t) in blocks.iter_mut().zip(batch.chunks_exact(16)).zip(&tweaks) {
                *b = Array::from((word(chunk) ^ t).to_le_bytes());
            }
            if encrypt {
                self.data.encrypt_blocks(&mut blocks[..count]);
            } else {
                self.data.decrypt_blocks(&mut blocks[..count]);
            }
            for ((b, chunk), t) in blocks.iter().zip(batch.chunks_exact_mut(16)).zip(&tweaks) {
                chunk.copy_from_slice(&(word(b) ^ t).to_le_bytes());
            }
        }
        for b in blocks.iter_mut().chain(ivs.iter_mut()) {
            b.fill(0);
        }
        tweaks.fill(0);
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// A LUKS1 header as QEMU writes it (aes, xts-plain64, sha256).
struct Luks1 {
    payload_sectors: u64,
    key_bytes: usize,
    mk_digest: [u8; 20],
    mk_salt: [u8; 32],
    mk_iter: u32,
    /// (iterations, salt, key material offset in sectors, stripes)
    slots: Vec<(u32, [u8; 32], u64, usize)>,
}

impl Luks1 {
    fn parse(h: &[u8]) -> Result<Self, Unsupported> {
        if h.len() < 592 || &h[..6] != LUKS_MAGIC {
            bad("no LUKS header")?;
        }
        if u16::from_be_bytes([h[6], h[7]]) != 1 {
            bad("not LUKS version 1")?;
        }
        if cstr(&h[8..40]) != b"aes"
            || cstr(&h[40..72]) != b"xts-plain64"
            || cstr(&h[72..104]) != b"sha256"
        {
            bad("not aes-xts-plain64 with sha256")?;
        }
        let key_bytes = be32(h, 108) as usize;
        if key_bytes != 64 {
            bad("not a 512-bit XTS key")?;
        }
        let mut l = Luks1 {
            payload_sectors: u64::from(be32(h, 104)),
            key_bytes,
            mk_digest: [0; 20],
            mk_salt: [0; 32],
            mk_iter: be32(h, 164),
            slots: vec![],
        };
        l.mk_digest.copy_from_slice(&h[112..132]);
        l.mk_salt.copy_from_slice(&h[132..164]);
        for i in 0..8 {
            let s = 208 + i * 48;
            if be32(h, s) != SLOT_ACTIVE {
                continue;
            }
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&h[s + 8..s + 40]);
            let stripes = be32(h, s + 44) as usize;
            if stripes == 0 || stripes > 64_000 {
                bad("odd keyslot")?;
            }
            l.slots
                .push((be32(h, s + 4), salt, u64::from(be32(h, s + 40)), stripes));
        }
        Ok(l)
    }

    /// The data key, if `passphrase` opens a keyslot of the LUKS region
    /// `region` (header and keyslot material).
    fn unlock_bytes(&self, region: &[u8], passphrase: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        for (iterations, salt, offset, stripes) in &self.slots {
            let start = usize::try_from(*offset).ok()? * SECTOR;
            let len = (self.key_bytes * stripes).div_ceil(SECTOR) * SECTOR;
            let material = region.get(start..start + len)?;
            let mut material = Zeroizing::new(material.to_vec());
            let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes]);
            pbkdf2::pbkdf2_hmac::<Sha256>(passphrase, salt, *iterations, &mut slot_key);
            let k = XtsKey::new(&slot_key).ok()?;
            k.apply(&mut material, 0, false);
            let mk = af_merge(&material[..self.key_bytes * stripes], self.key_bytes);
            let mut digest = [0u8; 20];
            pbkdf2::pbkdf2_hmac::<Sha256>(&mk, &self.mk_salt, self.mk_iter, &mut digest);
            if digest == self.mk_digest {
                return Some(mk);
            }
        }
        None
    }
}

fn random(buf: &mut [u8]) -> Result<(), HvError> {
    getrandom::fill(buf).map_err(|e| HvError(format!("the OS random number generator failed: {e}")))
}

/// Key iterations of the new header: QEMU's minimum. The passphrase is a
/// random 256-bit key, so stretching adds nothing but time at every start.
const NEW_ITERATIONS: u32 = 1000;

/// The LUKS region `old` (header and keyslot material) with a new data key
/// `mk` in keyslot 0 under `passphrase`, a new UUID and digest, the other
/// keyslots disabled and their material replaced by random bytes.
fn new_header(
    old: &[u8],
    luks: &Luks1,
    mk: &[u8],
    passphrase: &[u8],
) -> Result<Result<Zeroizing<Vec<u8>>, Unsupported>, HvError> {
    let mut h = Zeroizing::new(old.to_vec());
    let kb = luks.key_bytes;
    // UUID (40 bytes, NUL-padded text).
    let mut u = [0u8; 16];
    random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let text = uuid::Uuid::from_bytes(u).to_string();
    h[168..208].fill(0);
    h[168..168 + text.len()].copy_from_slice(text.as_bytes());
    // Master key digest.
    let mut salt = [0u8; 32];
    random(&mut salt)?;
    let mut digest = [0u8; 20];
    pbkdf2::pbkdf2_hmac::<Sha256>(mk, &salt, NEW_ITERATIONS, &mut digest);
    h[112..132].copy_from_slice(&digest);
    h[132..164].copy_from_slice(&salt);
    h[164..168].copy_from_slice(&NEW_ITERATIONS.to_be_bytes());
    for i in 0..8 {
        let s = 208 + i * 48;
        let offset = u64::from(be32(&h, s + 40)) as usize * SECTOR;
        let stripes = be32(&h, s + 44) as usize;
        let len = (kb * stripes).div_ceil(SECTOR) * SECTOR;
        if stripes == 0 || offset < 592 || offset + len > h.len() {
            return Ok(Err(Unsupported(
                "keyslot material outside the header".into(),
            )));
        }
        if i > 0 {
            h[s..s + 4].copy_from_slice(&0x0000_DEADu32.to_be_bytes());
            random(&mut h[offset..offset + len])?;
            continue;
        }
        let mut salt = [0u8; 32];
        random(&mut salt)?;
        h[s..s + 4].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
        h[s + 4..s + 8].copy_from_slice(&NEW_ITERATIONS.to_be_bytes());
        h[s + 8..s + 40].copy_from_slice(&salt);
        let mut material = af_split(mk, stripes, len)?;
        let mut slot_key = Zeroizing::new(vec![0u8; kb]);
        pbkdf2::pbkdf2_hmac::<Sha256>(passphrase, &salt, NEW_ITERATIONS, &mut slot_key);
        XtsKey::new(&slot_key)
            .map_err(|u| HvError(u.0))?
            .apply(&mut material, 0, true);
        h[offset..offset + len].copy_from_slice(&material);
    }
    // It must parse and open like any LUKS1 header.
    let _ = Luks1::parse(&h).map_err(|u| HvError(u.0))?;
    Ok(Ok(h))
}

/// LUKS1 anti-forensic split of `mk` into `stripes` stripes, in a
/// zero-padded buffer of `len` bytes (allocated once at its final size:
/// a growing Vec would leave copies of the stripes behind).
fn af_split(mk: &[u8], stripes: usize, len: usize) -> Result<Zeroizing<Vec<u8>>, HvError> {
    let kb = mk.len();
    let mut out = Zeroizing::new(vec![0u8; len.max(kb * stripes)]);
    random(&mut out[..kb * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; kb]);
    for stripe in out[..kb * (stripes - 1)].chunks_exact(kb) {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        diffuse(&mut d);
    }
    for ((b, x), m) in out[kb * (stripes - 1)..kb * stripes]
        .iter_mut()
        .zip(d.iter())
        .zip(mk)
    {
        *b = x ^ m;
    }
    Ok(out)
}

/// LUKS1 anti-forensic merge with SHA-256 diffusion.
fn af_merge(material: &[u8], key_bytes: usize) -> Zeroizing<Vec<u8>> {
    let stripes = material.len() / key_bytes;
    let mut d = Zeroizing::new(vec![0u8; key_bytes]);
    for (i, stripe) in material.chunks_exact(key_bytes).enumerate() {
        for (a, b) in d.iter_mut().zip(stripe) {
            *a ^= b;
        }
        if i + 1 < stripes {
            diffuse(&mut d);
        }
    }
    d
}

fn diffuse(d: &mut [u8]) {
    for (i, chunk) in d.chunks_mut(32).enumerate() {
        let mut h = Sha256::new();
        h.update((i as u32).to_be_bytes());
        h.update(&*chunk);
        let out = h.finalize();
        chunk.copy_from_slice(&out[..chunk.len()]);
    }
}

/// Where the LUKS header is and which bytes of the file are encrypted data.
struct Layout {
    /// Offset and length of the LUKS header (with its keyslots).
    luks: (u64, u64),
    /// Data extents: (file offset, length, first IV sector).
    data: Vec<(u64, u64, u64)>,
    /// Allocated clusters that read as zeros: written as zeros.
    zeroed: Vec<(u64, u64)>,
}

fn read_at(f: &File, at: u64, len: usize) -> Result<Vec<u8>, HvError> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at)
        .map_err(|e| HvError(format!("read at {at}: {e}")))?;
    Ok(b)
}

fn layout(f: &File, format: Format) -> Result<Result<Layout, Unsupported>, HvError> {
    let len = f
        .metadata()
        .map_err(|e| HvError(format!("stat: {e}")))?
        .len();
    match format {
        Format::Raw => {
            let h = read_at(f, 0, 592)?;
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
        Format::Qcow2 => qcow2_layout(f, len),
    }
}

fn qcow2_layout(f: &File, len: u64) -> Result<Result<Layout, Unsupported>, HvError> {
    let h = read_at(f, 0, 104.min(len as usize))?;
    macro_rules! no {
        ($why:expr) => {
            return Ok(Err(Unsupported($why.into())))
        };
    }
    if h.len() < 72 || &h[..4] != b"QFI\xfb" {
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
    // Header extensions, up to the end marker (type 0).
    let ext = read_at(f, header_len, (cluster - header_len) as usize)?;
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
    if l1_size > (64 << 20) / 8 {
        no!("L1 table size");
    }
    let l1 = read_at(f, l1_offset, (l1_size * 8) as usize)?;
    let entries_per_l2 = cluster / 8;
    let mut data = vec![];
    let mut zeroed = vec![];
    for l1e in l1.chunks_exact(8) {
        let l2_offset =
            u64::from_be_bytes(l1e.try_into().unwrap_or([0; 8])) & 0x00ff_ffff_ffff_fe00;
        if l2_offset == 0 {
            continue;
        }
        let l2 = read_at(f, l2_offset, cluster as usize)?;
        for e in l2.chunks_exact(8).take(entries_per_l2 as usize) {
            let e = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
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

/// Writes `PATH.gk-rekey`: `path` re-encrypted from passphrase `old` to
/// `new` (a new data key), checked. `Ok(Err(_))` when the fast path does not
/// apply to this image (nothing written).
/// At most `bandwidth` bytes/s are written (0: no limit).
pub fn deep_rekey_copy(
    path: &str,
    format: Format,
    old: &[u8],
    new: &[u8],
    bandwidth: u64,
) -> Result<Result<String, Unsupported>, HvError> {
    let t0 = std::time::Instant::now();
    let src = File::open(path).map_err(|e| HvError(format!("{path}: {e}")))?;
    let lay = match layout(&src, format)? {
        Ok(l) => l,
        Err(u) => return Ok(Err(u)),
    };
    let old_region = read_at(&src, lay.luks.0, lay.luks.1 as usize)?;
    let old_luks = match Luks1::parse(&old_region) {
        Ok(l) => l,
        Err(u) => return Ok(Err(u)),
    };
    let Some(old_mk) = old_luks.unlock_bytes(&old_region, old) else {
        return Err(HvError(format!("the current key does not open {path}")));
    };

    // A new header in the old one's layout: a new random data key in slot 0
    // under the new passphrase, the other slots off and their key material
    // overwritten with random bytes.
    let tmp = format!("{path}.gk-rekey");
    let mut new_mk = Zeroizing::new(vec![0u8; old_luks.key_bytes]);
    random(&mut new_mk)?;
    let new_header = match new_header(&old_region, &old_luks, &new_mk, new)? {
        Ok(h) => h,
        Err(u) => return Ok(Err(u)),
    };
    // Our header must give back our key.
    match Luks1::parse(&new_header).map(|l| l.unlock_bytes(&new_header, new)) {
        Ok(Some(k)) if *k == *new_mk => {}
        _ => {
            return Err(HvError(
                "the new LUKS header does not open with the new key".into(),
            ));
        }
    }
    let old_key = XtsKey::new(&old_mk).map_err(|u| HvError(u.0))?;
    let new_key = XtsKey::new(&new_mk).map_err(|u| HvError(u.0))?;
    drop((old_mk, new_mk));

    let t_keys = t0.elapsed();
    // One pass: copy, re-encrypting the data extents. Reading, the
    // crypto (on every core) and writing overlap: three stages with two
    // chunks in flight between them.
    let _ = std::fs::remove_file(&tmp);
    let out = File::create(&tmp).map_err(|e| HvError(format!("{tmp}: {e}")))?;
    let len = src
        .metadata()
        .map_err(|e| HvError(format!("{path}: {e}")))?
        .len();
    let mut plain_hash = Sha256::new();
    let shown = crate::progress::Tracker::start(path, "re-encrypting", len);
    let (to_work, work_in) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(2);
    let (to_write, write_in) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(2);
    let (recycle, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    let (read_result, write_result) = std::thread::scope(|sc| {
        let src = &src;
        let reader = sc.spawn(move || {
            let mut pos = 0u64;
            while pos < len {
                let n = (len - pos).min(CHUNK as u64) as usize;
                let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
                buf.resize(n, 0);
                src.read_exact_at(&mut buf, pos)
                    .map_err(|e| HvError(format!("{path}: {e}")))?;
                if to_work.send((pos, buf)).is_err() {
                    break;
                }
                pos += n as u64;
            }
            drop(to_work);
            Ok::<u64, HvError>(pos)
        });
        let (out, tmp, shown) = (&out, &tmp, &shown);
        let started = std::time::Instant::now();
        let writer = sc.spawn(move || {
            let mut written = 0u64;
            for (pos, mut buf) in write_in {
                // All-zero pieces stay holes: a thin image stays thin.
                let mut at = 0usize;
                for piece in buf.chunks(ZERO_RUN) {
                    if piece.iter().any(|&b| b != 0) {
                        out.write_all_at(piece, pos + at as u64)
                            .map_err(|e| HvError(format!("{tmp}: {e}")))?;
                    }
                    at += piece.len();
                }
                written += buf.len() as u64;
                shown.set(written, len);
                if bandwidth > 0 {
                    // Not ahead of `bandwidth` bytes per second.
                    let due = std::time::Duration::from_secs_f64(written as f64 / bandwidth as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                buf.fill(0);
                let _ = recycle.send(buf);
            }
            out.set_len(len)
                .and_then(|()| out.sync_all())
                .map_err(|e| HvError(format!("{tmp}: {e}")))?;
            Ok::<u64, HvError>(written)
        });
        for (pos, mut buf) in work_in {
            // The LUKS header region: the new one.
            overlay(&mut buf, pos, lay.luks.0, &new_header);
            for &(at, l) in &lay.zeroed {
                zero(&mut buf, pos, at, l);
            }
            transform(
                &mut buf,
                pos,
                &lay.data,
                &old_key,
                Some(&new_key),
                &mut plain_hash,
            );
            if to_write.send((pos, buf)).is_err() {
                break;
            }
        }
        drop(to_write);
        (reader.join(), writer.join())
    });
    let joined = |r: std::thread::Result<Result<u64, HvError>>| {
        r.map_err(|_| HvError("a re-encryption thread panicked".into()))?
    };
    let (read, written) = (joined(read_result)?, joined(write_result)?);
    if read != len || written != len {
        let _ = std::fs::remove_file(&tmp);
        return Err(HvError(format!(
            "the re-encrypted copy of {path} is incomplete ({written} of {len} bytes)"
        )));
    }
    let expected = plain_hash.finalize();
    let t_pass = t0.elapsed();

    // Check 1: the copy decrypts, with the new data key, to the same data.
    shown.phase("checking the copy", len);
    let copy = File::open(&tmp).map_err(|e| HvError(format!("{tmp}: {e}")))?;
    let mut check = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(CHUNK as u64) as usize;
        copy.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| HvError(format!("{tmp}: {e}")))?;
        transform(&mut buf[..n], pos, &lay.data, &new_key, None, &mut check);
        pos += n as u64;
        shown.set(pos, len);
    }
    buf.fill(0);
    if check.finalize() != expected {
        let _ = std::fs::remove_file(&tmp);
        return Err(HvError(format!(
            "the re-encrypted copy of {path} does not read back the same"
        )));
    }
    let t_check = t0.elapsed();
    // Check 2: QEMU opens it with the new passphrase only, and reads the
    // same data from both images.
    let fail = |why: String| {
        let _ = std::fs::remove_file(&tmp);
        Err(HvError(why))
    };
    if !crate::luks::opens_with(&tmp, format, new)? || crate::luks::opens_with(&tmp, format, old)? {
        return fail(format!(
            "QEMU does not open the re-encrypted copy of {path} with the new key only"
        ));
    }
    let size = crate::luks::virtual_size(path)?;
    if !crate::luks::samples_agree(path, old, &tmp, new, format, size)? {
        return fail(format!(
            "QEMU reads different data from the re-encrypted copy of {path}"
        ));
    }
    tracing::debug!(
        %path,
        keys_ms = t_keys.as_millis() as u64,
        pass_ms = (t_pass - t_keys).as_millis() as u64,
        readback_ms = (t_check - t_pass).as_millis() as u64,
        qemu_checks_ms = (t0.elapsed() - t_check).as_millis() as u64,
        "re-encrypted copy written and checked"
    );
    Ok(Ok(tmp))
}

/// Copies `header` over the part of `chunk` (at file offset `pos`) that
/// overlaps `[at, at + header.len())`.
fn overlay(chunk: &mut [u8], pos: u64, at: u64, header: &[u8]) {
    let (s, e) = (
        at.max(pos),
        (at + header.len() as u64).min(pos + chunk.len() as u64),
    );
    if s < e {
        chunk[(s - pos) as usize..(e - pos) as usize]
            .copy_from_slice(&header[(s - at) as usize..(e - at) as usize]);
    }
}

fn zero(chunk: &mut [u8], pos: u64, at: u64, len: u64) {
    let (s, e) = (at.max(pos), (at + len).min(pos + chunk.len() as u64));
    if s < e {
        chunk[(s - pos) as usize..(e - pos) as usize].fill(0);
    }
}

/// Decrypts the data sectors of `chunk` (at file offset `pos`) with `dec`,
/// hashes the plaintext in file order into `plain`, and encrypts them again
/// with `enc` if given; on all cores.
fn transform(
    chunk: &mut [u8],
    pos: u64,
    data: &[(u64, u64, u64)],
    dec: &XtsKey,
    enc: Option<&XtsKey>,
    plain: &mut Sha256,
) {
    let end = pos + chunk.len() as u64;
    // The data extents overlapping this chunk, as (range in chunk, IV).
    let first = data.partition_point(|&(at, l, _)| at + l <= pos);
    let mut parts: Vec<(&mut [u8], u64)> = vec![];
    let mut rest: &mut [u8] = chunk;
    let mut rest_at = pos;
    for &(at, l, iv) in data[first..].iter().take_while(|&&(at, _, _)| at < end) {
        let s = at.max(pos);
        let e = (at + l).min(end);
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((s - rest_at) as usize);
        let (mine, tail) = tail.split_at_mut((e - s) as usize);
        parts.push((mine, iv + (s - at) / SECTOR as u64));
        rest = tail;
        rest_at = e;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let total: usize = parts.iter().map(|(p, _)| p.len()).sum();
    let parallel = |parts: &mut Vec<(&mut [u8], u64)>, key: &XtsKey, encrypt: bool| {
        let work = |pieces: &mut [(&mut [u8], u64)]| {
            for (p, iv) in pieces.iter_mut() {
                key.apply(p, *iv, encrypt);
            }
        };
        if threads > 1 && total >= 1 << 20 {
            // Split by bytes, not by extents: one big raw LUKS extent too.
            let mut pieces: Vec<(&mut [u8], u64)> = vec![];
            let per = (total / threads).div_ceil(SECTOR) * SECTOR;
            for (p, iv) in parts.iter_mut() {
                let mut rest: &mut [u8] = p;
                let mut at = *iv;
                while rest.len() > per {
                    let (a, b) = std::mem::take(&mut rest).split_at_mut(per);
                    pieces.push((a, at));
                    at += (per / SECTOR) as u64;
                    rest = b;
                }
                pieces.push((rest, at));
            }
            let n = pieces.len().div_ceil(threads).max(1);
            std::thread::scope(|sc| {
                for piece in pieces.chunks_mut(n) {
                    sc.spawn(|| work(piece));
                }
            });
        } else {
            work(parts);
        }
    };
    parallel(&mut parts, dec, false);
    for (p, _) in &parts {
        plain.update(&**p);
    }
    if let Some(enc) = enc {
        parallel(&mut parts, enc, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IEEE 1619-2007 XTS-AES-256 test vector 10 (first sector).
    #[test]
    fn xts_matches_the_ieee_vector() {
        let mut key = [0u8; 64];
        let k1 = hex::decode("2718281828459045235360287471352662497757247093699959574966967627")
            .unwrap_or_default();
        let k2 = hex::decode("3141592653589793238462643383279502884197169399375105820974944592")
            .unwrap_or_default();
        key[..32].copy_from_slice(&k1);
        key[32..].copy_from_slice(&k2);
        let k = XtsKey::new(&key)
            .map_err(|u| u.0)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut sector: Vec<u8> = (0..512).map(|i| i as u8).collect();
        k.apply(&mut sector, 0xff, true);
        assert_eq!(
            hex::encode(&sector[..32]),
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
        );
        k.apply(&mut sector, 0xff, false);
        assert!(sector.iter().enumerate().all(|(i, b)| *b == i as u8));
    }
}
