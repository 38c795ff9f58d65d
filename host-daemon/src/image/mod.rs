//! Images: the volume files on this host.
//!
//! [`Images`] is what the daemon's operations ([`crate::ops`]) need from
//! them: create a LUKS image, tell whether a key opens it, replace its
//! passphrase, re-encrypt it (offline), convert it from or to cleartext,
//! and the copies an online rekey pivots to. [`QemuImages`] is the one real
//! implementation: guestkeyd's own LUKS1 code ([`luks1`]) writes new
//! images, replaces keyslots and re-encrypts offline; QEMU (qemu-io and
//! qemu-img, keys on inherited pipes: [`run`]) checks every result, and
//! does the work itself where guestkeyd does not know the image's layout,
//! and for conversions.
//!
//! Every file is reached through [`fs::SafeDir`]: no symbolic link that
//! someone other than root could plant is followed, names are opened with
//! `O_NOFOLLOW`, and the tools get the checked file as `/dev/fd/N`.
//!
//! May import: [`crate::model`], [`crate::progress`]. Imported by:
//! [`crate::ops`], the binary.

pub mod fs;
pub mod luks1;
mod qemu;
mod run;
mod shred;
mod swap;

pub use swap::copy_cleartext;

pub use qemu::QemuImages;

/// Where the data keys guestkeyd makes (its own re-encryption) get their
/// randomness: the OS generator, with the TPM's bytes mixed in once
/// [`use_entropy`] was called (a host whose keys are sealed to its TPM).
static ENTROPY: std::sync::OnceLock<guestkey_protect::tpm::Entropy> = std::sync::OnceLock::new();

/// Data keys from now on mix in `e`'s bytes (set once, at start-up).
pub fn use_entropy(e: guestkey_protect::tpm::Entropy) {
    let _ = ENTROPY.set(e);
}

/// A new data key of `len` bytes.
pub(crate) fn new_data_key(len: usize) -> Result<zeroize::Zeroizing<Vec<u8>>, ImageError> {
    let mut key = zeroize::Zeroizing::new(vec![0u8; len]);
    match ENTROPY.get() {
        Some(e) => {
            let k = e.key(len).map_err(|e| ImageError::Random(e.to_string()))?;
            key.copy_from_slice(k.expose_secret());
        }
        None => getrandom::fill(&mut key).map_err(|e| ImageError::Random(e.to_string()))?,
    }
    Ok(key)
}
pub use run::{CALIBRATION_FAILED, CALIBRATION_TRIES};
pub use shred::overwrite_old_images;

use crate::model::Format;

/// An image operation failed; the message names the file and what the tool
/// said, never a key.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A tool could not be started.
    #[error("cannot run {program}: {source} (is qemu-utils installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{tool} {action} of {path}: {said}")]
    Tool {
        /// qemu-img or qemu-io.
        tool: &'static str,
        /// What it was asked to do.
        action: &'static str,
        /// The image.
        path: String,
        /// What it said.
        said: String,
    },
    /// The file system refused (a link, a race, permissions).
    #[error(transparent)]
    Fs(#[from] fs::FsError),
    /// A check after the work failed: nothing was swapped in.
    #[error("{0}")]
    Check(String),
    /// The image is not what the operation needs; the message says what to do.
    #[error("{0}")]
    Unsuitable(String),
    /// Reading or writing the file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Already encrypted (qcow2 encryption, or a LUKS header in a raw file).
    pub encrypted: bool,
    /// It has a backing file or an external data file (guestkey works on
    /// self-contained images only).
    pub backing: bool,
}

