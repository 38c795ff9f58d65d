//! `guestkeyd trust-server`: for a host whose `ca.pem` and `server.sha256`
//! no longer match its server (the server was migrated to one CA per role
//! with `guestkey-server migrate-roles`, or has a new certificate). It
//! connects with this host's certificate to the server of `server.url`,
//! trusting only the CA the operator gives (`--ca-file`, the server CA
//! that `guestkeyctl ca-cert` prints), asks it for the server CA and its
//! certificate's hash (`GetServerTrust`: only an enrolled, unrevoked host
//! gets an answer), checks that this hash is that of the certificate the
//! connection verified, and rewrites `ca.pem` and `server.sha256`
//! atomically. The binary holds the state directory's lock meanwhile: a
//! running guestkeyd read those files at start-up.

use std::path::Path;

use guestkey_proto::host::{ServerTrustRequest, host_api_client::HostApiClient};

use super::enroll::{EnrollError, check_ca, link_error, server_peer};
use super::link::ServerLink;
use crate::state::{StateDir, write_atomic};

/// What changed.
#[derive(Debug)]
pub struct Trusted {
    /// The server.
    pub server: String,
    /// The pin before (None: there was none).
    pub old_sha256: Option<String>,
    /// The pin now.
    pub new_sha256: String,
}

/// Re-learns the server's CA and certificate (see the module header).
pub async fn trust_server(dir: &StateDir, ca_file: &Path) -> Result<Trusted, EnrollError> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.file(f)).map_err(|e| {
            EnrollError(format!(
                "cannot read {}: {e} (is {} the state directory of an enrolled host? `guestkeyd enroll` makes it)",
                dir.file(f).display(),
                dir.root().display()
            ))
        })
    };
    // With several replicas, the first one listed is asked.
    let server = super::link::server_urls(&read("server.url")?)
        .first()
        .map(|u| (*u).to_owned())
        .unwrap_or_default();
    let cert = read("tls.pem")?;
    let key = zeroize::Zeroizing::new(read("tls.key")?);
    let ca = std::fs::read_to_string(ca_file).map_err(|e| {
        EnrollError(format!(
            "cannot read the CA file {}: {e} (`guestkeyctl ca-cert` prints it)",
            ca_file.display()
        ))
    })?;
    check_ca(&ca, ca_file)?;
    let link = ServerLink::new(
        &server,
        server_peer(&server, &ca, ca_file)?,
        Some((&cert, &key)),
    )
    .map_err(|e| EnrollError(format!("{}: {e}", dir.root().display())))?;
    let channel = link
        .connect(std::time::Duration::from_secs(30))
        .await
        .map_err(|e| link_error(&server, e))?;
    let answer = HostApiClient::new(channel)
        .get_server_trust(ServerTrustRequest {})
        .await
        .map_err(|s| {
            EnrollError(format!(
                "the server at {server} refused: {} (a revoked host cannot trust it again: enroll it anew)",
                s.message()
            ))
        })?
        .into_inner();
    let seen = link.verified_sha256().unwrap_or_default();
    if answer.server_certificate_sha256 != seen {
        return Err(EnrollError(format!(
            "the server's answer names certificate sha256 {}, but it presented {seen}: nothing was changed",
            answer.server_certificate_sha256
        )));
    }
    check_ca(&answer.ca_certificate_pem, Path::new("the server's answer"))?;
    let old_sha256 = std::fs::read_to_string(dir.file("server.sha256"))
        .ok()
        .map(|s| s.trim().to_owned());
    let write = |f: &str, data: &str| {
        write_atomic(&dir.file(f), data.as_bytes())
            .map_err(|e| EnrollError(format!("cannot write {}: {e}", dir.file(f).display())))
    };
    // ca.pem first: a crash in between leaves the old pin, which the server
    // no longer presents, so guestkeyd refuses it and this command is run
    // again; never a pin trusted through the old CA.
    write("ca.pem", &answer.ca_certificate_pem)?;
    write("server.sha256", &answer.server_certificate_sha256)?;
    Ok(Trusted {
        server,
        old_sha256,
        new_sha256: answer.server_certificate_sha256,
    })
}
