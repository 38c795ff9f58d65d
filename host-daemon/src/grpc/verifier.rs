//! The verifier this host enrolled with (`guestkeyd enroll-verifier`): a
//! second, independent guestkey server that keeps the other half of each
//! split volume key and releases it only after its own attestation of this
//! host (see `mgmt_server::domain::halves`).
//!
//! Its files are in `STATE_DIR/verifier/`: `server.url`, `ca.pem` (the
//! verifier's server CA), `server.sha256` (its pinned certificate),
//! `tls.key` and `tls.pem` (this host's certificate from the verifier's
//! hosts CA, made at that enrollment). The host keeps its name, its
//! packet-sealing key and its TPM attestation key: the verifier pins the
//! same AK by its own credential, so its trust in the AK is its own.

use std::path::Path;
use std::time::Duration;

use guestkey_proto::host::{
    EnrollRequest, ForgetHalvesRequest, HalfChallengeRequest, HalfQuotedPcr, HalfWanted,
    ReleaseHalvesRequest, host_api_client::HostApiClient,
};
use tonic::transport::Channel;

use super::enroll::{
    EnrollError, EnrollmentToken, check_ca, forget_challenge, keep_challenge, link_error, prove,
    retry_proof_at, server_peer,
};
use super::link::ServerLink;
use crate::model::VolumeId;
use crate::ops::HalfSource;
use crate::ops::requests::SealedKey;
use crate::protect::{HostAttestation, HostKeys, HostProtectors};
use crate::state::{StateDir, private_dir, write_atomic};

/// The verifier's folder of a state directory.
pub const VERIFIER_DIR: &str = "verifier";

/// How long a half request waits for the verifier.
const ANSWER: Duration = Duration::from_secs(30);

/// The verifier's files of `dir`.
fn verifier_dir(dir: &StateDir) -> StateDir {
    StateDir::new(dir.file(VERIFIER_DIR))
}

/// Enrolls this (already enrolled, TPM-bound) host with the verifier at
/// `server`, under the same name, with the same packet-sealing key and
/// attestation key, and proves the AK to it. Returns the host name.
pub async fn enroll_verifier(
    server: &str,
    token: &EnrollmentToken,
    ca_file: &Path,
    dir: &StateDir,
) -> Result<String, EnrollError> {
    let vdir = verifier_dir(dir);
    if vdir.file("tls.pem").exists() {
        return Err(EnrollError(format!(
            "{} is already enrolled with a verifier ({} exists): remove that folder to enroll with another",
            dir.root().display(),
            vdir.root().display()
        )));
    }
    let ak = HostAttestation::load(dir)
        .map_err(EnrollError)?
        .ok_or_else(|| {
            EnrollError(format!(
                "{} was enrolled without a TPM: a verifier releases halves only to a host it attests, so enroll this host with `guestkeyd enroll --tpm` first",
                dir.root().display()
            ))
        })?;
    let protectors = HostProtectors::for_dir(dir);
    let keys = HostKeys::load(dir, &*protectors.sealing).map_err(|e| EnrollError(e.to_string()))?;
    let endorsement = ak.endorsement().map_err(EnrollError)?;
    let ca = std::fs::read_to_string(ca_file).map_err(|e| {
        EnrollError(format!(
            "cannot read the CA file {}: {e} (`guestkeyctl ca-cert` against the verifier prints it)",
            ca_file.display()
        ))
    })?;
    check_ca(&ca, ca_file)?;
    let link = ServerLink::new(server, server_peer(server, &ca, ca_file)?, None)
        .map_err(|e| EnrollError(format!("--ca-file {}: {e}", ca_file.display())))?;
    let tls_key =
        rcgen::KeyPair::generate().map_err(|e| EnrollError(format!("key generation: {e}")))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&tls_key))
        .map_err(|e| EnrollError(format!("certificate request: {e}")))?;
    let channel = link
        .connect(Duration::from_secs(30))
        .await
        .map_err(|e| link_error(server, e))?;
    let r = HostApiClient::new(channel)
        .enroll(EnrollRequest {
            token: token.expose().to_owned(),
            csr_der: csr.der().to_vec(),
            sealing_public_key: keys.sealing_public().to_vec(),
            ek_public: endorsement.public.clone(),
            ek_certificate: endorsement.certificate.clone().unwrap_or_default(),
            ak_public: ak.public().to_vec(),
        })
        .await
        .map_err(|s| {
            EnrollError(format!(
                "the verifier refused the enrollment: {}",
                s.message()
            ))
        })?
        .into_inner();
    let me = keys.host.as_str();
    if r.host_name != me {
        return Err(EnrollError(format!(
            "the verifier enrolled this host as {:?}, but it is {me:?} at the management server: the verifier's admin must register it under the same name (`guestkeyctl host add {me}` against the verifier); nothing was written",
            r.host_name
        )));
    }
    let seen = link.verified_sha256().unwrap_or_default();
    if r.server_certificate_sha256 != seen {
        return Err(EnrollError(format!(
            "the verifier's answer names certificate sha256 {}, but it presented {seen}: nothing was written",
            r.server_certificate_sha256
        )));
    }
    check_ca(&r.ca_certificate_pem, Path::new("the verifier's answer"))?;
    if r.credential_blob.is_empty() {
        return Err(EnrollError(
            "the verifier sent no attestation challenge for this host's TPM: it cannot attest it"
                .into(),
        ));
    }
    // Into verifier.new, renamed into place once complete.
    let staged = StateDir::new(dir.file("verifier.new"));
    let _ = std::fs::remove_dir_all(staged.root());
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e: std::io::Error| EnrollError(format!("cannot write {}: {e}", p.display()))
    };
    private_dir(staged.root()).map_err(io(staged.root()))?;
    let key_pem = zeroize::Zeroizing::new(tls_key.serialize_pem());
    for (f, bytes) in [
        ("server.url", server.as_bytes()),
        ("ca.pem", r.ca_certificate_pem.as_bytes()),
        ("server.sha256", r.server_certificate_sha256.as_bytes()),
        ("tls.key", key_pem.as_bytes()),
        ("tls.pem", r.certificate_pem.as_bytes()),
    ] {
        write_atomic(&staged.file(f), bytes).map_err(io(&staged.file(f)))?;
    }
    std::fs::rename(staged.root(), vdir.root()).map_err(io(vdir.root()))?;
    // The proof, over the new link: the verifier pins the AK only then.
    // Its credential is kept until then: `guestkeyd run` tries again.
    keep_challenge(&vdir, &r.credential_blob, &r.encrypted_secret)?;
    prove(server, &vdir, &ak, &r.credential_blob, &r.encrypted_secret)
        .await
        .map_err(|e| {
            EnrollError(format!(
                "host {me} is enrolled with the verifier, but its attestation key was not proven to it yet ({e}): guestkeyd tries again each time it starts; until then the verifier releases no half to this host"
            ))
        })?;
    forget_challenge(&vdir);
    Ok(r.host_name)
}

