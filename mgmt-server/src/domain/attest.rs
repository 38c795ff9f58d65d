//! Release gates, attestation: a host's TPM identity bound at enrollment,
//! and the check of a fresh quote before keys of `attested` volumes go to
//! it.
//!
//! - Enrollment with a TPM: the host sends its EK and an AK made under it.
//!   Both are checked here (an AK whose quotes could be forged, one not
//!   restricted or not fixed to its TPM, is refused), and the server runs
//!   TPM2_MakeCredential in software: a random credential only that TPM,
//!   holding that AK, can recover. Its hash is kept; the AK is pinned only
//!   when the host sends the credential back ([`Core::prove_attestation_key`];
//!   guestkeyd tries again at each start until it succeeds).
//! - An attestation ([`Core::attest`]): a fresh 32-byte nonce, a quote of
//!   the PCRs the host's allowlist names, verified with the pinned AK
//!   (signature, nonce, selection, the values against the quote's digest),
//!   the TPM's clock and boot counters never going back, and each value
//!   against the allowlist. Every outcome is recorded and audited; a failed
//!   one says which PCR differed and the command that allows its value.
//! - A release ([`Core::require_attested`], called by every release of a
//!   key of an `attested` volume): only while the host's last attestation
//!   passed and is younger than `limits.attestation_max_age_secs`, so a
//!   verification loop that stops leaves no host trusted. Every flow that
//!   releases such keys attests the host right before, with its own nonce.

use std::sync::Arc;

use guestkey_protect::tpm::pcr::{PcrSelection, PcrValue, PcrValues};
use guestkey_protect::tpm::verify::{AttestationKeyPublic, EndorsementKey, QuoteFacts};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::agent::{AttestChallenge, QuoteAnswer};
use crate::domain::allowlist::{Effective, effective};
use crate::domain::{Core, now_unix};
use crate::model::{
    AllowScope, AttestationOutcome, CoreError, EnrolledHost, HostAttestation, TpmClock,
};
use crate::store::{HostIdentity, Tx};

/// What a host with a TPM presents at enrollment.
pub struct TpmIdentity {
    /// The EK's `TPMT_PUBLIC`.
    pub ek_public: Vec<u8>,
    /// The EK certificate (DER), if the TPM has one.
    pub ek_certificate: Option<Vec<u8>>,
    /// The AK's `TPMT_PUBLIC`.
    pub ak_public: Vec<u8>,
}

