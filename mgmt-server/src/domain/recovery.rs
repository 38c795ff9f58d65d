//! The server's recovery record: the master key sealed to the recovery key
//! (whose private half the custodians' shares hold, see [`crate::shares`])
//! and the data directory's certificates and keys wrapped under the master
//! key, so that a stored bundle nobody with the master key made does not
//! open.
//!
//! A master key rotation calls [`rotated`] in its transaction: the bundle is
//! re-wrapped and the new key sealed to the same recovery key, so shares
//! made before a rotation keep working.

use crate::masterkey::MasterKey;
use crate::model::CoreError;
use crate::shares::{RecoveryKey, ShareError};
use crate::store::RecoveryRecord;

/// The first line of the sealed master key's text.
const MASTER_MAGIC: &str = "guestkey-master-key v1";

fn share_err(e: ShareError) -> CoreError {
    CoreError::FailedPrecondition(e.0)
}

/// The master key, age-encrypted to `recipient` (`age1...`).
pub fn seal_master(master: &MasterKey, recipient: &str) -> Result<Vec<u8>, CoreError> {
    let r = crate::shares::parse_recipient(recipient).map_err(share_err)?;
    let key = master.export_base64();
    let mut text = zeroize::Zeroizing::new(String::with_capacity(128));
    text.push_str(MASTER_MAGIC);
    text.push('\n');
    text.push_str(&key);
    text.push('\n');
    crate::shares::seal(&text, &[r]).map_err(share_err)
}

/// The master key `rec` holds, opened with the recovery key; checked
/// against the id the record names.
pub fn open_master(rec: &RecoveryRecord, key: &RecoveryKey) -> Result<MasterKey, CoreError> {
    let text = crate::shares::open(
        &rec.sealed_master,
        &[key.identity()],
        "the database's sealed master key",
    )
    .map_err(share_err)?;
    let altered = || {
        CoreError::FailedPrecondition(
            "the database's sealed master key is not one guestkey made: the database was altered"
                .into(),
        )
    };
    let body = text
        .strip_prefix(MASTER_MAGIC)
        .and_then(|t| t.strip_prefix('\n'))
        .ok_or_else(altered)?;
    let master = MasterKey::from_base64(body, "the recovery record").map_err(|_| altered())?;
    if master.id() != rec.master_key_id {
        return Err(altered());
    }
    Ok(master)
}

/// What the record says about its split, bound into its bundle's
/// associated data: a database writer who changes the recovery key, the
/// split, its custodians or the public files' digest makes the bundle fail
/// to open, and nothing is then sealed to the recovery key it wrote.
fn context(rec: &RecoveryRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut field = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    };
    field(rec.split_id.as_bytes());
    field(&[rec.threshold, rec.shares]);
    field(&rec.created.to_be_bytes());
    field(rec.recipient.as_bytes());
    field(&(rec.custodians.len() as u64).to_be_bytes());
    for c in &rec.custodians {
        field(c.as_bytes());
    }
    field(rec.bundle_sha256.as_bytes());
    out
}

/// Sets `rec.bundle`: `plain` wrapped under `master` (whose id `rec` must
/// name), bound to what `rec` says.
pub fn wrap_bundle(master: &MasterKey, rec: &mut RecoveryRecord, plain: &[u8]) {
    rec.bundle = master.wrap_bundle(plain, &context(rec));
}

/// The bundle of `rec`, opened with `master`; refused when the record was
/// altered since it was written.
pub fn open_bundle(
    master: &MasterKey,
    rec: &RecoveryRecord,
) -> Result<zeroize::Zeroizing<Vec<u8>>, CoreError> {
    master
        .unwrap_bundle(&rec.master_key_id, &rec.bundle, &context(rec))
        .map_err(|e| match e {
            crate::masterkey::UnwrapError::Bundle => CoreError::FailedPrecondition(format!(
                "the recovery record of split {} was altered in the database (its recovery key, split or custodians are not those its bundle was made with): nothing was sealed to it; make a new split with `guestkey-server recovery split`",
                rec.split_id
            )),
            e => CoreError::FailedPrecondition(e.to_string()),
        })
}

/// The record after a rotation from `old` to `new`: the bundle re-wrapped,
/// the new key sealed to the same recovery key (once the bundle showed the
/// record is the one written with `old`).
pub fn rotated(
    rec: &RecoveryRecord,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<RecoveryRecord, CoreError> {
    let bundle = open_bundle(old, rec)?;
    let mut out = RecoveryRecord {
        master_key_id: new.id().to_owned(),
        sealed_master: seal_master(new, &rec.recipient)?,
        bundle: vec![],
        ..rec.clone()
    };
    wrap_bundle(new, &mut out, &bundle);
    Ok(out)
}
