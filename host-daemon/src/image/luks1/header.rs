//! The LUKS1 on-disk header as QEMU and cryptsetup write it for
//! aes-xts-plain64 with sha256: parsing, unlocking a keyslot (PBKDF2,
//! keyslot decryption, anti-forensic merge, master key digest), and
//! writing a new header in the same layout with a new data key.
//!
//! Proven against cryptsetup in the tests: headers cryptsetup makes are
//! parsed and unlocked to the data key cryptsetup dumps, and headers this
//! module writes pass `cryptsetup luksDump` and `--test-passphrase` and
//! dump the data key that was put in.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::Unsupported;
use super::xts::{SECTOR, XtsKey};
use crate::image::ImageError;

const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Bytes of the fixed header before the keyslot material.
pub const HEADER_LEN: usize = 592;

/// Key iterations of a new header: QEMU's and LUKS1's minimum. The
/// passphrase is a random 256-bit key, so stretching adds nothing but time
/// at every guest start.
const NEW_ITERATIONS: u32 = 1000;

/// The most PBKDF2 iterations a header read here may ask for, in a keyslot
/// or for the data key digest: about 20 times what cryptsetup or QEMU
/// calibrate to on a fast machine. A header asking more (up to 2^32) would
/// make whoever opens it (guestkeyd, guestkey-recover) compute for an hour.
pub const MAX_ITERATIONS: u32 = 1 << 26;

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// One active keyslot.
struct Slot {
    /// Its number (0-7).
    index: usize,
    iterations: u32,
    salt: [u8; 32],
    /// Key material offset, in sectors.
    offset: u64,
    stripes: usize,
}

/// A parsed LUKS1 header.
pub struct Luks1 {
    /// Payload offset, in sectors.
    pub payload_sectors: u64,
    /// Data key length (64: AES-256-XTS).
    pub key_bytes: usize,
    mk_digest: [u8; 20],
    mk_salt: [u8; 32],
    mk_iter: u32,
    slots: Vec<Slot>,
}

fn bad(why: &str) -> Unsupported {
    Unsupported(why.to_owned())
}

fn check_iterations(n: u32, of: &str) -> Result<(), Unsupported> {
    if n == 0 || n > MAX_ITERATIONS {
        return Err(Unsupported(format!(
            "{of} asks for {n} PBKDF2 iterations (1 to {MAX_ITERATIONS} are read)"
        )));
    }
    Ok(())
}

