//! `guestkeyd enroll`: makes the host's key pairs here (private keys never
//! leave the host), presents the one-time token with a CSR and the sealing
//! public key, and stores what the server returns.

use std::path::Path;

use guestkey_proto::host::{EnrollRequest, host_api_client::HostApiClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use xdr_wipe::seal::HostSealingKey;

use crate::state::{StateDir, private_dir, write_atomic};

/// Enrollment failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EnrollError(pub String);

/// Enrolls this host. Refuses a state directory that is already enrolled.
pub async fn enroll(
    server: &str,
    token: &str,
    ca_file: &Path,
    dir: &StateDir,
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
    let domain = tls_name(server)
        .ok_or_else(|| EnrollError(format!("server URL {server:?} must start with https://")))?;

    let tls_key =
        rcgen::KeyPair::generate().map_err(|e| EnrollError(format!("key generation: {e}")))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&tls_key))
        .map_err(|e| EnrollError(format!("certificate request: {e}")))?;
    let sealing = HostSealingKey::generate();

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name(domain);
    let channel = Endpoint::from_shared(server.to_owned())
        .map_err(|e| EnrollError(format!("bad server URL {server:?}: {e}")))?
        .tls_config(tls)
        .map_err(|e| EnrollError(format!("TLS: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| {
            EnrollError(format!(
                "cannot reach guestkey-server at {server}: {e} (check --server and --ca-file)"
            ))
        })?;
    let r = HostApiClient::new(channel)
        .enroll(EnrollRequest {
            token: token.trim().to_owned(),
            csr_der: csr.der().to_vec(),
            sealing_public_key: sealing.public_key().as_bytes().to_vec(),
        })
        .await
        .map_err(|s| {
            EnrollError(format!(
                "the server refused the enrollment: {}",
                s.message()
            ))
        })?
        .into_inner();

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
    write_atomic(
        &dir.file("sealing.key"),
        sealing.expose_secret_bytes().as_ref(),
    )
    .map_err(io(&dir.file("sealing.key")))?;
    let key_pem = zeroize::Zeroizing::new(tls_key.serialize_pem());
    write_atomic(&dir.file("tls.key"), key_pem.as_bytes()).map_err(io(&dir.file("tls.key")))?;
    // Last: its presence means "enrolled".
    write_atomic(&dir.file("tls.pem"), r.certificate_pem.as_bytes())
        .map_err(io(&dir.file("tls.pem")))?;
    Ok(r.host_name)
}

/// The name TLS checks for `HOST:PORT` or `https://HOST:PORT/...`: the host
/// part, without IPv6 brackets. None for a URL that is not https.
pub fn tls_name(url_or_address: &str) -> Option<String> {
    let rest = if url_or_address.contains("://") {
        url_or_address.strip_prefix("https://")?
    } else {
        url_or_address
    };
    let hostport = rest.split('/').next().unwrap_or_default();
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}
