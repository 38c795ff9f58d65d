//! PCR selections and the policy digests computed from PCR values in
//! software, so that an approver (an operator, the management server) can
//! sign the policy of an update before the machine ever boots it.
//!
//! Only the SHA-256 bank is used: every TPM 2.0 that ships today has it,
//! and one bank keeps the approvals short.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `TPM_CC_PolicyPCR` (TPM 2.0 part 2, table 12).
const CC_POLICY_PCR: u32 = 0x0000_017F;
/// `TPM_CC_PolicyAuthorize`.
const CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
/// `TPM_ALG_SHA256`.
const ALG_SHA256: u16 = 0x000B;
/// PCRs 0 to 23: three bytes of selection bitmap.
pub const PCR_COUNT: u8 = 24;

/// The PCRs a sealed key is bound to when nothing else is asked for: PCR 7,
/// the Secure Boot policy (whether Secure Boot is on, and its keys and
/// databases). It changes when someone turns Secure Boot off or enrols other
/// keys, not with every kernel or firmware update; operators who want the
/// firmware and boot chain measured too choose e.g. `0,2,4,7` and approve
/// each update's values in advance (see `docs/tpm.md`).
pub const DEFAULT_PCRS: &[u8] = &[7];

/// A set of SHA-256 PCRs, in ascending order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct PcrSelection(Vec<u8>);

impl PcrSelection {
    /// The selection of `pcrs` (sorted, duplicates removed); refused when
    /// empty or a PCR is not 0 to 23.
    pub fn new(pcrs: impl IntoIterator<Item = u8>) -> Result<Self, String> {
        let mut v: Vec<u8> = pcrs.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            return Err("a PCR selection needs at least one PCR".into());
        }
        if let Some(bad) = v.iter().find(|p| **p >= PCR_COUNT) {
            return Err(format!("PCR {bad} does not exist: PCRs are 0 to 23"));
        }
        Ok(Self(v))
    }

    /// The default selection, [`DEFAULT_PCRS`].
    pub fn default_selection() -> Self {
        Self(DEFAULT_PCRS.to_vec())
    }

    /// The PCR indices, ascending.
    pub fn pcrs(&self) -> &[u8] {
        &self.0
    }

    /// `TPML_PCR_SELECTION` as the TPM marshals it: one SHA-256 selection.
    pub(crate) fn marshal(&self) -> Vec<u8> {
        let mut bitmap = [0u8; 3];
        for p in &self.0 {
            bitmap[usize::from(p / 8)] |= 1 << (p % 8);
        }
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&ALG_SHA256.to_be_bytes());
        out.push(3);
        out.extend_from_slice(&bitmap);
        out
    }
}

impl TryFrom<Vec<u8>> for PcrSelection {
    type Error = String;
    fn try_from(v: Vec<u8>) -> Result<Self, String> {
        Self::new(v)
    }
}

impl From<PcrSelection> for Vec<u8> {
    fn from(s: PcrSelection) -> Self {
        s.0
    }
}

impl FromStr for PcrSelection {
    type Err = String;
    /// `7`, `0,2,4,7` or `sha256:0,2,4,7`.
    fn from_str(s: &str) -> Result<Self, String> {
        let list = match s.split_once(':') {
            Some(("sha256", rest)) => rest,
            Some((bank, _)) => {
                return Err(format!(
                    "PCR bank `{bank}` is not supported: use sha256 (e.g. sha256:0,7)"
                ));
            }
            None => s,
        };
        let pcrs = list
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u8>()
                    .map_err(|_| format!("`{p}` in `{s}` is not a PCR number (0 to 23)"))
            })
            .collect::<Result<Vec<u8>, String>>()?;
        Self::new(pcrs)
    }
}

impl fmt::Display for PcrSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// SHA-256 values of some PCRs, by index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrValues(BTreeMap<u8, PcrValue>);

/// One SHA-256 PCR value (hex in files).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PcrValue(pub [u8; 32]);