impl Luks1 {
    /// Parses the header at the start of `h`; anything but LUKS1 with
    /// aes-xts-plain64, sha256 and a 512-bit key is declined.
    pub fn parse(h: &[u8]) -> Result<Self, Unsupported> {
        if h.len() < HEADER_LEN || &h[..6] != LUKS_MAGIC {
            return Err(bad("no LUKS header"));
        }
        if u16::from_be_bytes([h[6], h[7]]) != 1 {
            return Err(bad("not LUKS version 1"));
        }
        if cstr(&h[8..40]) != b"aes"
            || cstr(&h[40..72]) != b"xts-plain64"
            || cstr(&h[72..104]) != b"sha256"
        {
            return Err(bad("not aes-xts-plain64 with sha256"));
        }
        let key_bytes = be32(h, 108) as usize;
        if key_bytes != 64 {
            return Err(bad("not a 512-bit XTS key"));
        }
        let mut l = Luks1 {
            payload_sectors: u64::from(be32(h, 104)),
            key_bytes,
            mk_digest: [0; 20],
            mk_salt: [0; 32],
            mk_iter: be32(h, 164),
            slots: vec![],
        };
        check_iterations(l.mk_iter, "the data key digest")?;
        l.mk_digest.copy_from_slice(&h[112..132]);
        l.mk_salt.copy_from_slice(&h[132..164]);
        for i in 0..8 {
            let s = 208 + i * 48;
            match be32(h, s) {
                SLOT_ACTIVE => {}
                SLOT_INACTIVE => continue,
                _ => return Err(bad("a keyslot is neither active nor inactive")),
            }
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&h[s + 8..s + 40]);
            let stripes = be32(h, s + 44) as usize;
            if stripes == 0 || stripes > 64_000 {
                return Err(bad("odd keyslot"));
            }
            let iterations = be32(h, s + 4);
            check_iterations(iterations, &format!("keyslot {i}"))?;
            l.slots.push(Slot {
                index: i,
                iterations,
                salt,
                offset: u64::from(be32(h, s + 40)),
                stripes,
            });
        }
        Ok(l)
    }

    /// The data key, if `passphrase` opens a keyslot of the LUKS region
    /// `region` (header and keyslot material).
    pub fn unlock(&self, region: &[u8], passphrase: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        self.unlock_slot(region, passphrase).map(|(_, mk)| mk)
    }

    /// The number of the keyslot `passphrase` opens, and the data key.
    pub fn unlock_slot(
        &self,
        region: &[u8],
        passphrase: &[u8],
    ) -> Option<(usize, Zeroizing<Vec<u8>>)> {
        for slot in &self.slots {
            let start = usize::try_from(slot.offset).ok()?.checked_mul(SECTOR)?;
            let len = (self.key_bytes * slot.stripes).div_ceil(SECTOR) * SECTOR;
            let material = region.get(start..start.checked_add(len)?)?;
            let mut material = Zeroizing::new(material.to_vec());
            let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes]);
            pbkdf2::pbkdf2_hmac::<Sha256>(passphrase, &slot.salt, slot.iterations, &mut slot_key);
            let k = XtsKey::new(&slot_key).ok()?;
            k.apply(&mut material, 0, false);
            let mk = af_merge(&material[..self.key_bytes * slot.stripes], self.key_bytes);
            let mut digest = Zeroizing::new([0u8; 20]);
            pbkdf2::pbkdf2_hmac::<Sha256>(&mk, &self.mk_salt, self.mk_iter, digest.as_mut());
            if bool::from(digest.as_slice().ct_eq(&self.mk_digest[..])) {
                return Some((slot.index, mk));
            }
        }
        None
    }

    /// Whether `mk` is this header's data key (its digest matches).
    pub fn is_data_key(&self, mk: &[u8]) -> bool {
        if mk.len() != self.key_bytes {
            return false;
        }
        let mut digest = Zeroizing::new([0u8; 20]);
        pbkdf2::pbkdf2_hmac::<Sha256>(mk, &self.mk_salt, self.mk_iter, digest.as_mut());
        bool::from(digest.as_slice().ct_eq(&self.mk_digest[..]))
    }

    /// The numbers of the active keyslots.
    pub fn active(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.index).collect()
    }
}

/// A LUKS region (header and keyslot material) in wiped memory.
pub type Region = Zeroizing<Vec<u8>>;

/// Bytes of a region: (offset, length).
pub type Extent = (usize, usize);

/// Where keyslot `i`'s material is in the region: (offset, length) in
/// bytes, checked against the region's length.
pub fn slot_material(
    region: &[u8],
    key_bytes: usize,
    i: usize,
) -> Result<(usize, usize), Unsupported> {
    let s = 208 + i * 48;
    let offset = u64::from(be32(region, s + 40)) as usize * SECTOR;
    let stripes = be32(region, s + 44) as usize;
    let len = (key_bytes * stripes).div_ceil(SECTOR) * SECTOR;
    if stripes == 0 || offset < HEADER_LEN || offset + len > region.len() {
        return Err(bad("keyslot material outside the header"));
    }
    Ok((offset, len))
}

/// `region` with the data key `mk` put in its first inactive keyslot under
/// `passphrase` ([`NEW_ITERATIONS`]); returns the keyslot's number too.
/// The other keyslots are left as they are.
pub fn add_keyslot(
    region: &[u8],
    luks: &Luks1,
    mk: &[u8],
    passphrase: &[u8],
) -> Result<Result<(Region, usize), Unsupported>, ImageError> {
    let active = luks.active();
    let Some(i) = (0..8).find(|i| !active.contains(i)) else {
        return Ok(Err(bad("no free keyslot")));
    };
    let mut h = Zeroizing::new(region.to_vec());
    let (offset, len) = match slot_material(&h, luks.key_bytes, i) {
        Ok(m) => m,
        Err(u) => return Ok(Err(u)),
    };
    let stripes = be32(&h, 208 + i * 48 + 44) as usize;
    put_slot(&mut h, i, (offset, len), stripes, mk, passphrase)?;
    Ok(Ok((h, i)))
}

