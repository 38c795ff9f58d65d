//! `guestkeyd enroll`: makes the host's key pairs here (private keys never
//! leave the host), presents the one-time token with a CSR and the sealing
//! public key, and stores what the server returns. The server is trusted
//! through `--ca-file` only, which must be the server CA: a host's or an
//! admin's certificate (other CAs) never passes as the server, and the
//! server certificate hash it pins from then on must be that of the
//! certificate it just verified.

use std::path::Path;

use guestkey_pinned_tls::Peer;
use guestkey_protect::tpm::attest::Endorsement;
use guestkey_proto::host::{AttestationProof, EnrollRequest, host_api_client::HostApiClient};
use secrecy::{ExposeSecret, SecretString};
use xdr_wipe::seal::HostSealingKey;

use super::link::{LinkError, ServerLink};

use guestkey_protect::tpm::TpmTarget;

use crate::protect::{ATTESTATION_DIR, HostAttestation, HostKeys, HostProtectors};
use crate::state::{StateDir, private_dir, write_atomic};

/// The one-time enrollment token: a secret from the admin, read from a
/// file, standard input or the environment (never argv, which other users
/// see in /proc and shells keep in their history). Not `Clone`; `Debug`
/// redacts.
pub struct EnrollmentToken(SecretString);

impl EnrollmentToken {
    /// The token in `text` (surrounding white space ignored).
    pub fn new(text: &str) -> Result<Self, EnrollError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(EnrollError(
                "the enrollment token is empty: `guestkeyctl host add` prints one".into(),
            ));
        }
        if t.len() > 256 || !t.chars().all(|c| c.is_ascii_graphic()) {
            return Err(EnrollError(
                "that is not an enrollment token (gkt_ followed by 43 characters): `guestkeyctl host add` prints one".into(),
            ));
        }
        Ok(Self(SecretString::from(t.to_owned())))
    }

    /// Reads the token from `path` (`-`: standard input).
    pub fn read(path: &Path) -> Result<Self, EnrollError> {
        use std::io::Read;
        let mut text = zeroize::Zeroizing::new(String::with_capacity(512));
        let read = if path == Path::new("-") {
            std::io::stdin().take(4096).read_to_string(&mut text)
        } else {
            std::fs::File::open(path).and_then(|f| f.take(4096).read_to_string(&mut text))
        };
        read.map_err(|e| {
            EnrollError(format!(
                "cannot read the enrollment token from {}: {e}",
                path.display()
            ))
        })?;
        Self::new(&text)
    }
}

impl EnrollmentToken {
    /// The token's text, for the enrollment request.
    pub(super) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentToken([REDACTED])")
    }
}

/// What to do when the server's certificate is not what `--ca-file` signs.
pub(super) const CA_HINT: &str = "--ca-file must be the server CA that `guestkeyctl ca-cert` prints (DATA_DIR/ca/server-ca.pem on the server) and --server must name that server: a host's or an admin's certificate never passes as the server";

/// The server at `server` as `--ca-file` vouches for it (no pin yet).
pub(super) fn server_peer(server: &str, ca: &str, ca_file: &Path) -> Result<Peer, EnrollError> {
    let name = guestkey_pinned_tls::tls_name(server)
        .ok_or_else(|| EnrollError(format!("server URL {server:?} must start with https://")))?;
    Ok(Peer {
        who: format!("the server at {server}"),
        roots_pem: ca.to_owned(),
        roots_from: format!("the CA in --ca-file {}", ca_file.display()),
        name,
        pin: None,
        hint: CA_HINT.into(),
    })
}

/// A connection failure as advice.
pub(super) fn link_error(server: &str, e: LinkError) -> EnrollError {
    match e {
        LinkError::Refused(m) => EnrollError(m),
        e => EnrollError(format!(
            "cannot reach guestkey-server at {server}: {e} (check --server and --ca-file)"
        )),
    }
}

/// Checks that `pem` holds at least one certificate; says which file does
/// not.
pub(super) fn check_ca(pem: &str, ca_file: &Path) -> Result<(), EnrollError> {
    let mut found = false;
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        match p {
            Ok(p) if p.label == "CERTIFICATE" => {
                p.parse_x509().map_err(|e| {
                    EnrollError(format!(
                        "{} holds a certificate that does not parse: {e}",
                        ca_file.display()
                    ))
                })?;
                found = true;
            }
            Ok(_) => {}
            Err(e) => {
                return Err(EnrollError(format!(
                    "{} is not PEM text: {e}",
                    ca_file.display()
                )));
            }
        }
    }
    if found {
        Ok(())
    } else {
        Err(EnrollError(format!(
            "{} holds no PEM certificate: give the server CA certificate (`guestkeyctl ca-cert` prints it)",
            ca_file.display()
        )))
    }
}

