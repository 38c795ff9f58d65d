//! `guestkey-server run`: serves the admin and host APIs over mutual TLS
//! and runs the pusher, until SIGINT or SIGTERM.

use std::sync::Arc;

use guestkey_proto::admin::admin_server::AdminServer;
use guestkey_proto::host::host_api_server::HostApiServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::Config;
use crate::core::{Core, CoreError};
use crate::service::{AdminService, HostService};

/// Runs the server. Prints one line `listening on https://ADDR` to stdout
/// once it accepts connections.
pub async fn run(config: Config) -> Result<(), CoreError> {
    let listen = config.listen;
    let core = Arc::new(Core::open(config)?);
    let (cert, key) = core.server_identity();
    // Client certificates are optional at the TLS layer only because
    // enrollment comes before a host has one; a presented certificate must
    // chain to our CA (else the handshake fails), and each service then
    // requires the right kind of certificate.
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key.as_bytes()))
        .client_ca_root(Certificate::from_pem(core.ca_cert_pem()))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        CoreError::Internal(format!(
            "cannot listen on {listen}: {e} (is another server running? pick --listen)"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| CoreError::Internal(e.to_string()))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pusher = tokio::spawn(crate::push::run(core.clone(), stop_rx.clone()));
    let mut stop_server = stop_rx.clone();
    let serve = Server::builder()
        .tls_config(tls)
        .map_err(|e| CoreError::Internal(format!("TLS configuration: {e}")))?
        .add_service(AdminServer::new(AdminService(core.clone())))
        .add_service(HostApiServer::new(HostService(core.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = stop_server.changed().await;
            },
        );
    println!("listening on https://{local}");
    tracing::info!(%local, "guestkey-server listening");
    let signals = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, CoreError>(())
    };
    let mut serve = std::pin::pin!(serve);
    tokio::select! {
        r = &mut serve => r.map_err(|e| CoreError::Internal(format!("server failed: {e}")))?,
        r = signals => {
            r?;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            let _ = serve.await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = pusher.await;
    Ok(())
}
