//! Release gates, the allowlist: the PCR values a host may quote, per
//! host, versioned and audited; given by the admin or learnt from a
//! verified quote of the host now (its first enrollment, a known-good
//! update).

use std::sync::Arc;

use guestkey_protect::tpm::pcr::{PcrSelection, PcrValue};
use guestkey_protect::tpm::verify::AttestationKeyPublic;

use crate::domain::{Core, now_unix};
use crate::model::{Caller, CoreError, InvalidInput};

/// A host's attestation allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    /// The host.
    pub host: String,
    /// Its version (0: none yet).
    pub version: u64,
    /// (PCR, SHA-256 hex), by PCR.
    pub values: Vec<(u8, String)>,
}

impl Core {
    /// The host's allowlist.
    pub fn allowlist(&self, host: &str) -> Result<Allowlist, CoreError> {
        self.read(|tx| {
            if !tx.host_exists(host)? {
                return Err(CoreError::NotFound(format!("no host {host}")));
            }
            let (version, values) = tx.allowlist(host)?;
            Ok(Allowlist {
                host: host.to_owned(),
                version,
                values,
            })
        })
    }

    /// Adds `values` to the host's allowlist (with `replace`, they replace
    /// the values of the PCRs they name): a new version, audited.
    pub fn allow_pcrs(
        &self,
        caller: &Caller,
        host: &str,
        values: &[(u8, PcrValue)],
        replace: bool,
    ) -> Result<Allowlist, CoreError> {
        if values.is_empty() {
            return Err(CoreError::Invalid(InvalidInput {
                what: "PCR values",
                value: String::new(),
                why: "name at least one (--pcr N=SHA256HEX, or --learn)".into(),
            }));
        }
        let pairs: Vec<(u8, String)> = values.iter().map(|(p, v)| (*p, v.to_string())).collect();
        self.write(|tx| {
            if tx.host_identity(host)?.is_none() {
                return Err(if tx.host_exists(host)? {
                    CoreError::FailedPrecondition(format!(
                        "host {host} was enrolled without a TPM: an allowlist would never be checked; enroll it again with `guestkeyd enroll --tpm`"
                    ))
                } else {
                    CoreError::NotFound(format!("no host {host}"))
                });
            }
            let version = tx.allow_pcr_values(host, &pairs, replace, now_unix())?;
            let listed: Vec<String> = pairs.iter().map(|(p, v)| format!("{p}={v}")).collect();
            self.log(
                tx,
                &caller.actor(),
                "attestation.allowed",
                host,
                &format!(
                    "allowlist version {version}: {} {}",
                    if replace { "set" } else { "added" },
                    listed.join(" ")
                ),
            )?;
            let (version, values) = tx.allowlist(host)?;
            Ok(Allowlist {
                host: host.to_owned(),
                version,
                values,
            })
        })
    }

    /// Learns the values of `pcrs` from a quote of `host` now (verified
    /// with its pinned AK and a fresh nonce) and allows them.
    pub async fn learn_pcrs(
        self: &Arc<Self>,
        caller: &Caller,
        host: &str,
        pcrs: &[u8],
        replace: bool,
    ) -> Result<Allowlist, CoreError> {
        let selection = PcrSelection::new(pcrs.iter().copied()).map_err(|why| {
            CoreError::Invalid(InvalidInput {
                what: "PCRs to learn",
                value: format!("{pcrs:?}"),
                why,
            })
        })?;
        let h = host.to_owned();
        let enrolled = self.blocking(move |c| c.enrolled_host(&h)).await?;
        let h = host.to_owned();
        let (ak, earlier) = self
            .blocking(move |c| {
                c.read(|tx| {
                    let id = tx.host_identity(&h)?.filter(|i| i.pinned).ok_or_else(|| {
                        CoreError::FailedPrecondition(format!(
                            "host {h} has no pinned attestation key: enroll it with `guestkeyd enroll --tpm`"
                        ))
                    })?;
                    let ak = AttestationKeyPublic::read(&id.ak_public)
                        .map_err(|e| CoreError::Internal(e.to_string()))?;
                    Ok((ak, tx.attestation(&h)?.1))
                })
            })
            .await?;
        let (values, _) = self
            .quote_of(&enrolled, &ak, &selection, earlier)
            .await
            .map_err(|why| CoreError::FailedPrecondition(format!("host {host}: {why}")))?;
        let learnt: Vec<(u8, PcrValue)> = values.iter().map(|(p, v)| (p, *v)).collect();
        let (caller, h) = (caller.clone(), host.to_owned());
        self.blocking(move |c| c.allow_pcrs(&caller, &h, &learnt, replace))
            .await
    }
}