/// Enrollment failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EnrollError(pub String);

/// Enrolls this host. Refuses a state directory that is already enrolled.
///
/// With `tpm`, the packet-sealing key is made from TPM and OS random bytes
/// and sealed to the TPM before the token is presented (a TPM that does
/// not work costs no token); the store key is sealed there at the first
/// `run`.
pub async fn enroll(
    server: &str,
    token: &EnrollmentToken,
    ca_file: &Path,
    dir: &StateDir,
    tpm: Option<&TpmTarget>,
) -> Result<String, EnrollError> {
    if dir.file("tls.pem").exists() {
        return Err(EnrollError(format!(
            "{} is already enrolled (tls.pem exists): use another --state-dir, or remove it to enroll again",
            dir.root().display()
        )));
    }
    let ca = std::fs::read_to_string(ca_file).map_err(|e| {
        EnrollError(format!(
            "cannot read the CA file {}: {e} (`guestkeyctl ca-cert` prints it)",
            ca_file.display()
        ))
    })?;
    check_ca(&ca, ca_file)?;
    let link = ServerLink::new(server, server_peer(server, &ca, ca_file)?, None)
        .map_err(|e| EnrollError(format!("--ca-file {}: {e}", ca_file.display())))?;

    let tpm_err = |e: guestkey_protect::tpm::TpmError| EnrollError(format!("--tpm: {e}"));
    // With a TPM every key made here mixes its random bytes in.
    let entropy = tpm
        .map(|t| guestkey_protect::tpm::Entropy::with_tpm(&t.tcti))
        .transpose()
        .map_err(tpm_err)?;
    let tls_key = match &entropy {
        None => rcgen::KeyPair::generate(),
        Some(e) => {
            let der = e.p256_pkcs8().map_err(tpm_err)?;
            rcgen::KeyPair::try_from(der.as_slice())
        }
    }
    .map_err(|e| EnrollError(format!("key generation: {e}")))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&tls_key))
        .map_err(|e| EnrollError(format!("certificate request: {e}")))?;
    let staged = dir.root().join("tpm.new");
    let attest_staged = dir.root().join("attestation.new");
    let _ = std::fs::remove_dir_all(&attest_staged);
    let sealing = match (tpm, &entropy) {
        (Some(target), Some(e)) => stage_tpm(dir, &staged, target, e).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&staged);
        })?,
        _ => HostSealingKey::generate(),
    };
    // The TPM's identity, made before the token is spent: the EK, and an
    // AK whose files wait in attestation.new until the enrollment is done.
    let identity = match tpm {
        Some(t) => Some(
            HostAttestation::make(&attest_staged, &t.tcti)
                .map_err(|e| EnrollError(format!("--tpm: the attestation key: {e}")))
                .inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(&staged);
                    let _ = std::fs::remove_dir_all(&attest_staged);
                })?,
        ),
        None => None,
    };
    let r = exchange(
        server,
        token,
        &link,
        &csr,
        &sealing,
        dir,
        &tls_key,
        tpm.is_some(),
        identity.as_ref(),
    )
    .await;
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&staged);
        let _ = std::fs::remove_dir_all(&attest_staged);
    }
    let (name, challenge) = r?;
    if let (Some((ak, _)), Some((blob, secret))) = (identity, challenge) {
        // Kept until the proof went through: `guestkeyd run` tries again.
        let keep = |f: &str, b: &[u8]| {
            let p = dir.file(ATTESTATION_DIR).join(f);
            write_atomic(&p, b)
                .map_err(|e| EnrollError(format!("cannot write {}: {e}", p.display())))
        };
        keep(CHALLENGE_BLOB, &blob)?;
        keep(CHALLENGE_SECRET, &secret)?;
        prove(server, dir, &ak, &blob, &secret).await.map_err(|e| {
            EnrollError(format!(
                "host {name} is enrolled, but its attestation key was not proven to live in its TPM yet ({e}): guestkeyd tries again each time it starts; until then volumes whose key release is `attested` cannot go to it"
            ))
        })?;
        forget_challenge(dir);
    }
    Ok(name)
}

/// The credential the server made at enrollment, kept until the proof
/// went through.
const CHALLENGE_BLOB: &str = "challenge.blob";
const CHALLENGE_SECRET: &str = "challenge.secret";