/// The operations on volume images. Paths are absolute; keys are the
/// volume passphrases (text, from key packets).
pub trait Images: Send + Sync {
    /// Creates an empty LUKS image of `size` bytes at `path` (the name must
    /// be free), owned like its directory: mode 0660 when the directory is
    /// group-writable (shared storage), 0600 otherwise.
    fn create(&self, path: &str, format: Format, size: u64, key: &[u8]) -> Result<(), ImageError>;
    /// Whether `key` unlocks the image (a real read, not `qemu-img info`).
    fn opens_with(&self, path: &str, format: Format, key: &[u8]) -> Result<bool, ImageError>;
    /// Gives an image that an earlier try of a creation made, and that
    /// stopped before its end, what `create` gives a new image last: the
    /// pool's owner and mode, and its data and its name on disk (synced).
    fn settle(&self, path: &str) -> Result<(), ImageError>;
    /// Reads `path` as `format` (no probing): size, encryption, backing file
    /// (or an external data file, which counts as one).
    fn info(&self, path: &str, format: Format) -> Result<ImageInfo, ImageError>;
    /// The backing file `path` (read as `format`) names, if any, as a path
    /// (a relative name taken from the image's directory).
    fn backing_path(&self, path: &str, format: Format) -> Result<Option<String>, ImageError>;
    /// The guest-visible size (no key needed).
    fn virtual_size(&self, path: &str) -> Result<u64, ImageError>;
    /// What the LUKS header of the image holds behind `key`: its data key
    /// and the facts a recovery checks it against (for an escrow packet).
    /// Reads only.
    fn header_key(
        &self,
        path: &str,
        format: Format,
        key: &[u8],
    ) -> Result<luks1::recovery::HeaderKey, ImageError>;
    /// Shallow rekey: a keyslot for `new` (unlocked with `old`), proven to
    /// open the image, then the keyslots of `old` erased and proven gone.
    fn replace_passphrase(
        &self,
        path: &str,
        format: Format,
        old: &[u8],
        new: &[u8],
    ) -> Result<(), ImageError>;
    /// Deep rekey, offline: the data copied under a new data key and the
    /// passphrase `new`, checked, swapped in, the old image wiped (its LUKS
    /// header and keyslots, or every byte with `--overwrite-old-images`:
    /// see [`overwrite_old_images`]). At most
    /// `bandwidth` bytes/s written (0: no limit).
    fn deep_rekey(
        &self,
        path: &str,
        format: Format,
        old: &[u8],
        new: &[u8],
        bandwidth: u64,
    ) -> Result<(), ImageError>;
    /// Encrypts the cleartext image under `key`, offline (copy, check,
    /// swap, cleartext blocks overwritten).
    fn encrypt(&self, path: &str, format: Format, key: &[u8]) -> Result<(), ImageError>;
    /// Decrypts the LUKS image into cleartext of the same container, offline.
    fn decrypt(&self, path: &str, format: Format, key: &[u8]) -> Result<(), ImageError>;
    /// An empty LUKS image under `key` at [`crate::model::copy_path`] of
    /// `path` and `generation`, owned like the image at `path` (a leftover
    /// copy of that name replaced), for an online copy; returns its path.
    fn new_copy(
        &self,
        path: &str,
        generation: u64,
        format: Format,
        size: u64,
        key: &[u8],
    ) -> Result<String, ImageError>;
    /// Removes every copy of `path` left by a failed or interrupted
    /// operation.
    fn discard_copies(&self, path: &str) -> Result<(), ImageError>;
    /// Moves the online copy of `path` and `generation` over it and wipes
    /// the replaced image. `Ok(false)`: there is no such copy (it was moved
    /// already).
    fn swap_in_copy(&self, path: &str, generation: u64) -> Result<bool, ImageError>;
}

/// `format`'s QEMU driver options to open `file` with secret `key_id`.
fn image_opts(format: Format, file: &str, key_id: Option<&str>) -> String {
    let file = file.replace(',', ",,");
    match (format, key_id) {
        (Format::Qcow2, Some(k)) => {
            format!("driver=qcow2,file.filename={file},encrypt.key-secret={k}")
        }
        (Format::Raw, Some(k)) => format!("driver=luks,file.filename={file},key-secret={k}"),
        (Format::Qcow2, None) => format!("driver=qcow2,file.filename={file}"),
        (Format::Raw, None) => format!("driver=raw,file.filename={file}"),
    }
}