/// Writes keyslot `i` (material at `(offset, len)`, `stripes` stripes) for
/// `mk` under `passphrase` into the region `h`.
fn put_slot(
    h: &mut [u8],
    i: usize,
    (offset, len): (usize, usize),
    stripes: usize,
    mk: &[u8],
    passphrase: &[u8],
) -> Result<(), ImageError> {
    let s = 208 + i * 48;
    let mut salt = [0u8; 32];
    random(&mut salt)?;
    h[s..s + 4].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
    h[s + 4..s + 8].copy_from_slice(&NEW_ITERATIONS.to_be_bytes());
    h[s + 8..s + 40].copy_from_slice(&salt);
    let mut material = af_split(mk, stripes, len)?;
    let mut slot_key = Zeroizing::new(vec![0u8; mk.len()]);
    pbkdf2::pbkdf2_hmac::<Sha256>(passphrase, &salt, NEW_ITERATIONS, &mut slot_key);
    XtsKey::new(&slot_key)
        .map_err(|l| ImageError::Check(format!("a {}-byte keyslot key", l.0)))?
        .apply(&mut material, 0, true);
    h[offset..offset + len].copy_from_slice(&material);
    Ok(())
}

/// `region` with every keyslot but `keep` disabled and their material
/// replaced by random bytes; also the ranges of the material replaced.
pub fn drop_keyslots_but(
    region: &[u8],
    luks: &Luks1,
    keep: usize,
) -> Result<Result<(Region, Vec<Extent>), Unsupported>, ImageError> {
    let mut h = Zeroizing::new(region.to_vec());
    let mut wiped = vec![];
    for i in luks.active().into_iter().filter(|&i| i != keep) {
        let (offset, len) = match slot_material(&h, luks.key_bytes, i) {
            Ok(m) => m,
            Err(u) => return Ok(Err(u)),
        };
        let s = 208 + i * 48;
        h[s..s + 4].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
        h[s + 4..s + 40].fill(0);
        random(&mut h[offset..offset + len])?;
        wiped.push((offset, len));
    }
    Ok(Ok((h, wiped)))
}

fn random(buf: &mut [u8]) -> Result<(), ImageError> {
    getrandom::fill(buf).map_err(|e| ImageError::Random(e.to_string()))
}

/// Gives the header `h` a new UUID and the digest of the data key `mk`
/// (with a new salt, [`NEW_ITERATIONS`]).
fn identity(h: &mut [u8], mk: &[u8]) -> Result<(), ImageError> {
    // UUID (40 bytes, NUL-padded text).
    let mut u = [0u8; 16];
    random(&mut u)?;
    let text = uuid::Builder::from_random_bytes(u)
        .into_uuid()
        .hyphenated()
        .to_string();
    h[168..208].fill(0);
    h[168..168 + text.len()].copy_from_slice(text.as_bytes());
    let mut salt = [0u8; 32];
    random(&mut salt)?;
    let mut digest = [0u8; 20];
    pbkdf2::pbkdf2_hmac::<Sha256>(mk, &salt, NEW_ITERATIONS, &mut digest);
    h[112..132].copy_from_slice(&digest);
    h[132..164].copy_from_slice(&salt);
    h[164..168].copy_from_slice(&NEW_ITERATIONS.to_be_bytes());
    Ok(())
}

/// The LUKS region `old` (header and keyslot material) with the data key
/// `mk` in keyslot 0 under `passphrase`, a new UUID and digest, the other
/// keyslots disabled and their material replaced by zeros.
pub fn new_header(
    old: &[u8],
    luks: &Luks1,
    mk: &[u8],
    passphrase: &[u8],
) -> Result<Result<Zeroizing<Vec<u8>>, Unsupported>, ImageError> {
    let mut h = Zeroizing::new(old.to_vec());
    let kb = luks.key_bytes;
    identity(&mut h, mk)?;
    for i in 0..8 {
        let (offset, len) = match slot_material(&h, kb, i) {
            Ok(m) => m,
            Err(u) => return Ok(Err(u)),
        };
        if i > 0 {
            let s = 208 + i * 48;
            h[s..s + 4].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
            // Whatever it held (the old data key under another passphrase)
            // is gone; zeros keep the copy thin.
            h[offset..offset + len].fill(0);
            continue;
        }
        let stripes = be32(&h, 208 + 44) as usize;
        put_slot(&mut h, 0, (offset, len), stripes, mk, passphrase)?;
    }
    // It must parse like any LUKS1 header.
    if let Err(u) = Luks1::parse(&h) {
        return Err(ImageError::Check(format!(
            "the new LUKS header does not parse: {}",
            u.0
        )));
    }
    Ok(Ok(h))
}

