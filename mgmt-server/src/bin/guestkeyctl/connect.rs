//! The admin credential and the connection: reads the admin directory
//! (`server`, `ca.pem`, `server.sha256`, `admin.pem`, `admin.key`), checks
//! what can be checked before connecting (the CA file holds certificates,
//! the pin is a SHA-256, the admin certificate is within its validity),
//! connects over mutual TLS trusting only the server CA in `ca.pem` and
//! only the server certificate `server.sha256` names
//! (`guestkey_pinned_tls`), and turns transport and RPC failures into one
//! line of advice. Imports only the crate root's `Failure`; every
//! subcommand group imports it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use guestkey_pinned_tls::{ConnectError, Connector, Peer};
use guestkey_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

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
        let admin_pem = read(&dir, "admin.pem")?;
        check_admin_certificate(&dir, &admin_pem)?;
        let key = zeroize::Zeroizing::new(read(&dir, "admin.key")?);
        let ca = read(&dir, "ca.pem")?;
        check_ca_certificate(&dir, &ca)?;
        let pin = read_pin(&dir)?;
        let connector = Connector::new(
            Peer {
                who: "the server".into(),
                roots_pem: ca,
                roots_from: format!("the server CA in {}", dir.join("ca.pem").display()),
                name: domain,
                pin: Some(pin),
                hint: "is this the server of this admin credential? (--server or GUESTKEY_SERVER must name the server whose DATA_DIR/admin this is)".into(),
            },
            Some((&admin_pem, &key)),
        )
        .map_err(|e| Failure(format!("the admin credential in {}: {e}", dir.display())))?;
        let uri = guestkey_pinned_tls::endpoint_uri(&url)
            .ok_or_else(|| Failure(format!("server URL {url:?} must start with https://")))?;
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Failure(format!("bad server URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .connect_with_connector(connector)
            .await
            .map_err(|e| Failure(connect_failure(&url, &e)))?;
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

/// The pinned SHA-256 of the server's certificate (`server.sha256`).
fn read_pin(dir: &Path) -> Result<String, Failure> {
    let path = dir.join("server.sha256");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure(format!(
            "cannot read {}: {e}: an admin credential pins the server's certificate there; a credential made before guestkey pinned it is refused: on the server run `guestkey-server migrate-roles --data-dir DATA_DIR` (once), then use DATA_DIR/admin (or a new copy of it)",
            path.display()
        ))
    })?;
    let pin = text.trim().to_ascii_lowercase();
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure(format!(
            "{} must hold the SHA-256 of the server's certificate (64 hex digits) as `guestkey-server init` wrote it: copy DATA_DIR/admin again",
            path.display()
        )));
    }
    Ok(pin)
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
    let fix = "it must hold the server CA certificate as `guestkey-server init` wrote it (DATA_DIR/ca/server-ca.pem)";
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

/// A failed connection as one line: the verifier's own words when the
/// server's certificate was refused (they name the certificate and the
/// credential), advice otherwise.
fn connect_failure(url: &str, e: &tonic::transport::Error) -> String {
    match guestkey_pinned_tls::find_connect_error(e) {
        Some(
            c @ (ConnectError::NotPinned { .. }
            | ConnectError::NotSigned { .. }
            | ConnectError::Refused { .. }),
        ) => format!("cannot reach guestkey-server at {url}: {c}"),
        _ => transport_hint(url, &mgmt_server::tls::error_chain(e)),
    }
}

/// Turns TLS and connection failures into advice.
fn transport_hint(url: &str, detail: &str) -> String {
    let d = detail.to_ascii_lowercase();
    let advice = if d.contains("connection refused") {
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
