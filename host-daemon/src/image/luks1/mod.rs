//! guestkeyd's own LUKS1 code: new images ([`create`]), keyslot
//! replacement in place for shallow rekeys ([`keyslots`]), and the offline
//! deep rekey below.
//!
//! `qemu-img convert` re-encrypts at a fraction of the disk's speed (QEMU's
//! AES-XTS runs in one thread), so guestkeyd re-encrypts the images it
//! creates itself, with AES-NI through the `aes` crate, on every core, in
//! one sequential pass:
//!
//! 1. the old LUKS1 header is unlocked with the old passphrase to get the
//!    old data key ([`header`]);
//! 2. a new header in the same layout gets a new random data key in
//!    keyslot 0 under the new passphrase, the other keyslots disabled and
//!    their material overwritten with zeros;
//! 3. the copy is the old file byte for byte, except the LUKS header and
//!    the data sectors ([`layout`]), each decrypted with the old data key
//!    and encrypted with the new one ([`xts`], aes-xts-plain64: the IV is
//!    the sector number, of the payload for raw LUKS and of the host file
//!    for qcow2 with LUKS inside);
//! 4. each chunk of the copy is read back as soon as it is written (the
//!    same pass, overlapping it), decrypted with the new key, and must be
//!    the plaintext seen in step 3, byte for byte.
//!
//! The caller ([`crate::image`]) then has QEMU open the copy with the new
//! passphrase only and compare sample reads of both images, swaps it in
//! and wipes the old image. Anything this module does not know (other
//! ciphers or hashes, LUKS2, qcow2 snapshots, backing files, compressed or
//! extended-L2 clusters) makes it decline, and the caller uses
//! `qemu-img convert` instead.
//!
//! Imports only [`crate::model`], [`crate::progress`] and the image error.

pub mod create;
pub mod header;
pub mod keyslots;
pub mod layout;
pub mod recovery;
pub mod xts;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use self::header::{Luks1, new_header};
use self::layout::{layout, read_at};
use self::xts::{SECTOR, XtsKey};
use crate::image::ImageError;
use crate::model::Format;

/// Bytes read, transformed and written at a time.
const CHUNK: usize = 4 << 20;
/// Zero runs of this size are not written (they stay holes).
const ZERO_RUN: usize = 64 << 10;

/// Why the fast path does not apply; the caller falls back to qemu-img.
#[derive(Debug)]
pub struct Unsupported(pub String);

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

/// Writes into the empty file `dst` the image `src` re-encrypted from
/// passphrase `old` to `new` (a new data key), read back and checked.
/// `Ok(Err(_))` when the fast path does not apply (nothing written). At
/// most `bandwidth` bytes/s are written (0: no limit). `path` names the
/// image in messages and progress.
pub fn reencrypt(
    src: &File,
    dst: &File,
    format: Format,
    old: &[u8],
    new: &[u8],
    bandwidth: u64,
    path: &str,
) -> Result<Result<(), Unsupported>, ImageError> {
    let t0 = std::time::Instant::now();
    let len = src.metadata().map_err(io("inspect", path))?.len();
    let lay = match layout(src, len, format, path)? {
        Ok(l) => l,
        Err(u) => return Ok(Err(u)),
    };
    let old_region = read_at(src, lay.luks.0, lay.luks.1 as usize, path)?;
    let old_luks = match Luks1::parse(&old_region) {
        Ok(l) => l,
        Err(u) => return Ok(Err(u)),
    };
    let Some(old_mk) = old_luks.unlock(&old_region, old) else {
        return Err(ImageError::Check(format!(
            "the current key does not open {path}"
        )));
    };
    let new_mk = crate::image::new_data_key(old_luks.key_bytes)?;
    let new_header = match new_header(&old_region, &old_luks, &new_mk, new)? {
        Ok(h) => h,
        Err(u) => return Ok(Err(u)),
    };
    // Our header must give back our key.
    match Luks1::parse(&new_header).map(|l| l.unlock(&new_header, new)) {
        Ok(Some(k)) if *k == *new_mk => {}
        _ => {
            return Err(ImageError::Check(
                "the new LUKS header does not open with the new key".into(),
            ));
        }
    }
    let bad_key = |l: xts::BadKeyLength| ImageError::Check(format!("a {}-byte data key", l.0));
    let old_key = XtsKey::new(&old_mk).map_err(bad_key)?;
    let new_key = XtsKey::new(&new_mk).map_err(bad_key)?;
    drop((old_mk, new_mk));
    let t_keys = t0.elapsed();

    let shown = crate::progress::Tracker::start(path, "re-encrypting", len);
    let same = pass(
        src,
        dst,
        len,
        &lay,
        &new_header,
        &old_key,
        &new_key,
        bandwidth,
        &shown,
        path,
    )?;
    let t_pass = t0.elapsed();
    if !same {
        return Err(ImageError::Check(format!(
            "the re-encrypted copy of {path} does not read back the same"
        )));
    }
    tracing::debug!(
        %path,
        keys_ms = t_keys.as_millis() as u64,
        pass_ms = (t_pass - t_keys).as_millis() as u64,
        "re-encrypted copy written and read back"
    );
    Ok(Ok(()))
}

