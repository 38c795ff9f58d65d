//! The admin credential and the connection: reads the admin directory
//! (`server`, `ca.pem`, `admin.pem`, `admin.key`), checks what can be
//! checked before connecting (the CA file holds certificates, the admin
//! certificate is within its validity), connects over mutual TLS, and turns
//! transport and RPC failures into one line of advice. Imports only the
//! crate root's `Failure`; every subcommand group imports it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use guestkey_proto::admin::admin_client::AdminClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Failure;

/// A connected admin API client.
pub(crate) type Client = AdminClient<Channel>;

/// What every subcommand needs: where the server is, the credential, and
/// whether to print JSON.
pub(crate) struct Ctx {
    server: Option<String>,
    admin_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    pub(crate) json: bool,
}

impl Ctx {
    pub(crate) fn new(server: Option<String>, admin_dir: Option<PathBuf>, json: bool) -> Self {
        Self {
            server,
            admin_dir,
            json,
        }
    }

    /// Connects with the usual 60-second limit per call.
    pub(crate) async fn connect(&self) -> Result<Client, Failure> {
        self.connect_with_timeout(Duration::from_secs(60)).await
    }

    /// Connects; each call may take up to `timeout`.
    pub(crate) async fn connect_with_timeout(&self, timeout: Duration) -> Result<Client, Failure> {
        let dir = self.admin_dir.clone().ok_or_else(|| {
            Failure("no admin credential: pass --admin-dir DIR or set GUESTKEY_ADMIN_DIR (DATA_DIR/admin of the server)".into())
        })?;
        let url = match &self.server {
            Some(u) => u.clone(),
            None => read(&dir, "server")?.trim().to_owned(),
        };
        let domain = mgmt_server::tls::tls_name(&url)
            .ok_or_else(|| Failure(format!("server URL {url:?} must start with https://")))?;
        check_admin_certificate(&dir, &read(&dir, "admin.pem")?)?;
        let key = zeroize::Zeroizing::new(read(&dir, "admin.key")?);
        let ca = read(&dir, "ca.pem")?;
        check_ca_certificate(&dir, &ca)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(read(&dir, "admin.pem")?, key.as_bytes()))
            .domain_name(domain);
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| Failure(format!("bad server URL {url:?}: {e}")))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| Failure(transport_hint(&url, &mgmt_server::tls::error_chain(&e))))?;
        Ok(AdminClient::new(channel))
    }
}

fn read(dir: &Path, file: &str) -> Result<String, Failure> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| {
        Failure(format!(
            "cannot read {}: {e} (--admin-dir must be the admin directory made by `guestkey-server init`)",
            path.display()
        ))
    })
}

/// Says plainly when our own certificate is expired or not yet valid: the
/// server can only close the connection, which explains nothing.
fn check_admin_certificate(dir: &Path, pem: &str) -> Result<(), Failure> {
    let path = dir.join("admin.pem");
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| Failure(format!("{} is not a PEM certificate", path.display())))?;
    let cert = parsed.parse_x509().map_err(|_| {
        Failure(format!(
            "{} is not a valid X.509 certificate",
            path.display()
        ))
    })?;
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > v.not_after {
        return Err(Failure(format!(
            "the admin certificate {} expired on {}: the server refuses it; issue a new admin credential",
            path.display(),
            v.not_after
        )));
    }
    if now < v.not_before {
        return Err(Failure(format!(
            "the admin certificate {} is not valid before {}",
            path.display(),
            v.not_before
        )));
    }
    Ok(())
}

/// The CA file must hold at least one certificate, and each must parse:
/// TLS would otherwise fail later with a bare "transport error".
fn check_ca_certificate(dir: &Path, pem: &str) -> Result<(), Failure> {
    let path = dir.join("ca.pem");
    let fix = "it must hold the server's CA certificate as `guestkey-server init` wrote it (DATA_DIR/ca/ca.pem)";
    let mut certificates = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block =
            block.map_err(|_| Failure(format!("{} is not valid PEM: {fix}", path.display())))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        block.parse_x509().map_err(|_| {
            Failure(format!(
                "{} holds a certificate that is not valid X.509: {fix}",
                path.display()
            ))
        })?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(Failure(format!(
            "{} holds no certificate: {fix}",
            path.display()
        )));
    }
    Ok(())
}

/// Turns TLS and connection failures into advice.
fn transport_hint(url: &str, detail: &str) -> String {
    let d = detail.to_ascii_lowercase();
    let advice = if d.contains("unknownissuer")
        || d.contains("unknown issuer")
        || d.contains("invalid peer certificate")
    {
        "the server's certificate is not signed by the CA in --admin-dir: is this the admin credential of this server?"
    } else if d.contains("connection refused") {
        "nothing listens there: is guestkey-server running, and is --server right?"
    } else if d.contains("certificate")
        || d.contains("handshake")
        || d.contains("alert")
        || d.contains("closed")
    {
        "the server refused our client certificate: --admin-dir must hold the admin credential of this server (another CA's, an expired or a revoked certificate is refused)"
    } else {
        "check --server and that guestkey-server is running"
    };
    format!("cannot reach guestkey-server at {url}: {advice} ({detail})")
}

/// An RPC's failure as one line: the server's message, or advice when the
/// transport failed.
pub(crate) fn rpc_error(s: tonic::Status) -> Failure {
    let msg = s.message();
    if s.code() == tonic::Code::Unavailable
        || s.code() == tonic::Code::Unknown && msg.contains("transport")
    {
        return Failure(transport_hint("the server", msg));
    }
    if msg.is_empty() {
        Failure(format!("{:?}", s.code()))
    } else {
        Failure(msg.to_owned())
    }
}
