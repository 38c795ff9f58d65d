//! The host API's tonic service (enrollment, inventory and progress
//! reports, disk descriptions, the server's trust for `guestkeyd
//! trust-server`): a thin adapter like [`super::admin`].

use std::sync::Arc;

use guestkey_proto::host::{self as hpb, host_api_server::HostApi};
use tonic::{Request, Response, Status};

use crate::domain::Core;
use crate::domain::agent::QuoteAnswer;
use crate::domain::attest::TpmIdentity;
use crate::domain::halves::Wanted;
use crate::domain::hosts::{DiskQuery, HeldKey, ProgressReport};
use crate::model::{Caller, HostTpm};

use crate::transport::admin::{Want, blocking};
use crate::transport::pb::status;

/// Host API.
pub struct HostService(pub Arc<Core>);

type R<T> = Result<Response<T>, Status>;

/// The host's name, or a refusal for any other caller.
fn host_name(c: Caller, what: &str) -> Result<String, crate::model::CoreError> {
    match c {
        Caller::Host(h) => Ok(h),
        _ => Err(crate::model::CoreError::Denied(format!(
            "only hosts report {what}"
        ))),
    }
}

/// Sealed keys (or halves) as the host API answers them.
fn released(keys: Vec<crate::domain::agent::SealedKey>) -> hpb::ReleasedKeys {
    hpb::ReleasedKeys {
        keys: keys
            .into_iter()
            .map(|k| hpb::ReleasedKey {
                volume_id: k.volume_id,
                generation: k.generation,
                sealed_packet: k.sealed,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl HostApi for HostService {
    async fn enroll(&self, req: Request<hpb::EnrollRequest>) -> R<hpb::EnrollResponse> {
        // No client certificate needed: the one-time token authorises.
        let r = req.into_inner();
        let tpm = match (r.ek_public.is_empty(), r.ak_public.is_empty()) {
            (true, true) => None,
            (false, false) => Some(TpmIdentity {
                ek_public: r.ek_public,
                ek_certificate: (!r.ek_certificate.is_empty()).then_some(r.ek_certificate),
                ak_public: r.ak_public,
            }),
            _ => {
                return Err(Status::invalid_argument(
                    "enrollment refused: a TPM-bound enrollment needs both ek_public and ak_public",
                ));
            }
        };
        let (name, cert, credential) = self
            .0
            .blocking(move |c| {
                c.enroll_bound(&r.token, &r.csr_der, &r.sealing_public_key, tpm.as_ref())
            })
            .await
            .map_err(status)?;
        let (blob, secret) = credential.map(|c| (c.blob, c.secret)).unwrap_or_default();
        Ok(Response::new(hpb::EnrollResponse {
            host_name: name,
            certificate_pem: cert,
            ca_certificate_pem: self.0.server_ca_pem().to_owned(),
            server_certificate_sha256: self.0.server_cert_sha256().to_owned(),
            credential_blob: blob,
            encrypted_secret: secret,
        }))
    }

    async fn release_keys(&self, req: Request<hpb::ReleaseKeysRequest>) -> R<hpb::ReleasedKeys> {
        let host = blocking(&self.0, &req, Want::Host, |_, who| {
            host_name(who, "key requests")
        })
        .await?;
        let r = req.into_inner();
        let keys = self
            .0
            .release_on_demand(&host, &r.guest_uuid)
            .await
            .map_err(status)?;
        Ok(Response::new(released(keys)))
    }

    async fn prove_attestation_key(
        &self,
        req: Request<hpb::AttestationProof>,
    ) -> R<hpb::AttestationProven> {
        let credential = req.get_ref().credential.clone();
        let ak = blocking(&self.0, &req, Want::Host, move |c, who| {
            c.prove_attestation_key(&host_name(who, "attestation proofs")?, &credential)
        })
        .await?;
        Ok(Response::new(hpb::AttestationProven {
            attestation_key_sha256: ak,
        }))
    }

    async fn report_progress(
        &self,
        req: Request<hpb::ProgressReport>,
    ) -> R<hpb::ReportInventoryResponse> {
        let running: Vec<ProgressReport> = req
            .get_ref()
            .running
            .iter()
            .map(|p| ProgressReport {
                volume_id: p.volume_id.clone(),
                phase: p.phase.clone(),
                done_bytes: p.done_bytes,
                total_bytes: p.total_bytes,
            })
            .collect();
        blocking(&self.0, &req, Want::Host, move |c, who| {
            c.record_progress(&host_name(who, "progress")?, running)
        })
        .await?;
        Ok(Response::new(hpb::ReportInventoryResponse::default()))
    }

    async fn report_tpm(&self, req: Request<hpb::TpmReport>) -> R<hpb::ReportInventoryResponse> {
        let r = req.get_ref();
        let tpm = HostTpm {
            tcti: r.tcti.clone(),
            pcrs: r.pcrs.clone(),
            authority: r.authority.clone(),
            current: r
                .current
                .iter()
                .take(25)
                .map(|c| (u8::try_from(c.pcr).unwrap_or(u8::MAX), c.sha256.clone()))
                .collect(),
            approvals: r.approvals,
            unseals: r.unseals,
            reported_unix: 0,
        };
        let unseals = tpm.unseals;
        let host = blocking(&self.0, &req, Want::Host, move |c, who| {
            let host = host_name(who, "TPM reports")?;
            c.record_tpm(&host, tpm)?;
            Ok(host)
        })
        .await?;
        tracing::info!(%host, unseals, "TPM status reported");
        Ok(Response::new(hpb::ReportInventoryResponse::default()))
    }

    async fn report_inventory(
        &self,
        req: Request<hpb::Inventory>,
    ) -> R<hpb::ReportInventoryResponse> {
        let held: Vec<HeldKey> = req
            .get_ref()
            .held
            .iter()
            .map(|k| HeldKey {
                volume_id: k.volume_id.clone(),
                generation: k.generation,
                guest_uuid: k.guest_uuid.clone(),
            })
            .collect();
        let n = held.len();
        let (host, replica_urls) = blocking(&self.0, &req, Want::Host, move |c, who| {
            let host = host_name(who, "inventories")?;
            c.record_inventory(&host, &held)?;
            Ok((host, c.replica_urls()?))
        })
        .await?;
        tracing::info!(%host, held = n, "inventory reported");
        Ok(Response::new(hpb::ReportInventoryResponse { replica_urls }))
    }

    async fn get_server_trust(&self, req: Request<hpb::ServerTrustRequest>) -> R<hpb::ServerTrust> {
        let (ca, sha) = blocking(&self.0, &req, Want::Host, move |c, who| {
            Ok(c.server_trust(&host_name(who, "the server's trust")?))
        })
        .await?;
        Ok(Response::new(hpb::ServerTrust {
            ca_certificate_pem: ca,
            server_certificate_sha256: sha,
        }))
    }

    async fn describe_disk(
        &self,
        req: Request<hpb::DescribeDiskRequest>,
    ) -> R<hpb::DiskDescription> {
        let r = req.get_ref();
        let q = DiskQuery {
            path: r.path.chars().take(4096).collect(),
            pool: r.pool.chars().take(255).collect(),
            volume: r.volume.chars().take(255).collect(),
            secret_uuid: r.secret_uuid.chars().take(36).collect(),
        };
        let d = blocking(&self.0, &req, Want::Host, move |c, who| {
            c.describe_disk(&host_name(who, "disks")?, &q)
        })
        .await?;
        Ok(Response::new(match d {
            Some(d) => hpb::DiskDescription {
                known: true,
                volume: d.volume,
                host: d.host,
                state: d.state,
                same_secret: d.same_secret,
            },
            None => hpb::DiskDescription::default(),
        }))
    }

    async fn half_challenge(
        &self,
        req: Request<hpb::HalfChallengeRequest>,
    ) -> R<hpb::HalfChallengeResponse> {
        let (nonce, pcrs) = blocking(&self.0, &req, Want::Host, move |c, who| {
            c.half_challenge(&host_name(who, "challenges")?)
        })
        .await?;
        Ok(Response::new(hpb::HalfChallengeResponse {
            nonce: nonce.to_vec(),
            pcrs: pcrs.into_iter().map(u32::from).collect(),
        }))
    }

    async fn release_halves(
        &self,
        req: Request<hpb::ReleaseHalvesRequest>,
    ) -> R<hpb::ReleasedKeys> {
        let host = blocking(&self.0, &req, Want::Host, |_, who| {
            host_name(who, "key half requests")
        })
        .await?;
        let r = req.into_inner();
        if r.values.len() > 24 || r.quote.len() > 4096 || r.signature.len() > 1024 {
            return Err(Status::invalid_argument(
                "the quote is larger than any TPM makes (at most 24 PCRs, a 4 KiB quote, a 1 KiB signature)",
            ));
        }
        let mut values = Vec::with_capacity(r.values.len());
        for v in &r.values {
            let pcr = u8::try_from(v.pcr)
                .ok()
                .filter(|p| *p < 24)
                .ok_or_else(|| Status::invalid_argument(format!("PCR {} does not exist", v.pcr)))?;
            let bytes: [u8; 32] = v.sha256.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!("PCR {pcr}'s value is not 32 bytes"))
            })?;
            values.push((pcr, guestkey_protect::tpm::PcrValue(bytes)));
        }
        if r.halves.len() > crate::domain::halves::MAX_HALVES {
            return Err(Status::invalid_argument(format!(
                "ask for at most {} halves at once",
                crate::domain::halves::MAX_HALVES
            )));
        }
        let wanted = r
            .halves
            .into_iter()
            .map(|h| Wanted {
                volume_id: h.volume_id.chars().take(64).collect(),
                generation: h.generation,
            })
            .collect();
        let answer = QuoteAnswer {
            quote: r.quote,
            signature: r.signature,
            values,
        };
        let keys = self
            .0
            .release_halves(&host, &r.nonce, answer, wanted)
            .await
            .map_err(status)?;
        Ok(Response::new(released(keys)))
    }

    async fn forget_halves(
        &self,
        req: Request<hpb::ForgetHalvesRequest>,
    ) -> R<hpb::HalvesForgotten> {
        let r = req.get_ref().clone();
        let destroyed = blocking(&self.0, &req, Want::Host, move |c, who| {
            c.forget_halves(
                &host_name(who, "key halves")?,
                &r.volume_id,
                r.below_generation,
            )
        })
        .await?;
        Ok(Response::new(hpb::HalvesForgotten { destroyed }))
    }
}