/// The UUID written in the header `h` (text, as `cryptsetup luksUUID`
/// prints it; empty when none).
pub fn uuid_of(h: &[u8]) -> String {
    String::from_utf8_lossy(cstr(&h[168..208])).into_owned()
}

/// Writes `uuid` (a canonical UUID) into the header `h`.
pub fn set_uuid(h: &mut [u8], uuid: &uuid::Uuid) {
    let text = uuid.hyphenated().to_string();
    h[168..208].fill(0);
    h[168..168 + text.len()].copy_from_slice(text.as_bytes());
}

/// Payload offset, in sectors, of the headers [`fresh_header`] writes
/// (QEMU's layout: 4040).
pub fn fresh_payload() -> u64 {
    u64::from(fresh_payload_sectors())
}

/// Anti-forensic stripes of a new keyslot (LUKS1's and QEMU's choice).
const NEW_STRIPES: u32 = 4000;
/// Keyslot material starts at 4096-byte boundaries, as QEMU lays it out.
const ALIGN_SECTORS: u32 = 8;

/// Length in bytes of the LUKS region [`fresh_header`] writes (header and
/// the material of eight keyslots, 2,068,480 bytes: QEMU's layout, so the
/// payload starts at sector 4040).
pub fn fresh_len() -> usize {
    fresh_payload_sectors() as usize * SECTOR
}

fn slot_sectors() -> u32 {
    (64 * NEW_STRIPES)
        .div_ceil(SECTOR as u32)
        .div_ceil(ALIGN_SECTORS)
        * ALIGN_SECTORS
}

fn fresh_payload_sectors() -> u32 {
    ALIGN_SECTORS + 8 * slot_sectors()
}

/// A new LUKS1 region for aes-xts-plain64, sha256 and a 512-bit data key
/// `mk` in keyslot 0 under `passphrase`, with [`NEW_ITERATIONS`] (the
/// passphrase is a random key: no calibration), in QEMU's layout (the
/// keyslots at sector 8 and then every 504 sectors, the payload at sector
/// 4040). The other keyslots are disabled, their material zeros.
pub fn fresh_header(mk: &[u8], passphrase: &[u8]) -> Result<Zeroizing<Vec<u8>>, ImageError> {
    if mk.len() != 64 {
        return Err(ImageError::Check(format!("a {}-byte data key", mk.len())));
    }
    let mut h = Zeroizing::new(vec![0u8; fresh_len()]);
    h[..6].copy_from_slice(LUKS_MAGIC);
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h[8..11].copy_from_slice(b"aes");
    h[40..51].copy_from_slice(b"xts-plain64");
    h[72..78].copy_from_slice(b"sha256");
    h[104..108].copy_from_slice(&fresh_payload_sectors().to_be_bytes());
    h[108..112].copy_from_slice(&64u32.to_be_bytes());
    for i in 0..8u32 {
        let s = 208 + i as usize * 48;
        h[s..s + 4].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
        let offset = ALIGN_SECTORS + i * slot_sectors();
        h[s + 40..s + 44].copy_from_slice(&offset.to_be_bytes());
        h[s + 44..s + 48].copy_from_slice(&NEW_STRIPES.to_be_bytes());
    }
    identity(&mut h, mk)?;
    let (offset, len) = slot_material(&h, 64, 0).map_err(|u| ImageError::Check(u.0))?;
    put_slot(
        &mut h,
        0,
        (offset, len),
        NEW_STRIPES as usize,
        mk,
        passphrase,
    )?;
    // The other keyslots never held anything: their material stays zeros
    // (holes in the file).
    Luks1::parse(&h)
        .map_err(|u| ImageError::Check(format!("the fresh LUKS header does not parse: {}", u.0)))?;
    Ok(h)
}