/// At `guestkeyd run`: the AK's proof to the verifier, if it did not go
/// through at `enroll-verifier`, is tried again.
pub async fn retry_verifier_proof(dir: StateDir) {
    retry_proof_at(verifier_dir(&dir), dir).await;
}

/// The verifier as the daemon asks it for halves; called from blocking
/// threads.
pub struct VerifierHalves {
    rt: tokio::runtime::Handle,
    link: ServerLink,
    url: String,
    ak: std::sync::Arc<HostAttestation>,
    client: tokio::sync::Mutex<Option<HostApiClient<Channel>>>,
}

impl VerifierHalves {
    /// The verifier of this state directory (None: not enrolled with one).
    pub fn new(dir: &StateDir, rt: tokio::runtime::Handle) -> Result<Option<Self>, String> {
        let vdir = verifier_dir(dir);
        let Some(link) = ServerLink::from_state(&vdir).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let ak = HostAttestation::load(dir)?.ok_or_else(|| {
            format!(
                "{} has a verifier but no attestation key",
                dir.root().display()
            )
        })?;
        let url = super::link::server_urls(
            &std::fs::read_to_string(vdir.file("server.url")).unwrap_or_default(),
        )
        .join(", ");
        Ok(Some(Self {
            rt,
            link,
            url,
            ak: std::sync::Arc::new(ak),
            client: tokio::sync::Mutex::new(None),
        }))
    }

    async fn client(&self) -> Result<HostApiClient<Channel>, String> {
        let mut guard = self.client.lock().await;
        Ok(super::report::connected(&mut guard, &self.link)
            .await
            .map_err(|e| format!("cannot reach it: {e}"))?
            .clone())
    }

    async fn forget_client(&self, e: &tonic::Status) {
        if e.code() == tonic::Code::Unavailable {
            *self.client.lock().await = None;
        }
    }
}

impl HalfSource for VerifierHalves {
    fn url(&self) -> &str {
        &self.url
    }

    fn halves(&self, wanted: &[(VolumeId, u64)]) -> Result<Vec<SealedKey>, String> {
        let ask = async {
            let mut c = self.client().await?;
            let challenge = match c.half_challenge(HalfChallengeRequest {}).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    self.forget_client(&e).await;
                    return Err(e.message().to_owned());
                }
            };
            let pcrs: Vec<u8> = challenge
                .pcrs
                .iter()
                .map(|p| u8::try_from(*p).map_err(|_| format!("it asked for PCR {p}")))
                .collect::<Result<_, _>>()?;
            let ak = self.ak.clone();
            let nonce = challenge.nonce.clone();
            let quote = tokio::task::spawn_blocking(move || ak.quote(&nonce, &pcrs))
                .await
                .map_err(|e| format!("the quote failed: {e}"))?
                .map_err(|e| format!("this host's TPM did not quote: {e}"))?;
            let req = ReleaseHalvesRequest {
                nonce: challenge.nonce,
                quote: quote.attest,
                signature: quote.signature,
                values: quote
                    .values
                    .iter()
                    .map(|(pcr, v)| HalfQuotedPcr {
                        pcr: u32::from(pcr),
                        sha256: v.0.to_vec(),
                    })
                    .collect(),
                halves: wanted
                    .iter()
                    .map(|(v, g)| HalfWanted {
                        volume_id: v.to_string(),
                        generation: *g,
                    })
                    .collect(),
            };
            match c.release_halves(req).await {
                Ok(r) => Ok(r.into_inner()),
                Err(e) => {
                    self.forget_client(&e).await;
                    Err(e.message().to_owned())
                }
            }
        };
        let r = self.rt.block_on(async {
            tokio::time::timeout(ANSWER, ask)
                .await
                .map_err(|_| format!("it did not answer within {} s", ANSWER.as_secs()))?
        })?;
        super::lookup::sealed_keys(r)
    }

    fn forget(&self, volume: VolumeId, below: u64) -> Result<u32, String> {
        let ask = async {
            let mut c = self.client().await?;
            match c
                .forget_halves(ForgetHalvesRequest {
                    volume_id: volume.to_string(),
                    below_generation: below,
                })
                .await
            {
                Ok(r) => Ok(r.into_inner().destroyed),
                Err(e) => {
                    self.forget_client(&e).await;
                    Err(e.message().to_owned())
                }
            }
        };
        self.rt.block_on(async {
            tokio::time::timeout(ANSWER, ask)
                .await
                .map_err(|_| format!("it did not answer within {} s", ANSWER.as_secs()))?
        })
    }
}
