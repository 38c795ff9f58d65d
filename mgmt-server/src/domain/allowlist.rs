//! Release gates, the allowlists: the PCR values a host may quote, for one
//! host or a host group (a host may quote what its own list or its group's
//! names), versioned and audited; given by the admin or learnt from a
//! verified quote of a host now (its first enrollment, a known-good
//! update).

use std::sync::Arc;

use guestkey_protect::tpm::pcr::{PcrSelection, PcrValue};
use guestkey_protect::tpm::verify::AttestationKeyPublic;

use crate::domain::{Core, now_unix};
use crate::model::{AllowScope, Caller, CoreError, InvalidInput, Name};
use crate::store::Tx;

/// One attestation allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    /// A host's, or a group's.
    pub scope: AllowScope,
    /// The host or the group.
    pub target: String,
    /// Its version (0: none yet).
    pub version: u64,
    /// (PCR, SHA-256 hex), by PCR.
    pub values: Vec<(u8, String)>,
}

/// What a host's quote is checked against: its own list and its group's.
pub(crate) struct Effective {
    /// e.g. "host kvm-01 v2, group rack-a v1".
    pub(crate) versions: String,
    /// (PCR, SHA-256 hex) of both, by PCR.
    pub(crate) values: Vec<(u8, String)>,
}

/// The lists `host` is checked against.
pub(crate) fn effective(tx: &mut dyn Tx, host: &str) -> Result<Effective, CoreError> {
    let (hv, mut values) = tx.allowlist(AllowScope::Host, host)?;
    let mut versions = format!("host {host} v{hv}");
    let group = tx.host_group(host)?;
    if !group.is_empty() {
        let (gv, g) = tx.allowlist(AllowScope::Group, &group)?;
        versions.push_str(&format!(", group {group} v{gv}"));
        values.extend(g);
    }
    values.sort();
    values.dedup();
    Ok(Effective { versions, values })
}

/// Checks a host or group name; for a host, that it can be attested.
fn check_target(tx: &mut dyn Tx, scope: AllowScope, target: &str) -> Result<(), CoreError> {
    match scope {
        AllowScope::Group => {
            Name::parse("group name", target)?;
            Ok(())
        }
        AllowScope::Host => {
            if tx.host_identity(target)?.is_some() {
                Ok(())
            } else if tx.host_exists(target)? {
                Err(CoreError::FailedPrecondition(format!(
                    "host {target} was enrolled without a TPM: an allowlist would never be checked; register it under a new name (`guestkeyctl host add`) and enroll that with `guestkeyd enroll --tpm` on a fresh state directory"
                )))
            } else {
                Err(CoreError::NotFound(format!("no host {target}")))
            }
        }
    }
}

impl Core {
    /// An allowlist.
    pub fn allowlist(&self, scope: AllowScope, target: &str) -> Result<Allowlist, CoreError> {
        self.read(|tx| {
            if scope == AllowScope::Host && !tx.host_exists(target)? {
                return Err(CoreError::NotFound(format!("no host {target}")));
            }
            if scope == AllowScope::Group {
                Name::parse("group name", target)?;
            }
            let (version, values) = tx.allowlist(scope, target)?;
            Ok(Allowlist {
                scope,
                target: target.to_owned(),
                version,
                values,
            })
        })
    }

    /// Adds `values` to an allowlist (with `replace`, they replace the
    /// values of the PCRs they name): a new version, audited.
    pub fn allow_pcrs(
        &self,
        caller: &Caller,
        scope: AllowScope,
        target: &str,
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
            check_target(tx, scope, target)?;
            let version = tx.allow_pcr_values(scope, target, &pairs, replace, now_unix())?;
            let listed: Vec<String> = pairs.iter().map(|(p, v)| format!("{p}={v}")).collect();
            self.log(
                tx,
                &caller.actor(),
                "attestation.allowed",
                &format!("{scope}:{target}"),
                &format!(
                    "allowlist version {version}: {} {}",
                    if replace { "set" } else { "added" },
                    listed.join(" ")
                ),
            )?;
            let (version, values) = tx.allowlist(scope, target)?;
            Ok(Allowlist {
                scope,
                target: target.to_owned(),
                version,
                values,
            })
        })
    }

    /// Learns the values of `pcrs` from a quote of `host` now (verified
    /// with its pinned AK and a fresh nonce) and allows them in the
    /// allowlist of `scope` `target` (the host's own, or a group's).
    pub async fn learn_pcrs(
        self: &Arc<Self>,
        caller: &Caller,
        host: &str,
        (scope, target): (AllowScope, &str),
        pcrs: &[u8],
        replace: bool,
    ) -> Result<Allowlist, CoreError> {
        if self.verifier {
            return Err(CoreError::FailedPrecondition(format!(
                "this server runs as a verifier and never calls hosts, so it cannot learn host {host}'s values from a quote: give them with --pcr N=HEX (e.g. from `guestkeyctl attestation show --host {host}` at the management server, which learns them with --learn)"
            )));
        }
        let selection = PcrSelection::new(pcrs.iter().copied()).map_err(|why| {
            CoreError::Invalid(InvalidInput {
                what: "PCRs to learn",
                value: format!("{pcrs:?}"),
                why,
            })
        })?;
        if scope == AllowScope::Group {
            Name::parse("group name", target)?;
        }
        let h = host.to_owned();
        let enrolled = self.blocking(move |c| c.enrolled_host(&h)).await?;
        let h = host.to_owned();
        let (ak, earlier) = self
            .blocking(move |c| {
                c.read(|tx| {
                    let id = tx.host_identity(&h)?.filter(|i| i.pinned).ok_or_else(|| {
                        CoreError::FailedPrecondition(format!(
                            "host {h} has no proven attestation key: it was enrolled without a TPM, or guestkeyd tries the proof again each time it starts on that host (its log says why it failed)"
                        ))
                    })?;
                    let ak = AttestationKeyPublic::read(&id.ak_public)
                        .map_err(|e| CoreError::Internal(e.to_string()))?;
                    Ok((ak, tx.attestation(&h)?.1))
                })
            })
            .await?;
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce)
            .map_err(|e| CoreError::Internal(format!("no random bytes: {e}")))?;
        let (values, _) = self
            .quote_of(
                crate::domain::attest::QuoteFrom::Agent(&enrolled),
                &nonce,
                &ak,
                &selection,
                earlier,
            )
            .await
            .map_err(|why| CoreError::FailedPrecondition(format!("host {host}: {why}")))?;
        let learnt: Vec<(u8, PcrValue)> = values.iter().map(|(p, v)| (p, *v)).collect();
        let (caller, t) = (caller.clone(), target.to_owned());
        self.blocking(move |c| c.allow_pcrs(&caller, scope, &t, &learnt, replace))
            .await
    }

    /// Puts a host in a host group ("": none): its group's allowlist
    /// applies to it too. Audited.
    pub fn set_host_group(
        &self,
        caller: &Caller,
        host: &str,
        group: &str,
    ) -> Result<crate::model::HostInfo, CoreError> {
        if !group.is_empty() {
            Name::parse("group name", group)?;
        }
        self.write(|tx| {
            if !tx.host_exists(host)? {
                return Err(CoreError::NotFound(format!("no host {host}")));
            }
            let was = tx.host_group(host)?;
            tx.set_host_group(host, group)?;
            self.log(
                tx,
                &caller.actor(),
                "host.group",
                host,
                &format!(
                    "group {} (was {})",
                    if group.is_empty() { "none" } else { group },
                    if was.is_empty() { "none" } else { &was }
                ),
            )?;
            Ok(())
        })?;
        self.get_host(host)
    }
}