pub(super) fn forget_challenge(dir: &StateDir) {
    for f in [CHALLENGE_BLOB, CHALLENGE_SECRET] {
        let _ = std::fs::remove_file(dir.file(ATTESTATION_DIR).join(f));
    }
}

/// At `guestkeyd run`: a proof of the attestation key that did not go
/// through at enrollment is tried again. Logged either way.
pub async fn retry_proof(dir: StateDir) {
    retry_proof_at(dir.clone(), dir).await;
}

/// Keeps a server's credential in `link_dir` until its proof went
/// through.
pub(super) fn keep_challenge(
    link_dir: &StateDir,
    blob: &[u8],
    secret: &[u8],
) -> Result<(), EnrollError> {
    let root = link_dir.file(ATTESTATION_DIR);
    private_dir(&root)
        .map_err(|e| EnrollError(format!("cannot create {}: {e}", root.display())))?;
    for (f, b) in [(CHALLENGE_BLOB, blob), (CHALLENGE_SECRET, secret)] {
        let p = root.join(f);
        write_atomic(&p, b)
            .map_err(|e| EnrollError(format!("cannot write {}: {e}", p.display())))?;
    }
    Ok(())
}

/// As [`retry_proof`], for the server whose link files are in `link_dir`
/// (the state directory, or its `verifier/`), with the AK of `ak_dir`.
pub(super) async fn retry_proof_at(link_dir: StateDir, ak_dir: StateDir) {
    let dir = link_dir;
    let root = dir.file(ATTESTATION_DIR);
    let (Ok(blob), Ok(secret)) = (
        std::fs::read(root.join(CHALLENGE_BLOB)),
        std::fs::read(root.join(CHALLENGE_SECRET)),
    ) else {
        return;
    };
    let ak = match HostAttestation::load(&ak_dir) {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "the attestation key's proof was not tried again");
            return;
        }
    };
    let urls = std::fs::read_to_string(dir.file("server.url")).unwrap_or_default();
    let server = super::link::server_urls(&urls).join(", ");
    match prove(&server, &dir, &ak, &blob, &secret).await {
        Ok(()) => {
            forget_challenge(&dir);
            tracing::info!("the attestation key was proven to the server and pinned");
        }
        Err(e) => {
            tracing::warn!(error = %e, "the attestation key is not proven to the server yet: tried again at the next start")
        }
    }
}

/// The second half of a TPM-bound enrollment: the TPM recovers the
/// server's credential (only if the AK lives in the TPM of the EK), and the
/// host sends it back over its new mutual-TLS link.
pub(super) async fn prove(
    server: &str,
    dir: &StateDir,
    ak: &HostAttestation,
    blob: &[u8],
    secret: &[u8],
) -> Result<(), String> {
    let credential = ak.activate(blob, secret)?;
    let link = ServerLink::from_state(dir)
        .map_err(|e| e.to_string())?
        .ok_or("the enrollment's files are missing")?;
    let channel = link
        .connect(std::time::Duration::from_secs(30))
        .await
        .map_err(|e| link_error(server, e).0)?;
    HostApiClient::new(channel)
        .prove_attestation_key(AttestationProof {
            credential: credential.to_vec(),
        })
        .await
        .map_err(|s| format!("the server refused the proof: {}", s.message()))?;
    Ok(())
}

/// Seals a new packet-sealing key into `staged` (the state directory's
/// `tpm/` to be) with the TPM settings and an approval of the current PCR
/// values.
fn stage_tpm(
    dir: &StateDir,
    staged: &Path,
    target: &TpmTarget,
    entropy: &guestkey_protect::tpm::Entropy,
) -> Result<HostSealingKey, EnrollError> {
    let tpm_err = |e: guestkey_protect::tpm::TpmError| EnrollError(format!("--tpm: {e}"));
    private_dir(dir.root())
        .map_err(|e| EnrollError(format!("cannot create {}: {e}", dir.root().display())))?;
    let sealed = dir.root().join("tpm");
    if sealed.exists() {
        return Err(EnrollError(format!(
            "{} exists (sealed keys of an earlier enrollment): remove it to enroll again",
            sealed.display()
        )));
    }
    let _ = std::fs::remove_dir_all(staged);
    let set = crate::protect::keyset(dir.root());
    let site = set.prepare_site(staged, target).map_err(tpm_err)?;
    let bytes = entropy.key(32).map_err(tpm_err)?;
    let sealing = HostSealingKey::from_secret_bytes(bytes.expose_secret())
        .map_err(|_| EnrollError("--tpm: the new packet-sealing key is not 32 bytes".into()))?;
    let blob = staged.join(format!("{}.tpm", crate::protect::KEYS[0].name));
    HostKeys::protect_new(&sealing, &site.protector(staged, &blob))
        .map_err(|e| EnrollError(format!("--tpm: cannot seal the packet-sealing key: {e}")))?;
    site.save(staged).map_err(tpm_err)?;
    Ok(sealing)
}