/// One pass: copy `src` into `dst`, the LUKS header replaced and the data
/// extents re-encrypted, and every chunk read back from `dst` as soon as
/// it is written, decrypted with the new key and compared with the
/// plaintext it was made from. Reading, the crypto (on every core),
/// writing and the read-back overlap: four stages with two chunks in flight
/// between each two. `Ok(false)`: a chunk did not read back the same.
#[allow(clippy::too_many_arguments)] // the pass's inputs, each named once
fn pass(
    src: &File,
    dst: &File,
    len: u64,
    lay: &layout::Layout,
    new_header: &[u8],
    old_key: &XtsKey,
    new_key: &XtsKey,
    bandwidth: u64,
    shown: &crate::progress::Tracker,
    path: &str,
) -> Result<bool, ImageError> {
    // Its whole length first: pieces left as holes read back as zeros.
    dst.set_len(len).map_err(io("write of the copy of", path))?;
    // Read once from start to end: the kernel may read far ahead.
    let _ = rustix::fs::fadvise(src, 0, None, rustix::fs::Advice::Sequential);
    // A chunk, and (after the crypto stage) the plaintext it holds.
    type Chunk = (u64, Vec<u8>, Vec<u8>);
    let (to_work, work_in) = std::sync::mpsc::sync_channel::<Chunk>(2);
    let (to_write, write_in) = std::sync::mpsc::sync_channel::<Chunk>(2);
    let (to_check, check_in) = std::sync::mpsc::sync_channel::<Chunk>(2);
    let (recycle, spare) = std::sync::mpsc::channel::<(Vec<u8>, Vec<u8>)>();
    let (read_result, write_result, check_result) = std::thread::scope(|sc| {
        let reader = sc.spawn(move || {
            let mut pos = 0u64;
            while pos < len {
                let n = (len - pos).min(CHUNK as u64) as usize;
                let (mut buf, plain) = spare
                    .try_recv()
                    .unwrap_or_else(|_| (vec![0u8; CHUNK], vec![0u8; CHUNK]));
                buf.resize(n, 0);
                src.read_exact_at(&mut buf, pos)
                    .map_err(io("read of", path))?;
                if to_work.send((pos, buf, plain)).is_err() {
                    break;
                }
                pos += n as u64;
            }
            drop(to_work);
            Ok::<u64, ImageError>(pos)
        });
        let started = std::time::Instant::now();
        let writer = sc.spawn(move || {
            let mut written = 0u64;
            let (mut writing, mut handing) = (Duration::ZERO, Duration::ZERO);
            for (pos, buf, plain) in write_in {
                let t = Instant::now();
                // All-zero pieces stay holes: a thin image stays thin.
                let mut at = 0usize;
                for piece in buf.chunks(ZERO_RUN) {
                    if piece.iter().any(|&b| b != 0) {
                        dst.write_all_at(piece, pos + at as u64)
                            .map_err(io("write of the copy of", path))?;
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
                writing += t.elapsed();
                let t = Instant::now();
                if to_check.send((pos, buf, plain)).is_err() {
                    break;
                }
                handing += t.elapsed();
            }
            drop(to_check);
            let t = Instant::now();
            dst.sync_all().map_err(io("write of the copy of", path))?;
            tracing::debug!(
                %path,
                write_ms = writing.as_millis() as u64,
                waiting_for_read_back_ms = handing.as_millis() as u64,
                sync_ms = t.elapsed().as_millis() as u64,
                "writing stage"
            );
            Ok::<u64, ImageError>(written)
        });
        let checker = sc.spawn(move || {
            // What the copy holds, decrypted with the new data key, must be
            // the plaintext the chunk was made from.
            let mut checked = 0u64;
            let mut same = true;
            let (mut reading, mut checking) = (Duration::ZERO, Duration::ZERO);
            for (pos, mut buf, mut plain) in check_in {
                let t = Instant::now();
                dst.read_exact_at(&mut buf, pos)
                    .map_err(io("read back of the copy of", path))?;
                reading += t.elapsed();
                let t = Instant::now();
                crypt(&mut buf, pos, &lay.data, new_key, false);
                same &= buf == plain;
                checking += t.elapsed();
                checked += buf.len() as u64;
                buf.fill(0);
                plain.fill(0);
                let _ = recycle.send((buf, plain));
                if !same {
                    break;
                }
            }
            tracing::debug!(
                %path,
                read_back_ms = reading.as_millis() as u64,
                check_ms = checking.as_millis() as u64,
                "read-back stage"
            );
            Ok::<(u64, bool), ImageError>((checked, same))
        });
        let (mut starved, mut crypto, mut blocked) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut t = Instant::now();
        for (pos, mut buf, mut plain) in work_in.iter() {
            starved += t.elapsed();
            t = Instant::now();
            overlay(&mut buf, pos, lay.luks.0, new_header);
            for &(at, l) in &lay.zeroed {
                zero(&mut buf, pos, at, l);
            }
            crypt(&mut buf, pos, &lay.data, old_key, false);
            plain.clear();
            plain.extend_from_slice(&buf);
            crypt(&mut buf, pos, &lay.data, new_key, true);
            crypto += t.elapsed();
            t = Instant::now();
            if to_write.send((pos, buf, plain)).is_err() {
                break;
            }
            blocked += t.elapsed();
            t = Instant::now();
        }
        drop(to_write);
        tracing::debug!(
            %path,
            waiting_for_reads_ms = starved.as_millis() as u64,
            crypto_ms = crypto.as_millis() as u64,
            waiting_for_writes_ms = blocked.as_millis() as u64,
            "re-encrypting stage"
        );
        (reader.join(), writer.join(), checker.join())
    });
    let panicked = || ImageError::Check("a re-encryption thread panicked".into());
    let read = read_result.map_err(|_| panicked())??;
    let written = write_result.map_err(|_| panicked())??;
    let (checked, same) = check_result.map_err(|_| panicked())??;
    if !same {
        return Ok(false);
    }
    if read != len || written != len || checked != len {
        return Err(ImageError::Check(format!(
            "the re-encrypted copy of {path} is incomplete ({written} of {len} bytes written, {checked} read back)"
        )));
    }
    Ok(true)
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

/// Encrypts (`encrypt`) or decrypts the data sectors of `chunk` (at file
/// offset `pos`) with `key`, on all cores.
fn crypt(chunk: &mut [u8], pos: u64, data: &[(u64, u64, u64)], key: &XtsKey, encrypt: bool) {
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
    parallel(&mut parts, key, encrypt);
}