/// TPM2_MakeCredential's output, for the host's TPM to activate.
pub struct Credential {
    /// `TPM2B_ID_OBJECT`'s buffer.
    pub blob: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET`'s buffer.
    pub secret: Vec<u8>,
}

/// Checks what the host presented and makes its challenge: the identity
/// to store (unpinned), the credential to send, and, when the server has
/// EK CAs (`attestation.ek_ca_file`), the CA that signed the EK's
/// certificate: then a TPM without a certificate of its own EK from one of
/// them is refused.
pub(crate) fn bind(
    tpm: &TpmIdentity,
    ek_anchors: &[Vec<u8>],
) -> Result<(HostIdentity, Credential, Option<String>), String> {
    let ek = EndorsementKey::read(&tpm.ek_public).map_err(|e| e.to_string())?;
    let ak = AttestationKeyPublic::read(&tpm.ak_public).map_err(|e| e.to_string())?;
    if let Some(cert) = &tpm.ek_certificate {
        if cert.len() > 8192 {
            return Err("the EK certificate is longer than 8 KiB".into());
        }
    }
    let signer = if ek_anchors.is_empty() {
        None
    } else {
        let cert = tpm.ek_certificate.as_deref().ok_or(
            "it has no EK certificate (NV index 0x01c0000a), and this server accepts only TPMs whose EK certificate one of its EK CAs signed (attestation.ek_ca_file)",
        )?;
        Some(
            ek.check_certificate(cert, ek_anchors, now_unix())
                .map_err(|e| format!("{e} (attestation.ek_ca_file)"))?,
        )
    };
    let mut credential = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut credential[..]).map_err(|e| format!("no random bytes: {e}"))?;
    let (blob, secret) = ek
        .make_credential(ak.name(), &credential)
        .map_err(|e| e.to_string())?;
    let identity = HostIdentity {
        ek_public: tpm.ek_public.clone(),
        ek_certificate: tpm.ek_certificate.clone(),
        ak_public: tpm.ak_public.clone(),
        challenge_hash: Some(Sha256::digest(&credential[..]).to_vec()),
        pinned: false,
    };
    Ok((identity, Credential { blob, secret }, signer))
}

fn fingerprint(public: &[u8]) -> String {
    hex::encode(Sha256::digest(public))
}

/// Where the quote of an attestation comes from.
pub(crate) enum QuoteFrom<'a> {
    /// Asked of the host's agent now (the management server).
    Agent(&'a EnrolledHost),
    /// Sent by the host with its request, for a nonce it was given (a
    /// verifier, which never calls hosts).
    Sent(QuoteAnswer),
}

pub(crate) fn allow_hint(host: &str, pcr: u8, value: &PcrValue) -> String {
    format!("guestkeyctl attestation allow --host {host} --pcr {pcr}={value}")
}

impl Core {
    /// The host's proof that its AK lives in its EK's TPM: the credential
    /// its TPM recovered. Pins the AK; audited either way.
    pub fn prove_attestation_key(
        &self,
        host: &str,
        credential: &[u8],
    ) -> Result<String, CoreError> {
        let r = self.write(|tx| {
            let Some(id) = tx.host_identity(host)? else {
                return Ok(Err(format!(
                    "host {host} enrolled without a TPM: there is no attestation key to prove"
                )));
            };
            let Some(expected) = id.challenge_hash.as_deref() else {
                return Ok(Err(format!(
                    "host {host}'s attestation key is already pinned"
                )));
            };
            let got = Sha256::digest(credential);
            if !bool::from(got.as_slice().ct_eq(expected)) {
                // The credential is 32 random bytes: wrong answers cannot
                // guess it, so the host may try again (each is audited).
                self.log(
                    tx,
                    &format!("host:{host}"),
                    "host.attestation_key_refused",
                    host,
                    "the credential does not match: the attestation key was not shown to be in the TPM of the endorsement key",
                )?;
                return Ok(Err(format!(
                    "host {host}: the credential does not match, so its attestation key was not proven to live in its TPM; it stays unpinned"
                )));
            }
            tx.pin_attestation_key(host)?;
            let ak = fingerprint(&id.ak_public);
            self.log(
                tx,
                &format!("host:{host}"),
                "host.attestation_key_pinned",
                host,
                &format!(
                    "attestation key sha256 {ak} under endorsement key sha256 {}",
                    fingerprint(&id.ek_public)
                ),
            )?;
            Ok(Ok(ak))
        })?;
        r.map_err(CoreError::Denied)
    }

    /// The host's TPM identity and last attestation, as the admin sees
    /// them.
    pub(crate) fn host_attestation(
        &self,
        tx: &mut dyn Tx,
        host: &str,
    ) -> Result<Option<HostAttestation>, CoreError> {
        let Some(id) = tx.host_identity(host)? else {
            return Ok(None);
        };
        let (last, _) = tx.attestation(host)?;
        let (version, _) = tx.allowlist(AllowScope::Host, host)?;
        let group = tx.host_group(host)?;
        let group_version = if group.is_empty() {
            0
        } else {
            tx.allowlist(AllowScope::Group, &group)?.0
        };
        let fresh_until_unix = match &last {
            Some(o) if o.ok => o.at_unix + self.max_attestation_age(),
            _ => 0,
        };
        Ok(Some(HostAttestation {
            ek_sha256: fingerprint(&id.ek_public),
            ak_sha256: fingerprint(&id.ak_public),
            ek_certificate: id.ek_certificate.is_some(),
            pinned: id.pinned,
            last,
            allowlist_version: version,
            group_allowlist_version: group_version,
            fresh_until_unix,
        }))
    }

    /// The host's last attestation in a few words, for lists ("" when it
    /// has no TPM identity).
    pub fn attestation_summary(&self, host: &str) -> Result<String, CoreError> {
        self.read(|tx| {
            if tx.host_identity(host)?.is_none() {
                return Ok(String::new());
            }
            Ok(match tx.attestation(host)?.0 {
                None => "never attested".into(),
                Some(o) if o.ok => format!("passed ({} s ago)", now_unix() - o.at_unix),
                Some(o) => format!("FAILED ({} s ago): {}", now_unix() - o.at_unix, o.detail),
            })
        })
    }

    fn max_attestation_age(&self) -> i64 {
        i64::from(self.limits.attestation_max_age_secs)
    }

    /// Whether keys that need attestation may be released to `host` now:
    /// its last attestation passed and is fresh. Called in the release's
    /// transaction.
    pub(crate) fn require_attested(&self, tx: &mut dyn Tx, host: &str) -> Result<(), CoreError> {
        let (last, _) = tx.attestation(host)?;
        let now = now_unix();
        match last {
            Some(o) if o.ok && now - o.at_unix <= self.max_attestation_age() => Ok(()),
            Some(o) if o.ok => Err(CoreError::Unattested(format!(
                "host {host}'s last attestation is {} s old, older than limits.attestation_max_age_secs ({} s): it counts as unattested until it passes again",
                now - o.at_unix,
                self.max_attestation_age()
            ))),
            Some(o) => Err(CoreError::Unattested(format!(
                "host {host} failed attestation: {}",
                o.detail
            ))),
            None => Err(CoreError::Unattested(format!(
                "host {host} has not been attested"
            ))),
        }
    }

    /// What is needed to attest `host`: its pinned AK, the PCRs its
    /// allowlist names, the clock of its last passed quote.
    pub(crate) fn attestation_plan(
        &self,
        host: &str,
    ) -> Result<(AttestationKeyPublic, Effective, Option<TpmClock>), CoreError> {
        self.read(|tx| {
            let id = tx.host_identity(host)?.ok_or_else(|| {
                CoreError::Unattested(format!(
                    "host {host} was enrolled without a TPM, so it cannot be attested: register it under a new name (`guestkeyctl host add`) and enroll that with `guestkeyd enroll --tpm` on a fresh state directory"
                ))
            })?;
            if !id.pinned {
                return Err(CoreError::Unattested(format!(
                    "host {host}'s attestation key was never proven to live in its TPM (the enrollment's credential was not activated): guestkeyd tries the proof again each time it starts on that host (its log says why it failed)"
                )));
            }
            let ak = AttestationKeyPublic::read(&id.ak_public)
                .map_err(|e| CoreError::Internal(format!("host {host}'s pinned AK: {e}")))?;
            let allow = effective(tx, host)?;
            if allow.values.is_empty() {
                return Err(CoreError::Unattested(format!(
                    "host {host} has no attestation allowlist: run `guestkeyctl attestation allow --host {host} --learn` once its software is known good"
                )));
            }
            let (_, clock) = tx.attestation(host)?;
            Ok((ak, allow, clock))
        })
    }

    /// The quote of `selection` for `nonce` (asked of the host now, or
    /// the one it sent), verified with its pinned AK; returns the values
    /// and clock it attests.
    pub(crate) async fn quote_of(
        &self,
        from: QuoteFrom<'_>,
        nonce: &[u8; 32],
        ak: &AttestationKeyPublic,
        selection: &PcrSelection,
        earlier: Option<TpmClock>,
    ) -> Result<(PcrValues, QuoteFacts), String> {
        let answer: QuoteAnswer = match from {
            QuoteFrom::Agent(host) => self
                .agents
                .attest(
                    host,
                    AttestChallenge {
                        nonce: nonce.to_vec(),
                        pcrs: selection.pcrs().to_vec(),
                    },
                )
                .await
                .map_err(|e| format!("the host did not answer the attestation challenge: {e}"))?,
            QuoteFrom::Sent(a) => a,
        };
        let values = PcrValues::new(answer.values.into_iter().collect());
        let facts = ak
            .check_quote(nonce, selection, &answer.quote, &answer.signature, &values)
            .map_err(|e| e.to_string())?;
        if let Some(e) = earlier {
            let before = QuoteFacts {
                clock: e.clock,
                reset_count: e.reset_count,
                restart_count: e.restart_count,
                safe: true,
            };
            if let Some(why) = facts.goes_back_from(&before) {
                return Err(format!(
                    "{why} since its last passed attestation (a replayed quote, or a TPM whose state was rolled back)"
                ));
            }
        }
        Ok((values, facts))
    }

    /// Attests `host` now: nonce, quote, checks, allowlist. Records and
    /// audits the outcome; an error says why it failed and what to run.
    pub async fn attest(self: &Arc<Self>, host: &EnrolledHost) -> Result<(), CoreError> {
        // Outcomes are recorded as of now, before the nonce goes out: of
        // two attestations of one host at once, the later-issued one wins,
        // and a release never counts a quote as younger than it is.
        let issued = now_unix();
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce)
            .map_err(|e| CoreError::Internal(format!("no random bytes: {e}")))?;
        self.attest_with(&host.name, issued, &nonce, QuoteFrom::Agent(host))
            .await
    }

    /// Checks the quote `from` gives for `nonce` (issued at `issued`)
    /// against `name`'s pinned AK and allowlist; records and audits the
    /// outcome.
    pub(crate) async fn attest_with(
        self: &Arc<Self>,
        name: &str,
        issued: i64,
        nonce: &[u8; 32],
        from: QuoteFrom<'_>,
    ) -> Result<(), CoreError> {
        let name = name.to_owned();
        let plan = {
            let n = name.clone();
            self.blocking(move |c| c.attestation_plan(&n)).await
        };
        let (ak, allow, clock) = match plan {
            Ok(p) => p,
            Err(e) => {
                if matches!(e, CoreError::Unattested(_)) {
                    let detail = e.to_string();
                    let n = name.clone();
                    self.blocking(move |c| {
                        c.record_outcome(&n, issued, false, &detail, vec![], None)
                    })
                    .await?;
                }
                return Err(e);
            }
        };
        let selection =
            PcrSelection::new(allow.values.iter().map(|(p, _)| *p)).map_err(CoreError::Internal)?;
        let (ok, detail, differing, clock) = match self
            .quote_of(from, nonce, &ak, &selection, clock)
            .await
        {
            Err(why) => (false, why, vec![], None),
            Ok((values, facts)) => {
                let mut differing = vec![];
                let mut first = None;
                for (pcr, value) in values.iter() {
                    let hex = value.to_string();
                    if !allow.values.iter().any(|(p, v)| *p == pcr && *v == hex) {
                        differing.push(pcr);
                        first.get_or_insert((pcr, *value));
                    }
                }
                let clock = TpmClock {
                    clock: facts.clock,
                    reset_count: facts.reset_count,
                    restart_count: facts.restart_count,
                };
                match first {
                    None => (
                        true,
                        format!(
                            "quote of PCRs sha256:{selection} matches the allowlists ({})",
                            allow.versions
                        ),
                        vec![],
                        Some(clock),
                    ),
                    Some((pcr, value)) => (
                        false,
                        format!(
                            "PCR {pcr} is {value}, which the allowlists ({}) do not name (software on the host changed); if the change is expected, run `{}`",
                            allow.versions,
                            allow_hint(&name, pcr, &value)
                        ),
                        differing,
                        // The quote itself verified: its clock counts.
                        Some(clock),
                    ),
                }
            }
        };
        let d = detail.clone();
        let n = name.clone();
        self.blocking(move |c| c.record_outcome(&n, issued, ok, &d, differing, clock))
            .await?;
        if ok {
            Ok(())
        } else {
            Err(CoreError::Unattested(format!(
                "host {name} failed attestation: {detail}"
            )))
        }
    }

    fn record_outcome(
        &self,
        host: &str,
        issued: i64,
        ok: bool,
        detail: &str,
        differing: Vec<u8>,
        clock: Option<TpmClock>,
    ) -> Result<(), CoreError> {
        if ok {
            tracing::info!(%host, "host attested");
        } else {
            tracing::warn!(%host, %detail, "host failed attestation");
        }
        self.write(|tx| {
            let outcome = AttestationOutcome {
                at_unix: issued,
                ok,
                detail: detail.to_owned(),
                differing: differing.clone(),
            };
            tx.record_attestation(host, &outcome, clock)?;
            let action = if ok {
                "host.attested"
            } else {
                "host.attestation_failed"
            };
            self.log(tx, "server", action, host, detail)?;
            Ok(())
        })
    }
}