/// The enrollment call and what it leaves in the state directory.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    server: &str,
    token: &EnrollmentToken,
    link: &ServerLink,
    csr: &rcgen::CertificateSigningRequest,
    sealing: &HostSealingKey,
    dir: &StateDir,
    tls_key: &rcgen::KeyPair,
    tpm: bool,
    identity: Option<&(HostAttestation, Endorsement)>,
) -> Result<(String, Option<(Vec<u8>, Vec<u8>)>), EnrollError> {
    let channel = link
        .connect(std::time::Duration::from_secs(30))
        .await
        .map_err(|e| link_error(server, e))?;
    let r = HostApiClient::new(channel)
        .enroll(EnrollRequest {
            // prost needs a String: this copy goes into the request buffer.
            token: token.0.expose_secret().to_owned(),
            csr_der: csr.der().to_vec(),
            sealing_public_key: sealing.public_key().as_bytes().to_vec(),
            ek_public: identity
                .map(|(_, ek)| ek.public.clone())
                .unwrap_or_default(),
            ek_certificate: identity
                .and_then(|(_, ek)| ek.certificate.clone())
                .unwrap_or_default(),
            ak_public: identity
                .map(|(ak, _)| ak.public().to_vec())
                .unwrap_or_default(),
        })
        .await
        .map_err(|s| {
            EnrollError(format!(
                "the server refused the enrollment: {}",
                s.message()
            ))
        })?
        .into_inner();
    // What the host-agent API will accept calls from: the certificate this
    // connection verified, and nothing the answer says otherwise.
    let seen = link.verified_sha256().unwrap_or_default();
    if r.server_certificate_sha256 != seen {
        return Err(EnrollError(format!(
            "the server's answer names certificate sha256 {}, but it presented {seen}: nothing was pinned or written (ask the admin for a new token once the server is right)",
            r.server_certificate_sha256
        )));
    }
    check_ca(&r.ca_certificate_pem, Path::new("the server's answer"))?;

    let io = |p: &Path| {
        let p = p.to_owned();
        move |e: std::io::Error| EnrollError(format!("cannot write {}: {e}", p.display()))
    };
    private_dir(dir.root()).map_err(io(dir.root()))?;
    write_atomic(&dir.file("host"), r.host_name.as_bytes()).map_err(io(&dir.file("host")))?;
    write_atomic(&dir.file("server.url"), server.as_bytes())
        .map_err(io(&dir.file("server.url")))?;
    write_atomic(&dir.file("ca.pem"), r.ca_certificate_pem.as_bytes())
        .map_err(io(&dir.file("ca.pem")))?;
    write_atomic(
        &dir.file("server.sha256"),
        r.server_certificate_sha256.as_bytes(),
    )
    .map_err(io(&dir.file("server.sha256")))?;
    if identity.is_some() {
        let staged = dir.root().join("attestation.new");
        std::fs::rename(&staged, dir.file(ATTESTATION_DIR)).map_err(io(&staged))?;
    }
    if tpm {
        // The sealed key and the TPM settings, into place in one rename.
        let staged = dir.root().join("tpm.new");
        std::fs::rename(&staged, dir.root().join("tpm")).map_err(io(&staged))?;
    } else {
        let protectors = HostProtectors::files(dir);
        HostKeys::protect_new(sealing, &*protectors.sealing)
            .map_err(|e| EnrollError(format!("cannot keep the packet-sealing key: {e}")))?;
    }
    let key_pem = zeroize::Zeroizing::new(tls_key.serialize_pem());
    write_atomic(&dir.file("tls.key"), key_pem.as_bytes()).map_err(io(&dir.file("tls.key")))?;
    // Last: its presence means "enrolled".
    write_atomic(&dir.file("tls.pem"), r.certificate_pem.as_bytes())
        .map_err(io(&dir.file("tls.pem")))?;
    let challenge =
        (!r.credential_blob.is_empty()).then_some((r.credential_blob, r.encrypted_secret));
    if identity.is_some() && challenge.is_none() {
        return Err(EnrollError(format!(
            "host {} is enrolled, but the server sent no attestation challenge for its TPM: it cannot be attested",
            r.host_name
        )));
    }
    Ok((r.host_name, challenge))
}