/// LUKS1 anti-forensic split of `mk` into `stripes` stripes, in a
/// zero-padded buffer of `len` bytes (allocated once at its final size:
/// a growing Vec would leave copies of the stripes behind).
pub fn af_split(mk: &[u8], stripes: usize, len: usize) -> Result<Zeroizing<Vec<u8>>, ImageError> {
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
pub fn af_merge(material: &[u8], key_bytes: usize) -> Zeroizing<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn tmp(tag: &str) -> std::path::PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        std::env::temp_dir().join(format!("gk-luks1-{tag}-{}", hex::encode(b)))
    }

    /// `cryptsetup ARGS FILE` with `stdin` as the key file; (ok, output).
    fn cryptsetup(args: &[&str], file: &std::path::Path, stdin: &[u8]) -> (bool, String) {
        let mut c = Command::new("cryptsetup")
            .args(args)
            .arg("--key-file=-")
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cryptsetup (scripts/setup installs cryptsetup-bin)");
        c.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The volume key cryptsetup dumps, as hex.
    fn dumped_key(file: &std::path::Path, passphrase: &[u8]) -> String {
        let (ok, text) = cryptsetup(
            &["luksDump", "--dump-volume-key", "--batch-mode"],
            file,
            passphrase,
        );
        assert!(ok, "{text}");
        let start = text.find("MK dump:").expect("MK dump in luksDump output") + 8;
        text[start..]
            .split_whitespace()
            .take(64)
            .collect::<Vec<_>>()
            .concat()
    }

    /// A LUKS1 image made by cryptsetup itself (aes-xts-plain64, sha256).
    fn cryptsetup_image(passphrase: &[u8]) -> std::path::PathBuf {
        let f = tmp("img");
        std::fs::File::create(&f).unwrap().set_len(4 << 20).unwrap();
        let (ok, text) = cryptsetup(
            &[
                "luksFormat",
                "-q",
                "--type",
                "luks1",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--hash",
                "sha256",
                "--cipher",
                "aes-xts-plain64",
                "--key-size",
                "512",
            ],
            &f,
            passphrase,
        );
        assert!(ok, "{text}");
        f
    }

    fn region(f: &std::path::Path) -> Vec<u8> {
        let all = std::fs::read(f).unwrap();
        let l = Luks1::parse(&all).unwrap_or_else(|u| panic!("{}", u.0));
        all[..l.payload_sectors as usize * SECTOR].to_vec()
    }

    #[test]
    fn cryptsetup_headers_unlock_to_the_key_cryptsetup_dumps() {
        let f = cryptsetup_image(b"first passphrase");
        let r = region(&f);
        let l = Luks1::parse(&r).unwrap_or_else(|u| panic!("{}", u.0));
        let mk = l
            .unlock(&r, b"first passphrase")
            .expect("our unlock opens cryptsetup's keyslot");
        assert_eq!(hex::encode(&*mk), dumped_key(&f, b"first passphrase"));
        assert!(l.unlock(&r, b"another passphrase").is_none());
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn headers_we_write_are_accepted_by_cryptsetup() {
        let f = cryptsetup_image(b"old passphrase");
        let r = region(&f);
        let l = Luks1::parse(&r).unwrap_or_else(|u| panic!("{}", u.0));
        let mut mk = [0u8; 64];
        getrandom::fill(&mut mk).unwrap();
        let new = new_header(&r, &l, &mk, b"new passphrase")
            .unwrap()
            .unwrap_or_else(|u| panic!("{}", u.0));
        let mut all = std::fs::read(&f).unwrap();
        all[..new.len()].copy_from_slice(&new);
        std::fs::write(&f, &all).unwrap();
        let (ok, dump) = cryptsetup(&["luksDump"], &f, b"");
        assert!(ok, "{dump}");
        assert_eq!(
            dump.matches("ENABLED").count(),
            1,
            "one active keyslot: {dump}"
        );
        let (ok, text) = cryptsetup(&["open", "--test-passphrase"], &f, b"new passphrase");
        assert!(ok, "cryptsetup accepts the new passphrase: {text}");
        let (ok, _) = cryptsetup(&["open", "--test-passphrase"], &f, b"old passphrase");
        assert!(!ok, "the old passphrase is gone");
        assert_eq!(dumped_key(&f, b"new passphrase"), hex::encode(mk));
        // And our own reader agrees.
        let back = Luks1::parse(&new).unwrap_or_else(|u| panic!("{}", u.0));
        assert_eq!(&*back.unlock(&new, b"new passphrase").unwrap(), &mk[..]);
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn fresh_headers_hold_the_key_cryptsetup_dumps() {
        let mut mk = [0u8; 64];
        getrandom::fill(&mut mk).unwrap();
        let h = fresh_header(&mk, b"fresh passphrase").unwrap();
        assert_eq!(h.len(), 4040 * SECTOR, "QEMU's layout");
        let f = tmp("fresh");
        let mut all = h.to_vec();
        all.resize(all.len() + (1 << 20), 0);
        std::fs::write(&f, &all).unwrap();
        let (ok, dump) = cryptsetup(&["luksDump"], &f, b"");
        assert!(ok, "{dump}");
        assert!(dump.contains("MK iterations: \t1000"), "{dump}");
        assert_eq!(dump.matches("ENABLED").count(), 1, "{dump}");
        assert_eq!(dumped_key(&f, b"fresh passphrase"), hex::encode(mk));
        let (ok, _) = cryptsetup(&["open", "--test-passphrase"], &f, b"other passphrase");
        assert!(!ok);
        let l = Luks1::parse(&h).unwrap_or_else(|u| panic!("{}", u.0));
        assert_eq!(&*l.unlock(&h, b"fresh passphrase").unwrap(), &mk[..]);
        assert!(fresh_header(&mk[..32], b"x").is_err(), "only 512-bit keys");
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn other_headers_are_declined() {
        let mut h = vec![0u8; HEADER_LEN];
        assert!(Luks1::parse(&h).is_err());
        h[..6].copy_from_slice(LUKS_MAGIC);
        h[7] = 2;
        assert!(Luks1::parse(&h).err().unwrap().0.contains("version 1"));
        assert!(Luks1::parse(&h[..100]).is_err());
    }

    #[test]
    fn headers_that_ask_for_endless_iterations_are_declined() {
        let mut mk = [0u8; 64];
        getrandom::fill(&mut mk).unwrap();
        let h = fresh_header(&mk, b"p").unwrap();
        assert!(Luks1::parse(&h).is_ok());
        let slot = (0..8)
            .map(|i| 208 + i * 48)
            .find(|&s| be32(&h, s) == SLOT_ACTIVE)
            .unwrap();
        for (at, of) in [(164, "the data key digest"), (slot + 4, "keyslot")] {
            for n in [0, MAX_ITERATIONS + 1, u32::MAX] {
                let mut bad = h.to_vec();
                bad[at..at + 4].copy_from_slice(&n.to_be_bytes());
                let e = Luks1::parse(&bad).err().unwrap().0;
                assert!(e.contains(of) && e.contains(&n.to_string()), "{e}");
            }
            let mut most = h.to_vec();
            most[at..at + 4].copy_from_slice(&MAX_ITERATIONS.to_be_bytes());
            assert!(Luks1::parse(&most).is_ok());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn af_split_then_merge_gives_the_key_back(
            key in proptest::collection::vec(any::<u8>(), 64),
            stripes in 1usize..4001,
        ) {
            let len = (64 * stripes).div_ceil(SECTOR) * SECTOR;
            let split = af_split(&key, stripes, len).unwrap();
            prop_assert_eq!(split.len(), len);
            prop_assert!(split[64 * stripes..].iter().all(|b| *b == 0), "zero padding");
            let merged = af_merge(&split[..64 * stripes], 64);
            prop_assert_eq!(&merged[..], &key[..]);
            if stripes > 1 {
                // Any stripe changed: another key (the split is all-or-nothing).
                let mut broken = split.clone();
                broken[0] ^= 1;
                prop_assert_ne!(&af_merge(&broken[..64 * stripes], 64)[..], &key[..]);
            }
        }
    }
}