impl fmt::Debug for PcrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Display for PcrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl TryFrom<String> for PcrValue {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PcrValue> for String {
    fn from(v: PcrValue) -> Self {
        hex::encode(v.0)
    }
}

impl FromStr for PcrValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut b)
            .map_err(|_| format!("`{s}` is not a SHA-256 PCR value: it must be 64 hex digits"))?;
        Ok(Self(b))
    }
}

impl PcrValue {
    /// The value after `TPM2_PCR_Extend` with `digest`: SHA-256(self ‖ digest).
    /// How an approver computes an update's PCR values in advance from the
    /// measurements it will add.
    pub fn extended(&self, digest: &[u8; 32]) -> PcrValue {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(digest);
        PcrValue(h.finalize().into())
    }
}

impl PcrValues {
    /// A copy with PCR `pcr` set to `value`.
    pub fn with(mut self, pcr: u8, value: PcrValue) -> Self {
        self.0.insert(pcr, value);
        self
    }

    /// Values by PCR index.
    pub fn new(values: BTreeMap<u8, PcrValue>) -> Self {
        Self(values)
    }

    /// The selection these values cover.
    pub fn selection(&self) -> Result<PcrSelection, String> {
        PcrSelection::new(self.0.keys().copied())
    }

    /// The value of PCR `pcr`.
    pub fn get(&self, pcr: u8) -> Option<&PcrValue> {
        self.0.get(&pcr)
    }

    /// Every (index, value), ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &PcrValue)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    /// The PCRs of `self` whose value differs in `other` (or `other` lacks).
    pub fn differences(&self, other: &PcrValues) -> Vec<u8> {
        self.0
            .iter()
            .filter(|(k, v)| other.0.get(k) != Some(v))
            .map(|(k, _)| *k)
            .collect()
    }

    /// `TPM2_PolicyPCR`'s digest, from a fresh policy, for these values:
    /// H(0…0 ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ H(values in order)).
    pub fn policy_digest(&self) -> Result<[u8; 32], String> {
        let selection = self.selection()?;
        let mut values = Sha256::new();
        for v in self.0.values() {
            values.update(v.0);
        }
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update(CC_POLICY_PCR.to_be_bytes());
        h.update(selection.marshal());
        h.update(values.finalize());
        Ok(h.finalize().into())
    }
}

/// `TPM2_PolicyAuthorize`'s digest, from a fresh policy: the policy of a
/// sealed object that accepts any policy the key named `key_name` signed
/// (with `policy_ref`). H(H(0…0 ‖ TPM_CC_PolicyAuthorize ‖ name) ‖ ref).
pub fn policy_authorize_digest(key_name: &[u8], policy_ref: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(CC_POLICY_AUTHORIZE.to_be_bytes());
    h.update(key_name);
    let first: [u8; 32] = h.finalize().into();
    let mut h = Sha256::new();
    h.update(first);
    h.update(policy_ref);
    h.finalize().into()
}

/// aHash of TPM2_PolicyAuthorize: what an approver signs.
pub fn approval_digest(approved_policy: &[u8; 32], policy_ref: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(approved_policy);
    h.update(policy_ref);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse_print_and_refuse_by_name() {
        let s: PcrSelection = "sha256:7,0, 4,2,7".parse().unwrap();
        assert_eq!(s.pcrs(), &[0, 2, 4, 7]);
        assert_eq!(s.to_string(), "sha256:0,2,4,7");
        assert_eq!("7".parse::<PcrSelection>().unwrap().pcrs(), &[7]);
        for (bad, says) in [
            ("", "is not a PCR number"),
            ("24", "PCR 24 does not exist"),
            ("sha1:7", "bank `sha1` is not supported"),
            ("7,x", "`x` in `7,x` is not a PCR number"),
        ] {
            let e = bad.parse::<PcrSelection>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_selection_marshals_as_the_tpm_does() {
        let s = PcrSelection::new([0, 7, 8, 23]).unwrap();
        assert_eq!(
            hex::encode(s.marshal()),
            // count 1, TPM_ALG_SHA256, sizeofSelect 3, bitmap
            "00000001000b03810180"
        );
    }
}
