//! `guestkey-server run`: opens the data directory, builds the domain over
//! the SQLite store and the gRPC host agents, serves the admin and host
//! APIs over mutual TLS and runs the scheduler, until SIGINT or SIGTERM.

use std::sync::Arc;

use guestkey_proto::admin::admin_server::AdminServer;
use guestkey_proto::host::host_api_server::HostApiServer;
use tonic::transport::Server;

use crate::ca::{Ca, Role, cert_sha256, subject_alt_names};
use crate::config::Config;
use crate::database::Database;
use crate::datadir::DataDir;
use crate::domain::leader::LeaseTimes;
use crate::domain::{Core, KeyRing, Parts};
use crate::model::CoreError;
use crate::store::Replica;
use crate::transport::admin::AdminService;
use crate::transport::agents::GrpcAgents;
use crate::transport::host_api::HostService;
use crate::transport::tls::ServerIdentity;

/// The domain of an initialised data directory, with the master key from
/// the configured source, and the server's TLS identity.
pub fn open(config: &Config) -> Result<(Arc<Core>, Arc<ServerIdentity>), CoreError> {
    let dir = DataDir::new(&config.data_dir);
    check_data_dir(&dir)?;
    let store = crate::database::Database::of(
        &dir,
        config
            .database
            .as_ref()
            .map(crate::config::DatabaseUrl::as_str),
    )?
    .open()?;
    let keys = KeyRing::load(config.master_key_source.clone(), store.as_ref())?;
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| CoreError::Internal(format!("cannot read {}: {e}", p.display())))
    };
    // The hosts CA's key signs enrollments; the server and admin CAs' keys
    // are not read here (init and migrate-roles use them).
    let hosts_ca_pem = read(dir.ca_cert())?.to_string();
    let ca = Ca::load(Role::Host, &hosts_ca_pem, &dir.ca_key_source())?;
    let identity = Arc::new(ServerIdentity {
        cert_pem: read(dir.server_cert())?.to_string(),
        key_pem: read(dir.server_key())?,
        hosts_ca_pem,
        admin_ca_pem: read(dir.admin_ca_cert())?.to_string(),
    });
    let server_cert_sha256 = {
        let der = x509_parser::pem::parse_x509_pem(identity.cert_pem.as_bytes())
            .map(|(_, pem)| pem.contents)
            .map_err(|e| {
                CoreError::Internal(format!(
                    "{} does not parse: {e}",
                    dir.server_cert().display()
                ))
            })?;
        cert_sha256(&der)
    };
    let core = Core::new(Parts {
        store,
        agents: Arc::new(GrpcAgents::new(identity.clone())),
        keys,
        ca,
        server_ca_pem: read(dir.server_ca_cert())?.to_string(),
        server_cert_sha256,
        server_names: subject_alt_names(&identity.cert_pem)?,
        limits: config.limits.clone(),
        retry: config.retry.clone(),
        checkpoints: Some(dir.audit_checkpoints()),
        entropy: entropy(&dir),
    })?;
    let core = core.with_ek_anchors(config.ek_anchors.clone());
    let core = match config.role {
        crate::config::ServerRole::Verifier => core.as_verifier(),
        crate::config::ServerRole::Management => core,
    };
    Ok((Arc::new(core), identity))
}

/// Volume keys mix in the TPM's random bytes when the keys are sealed to
/// it; otherwise (or when the TPM gives none now) the OS generator alone
/// (logged once, at the first key).
fn entropy(dir: &DataDir) -> guestkey_protect::tpm::Entropy {
    use guestkey_protect::tpm::{Entropy, TpmSite};
    if !dir.is_tpm() {
        return Entropy::os_only();
    }
    match TpmSite::load(&dir.tpm_dir()).and_then(|site| Entropy::with_tpm(&site.tcti)) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "the TPM gives no random bytes: volume keys from the OS generator alone");
            Entropy::os_only()
        }
    }
}

/// Refuses what is not a data directory of this version: no database, or
/// made before certificates had roles.
fn check_data_dir(dir: &DataDir) -> Result<(), CoreError> {
    if !dir.db().exists() && !dir.database_file().exists() {
        return Err(CoreError::FailedPrecondition(format!(
            "{} is not a guestkey data directory (no guestkey.db or database file): run `guestkey-server init --data-dir {}` first",
            dir.root().display(),
            dir.root().display()
        )));
    }
    if dir.is_before_roles() {
        return Err(crate::roles::before_roles_refusal(dir));
    }
    Ok(())
}

/// Runs the server. Prints one line `listening on https://ADDR` to stdout
/// once it accepts connections. One server per data directory: a second
/// one exits at once, naming the first one's PID.
pub async fn run(config: Config) -> Result<(), CoreError> {
    let listen = config.listen;
    let dir = DataDir::new(&config.data_dir);
    check_data_dir(&dir)?;
    let _lock = dir
        .hold("stop it first, or give this one another --data-dir")
        .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    // Opening reads key files and the database (and may prompt for the
    // master key): off the async workers.
    let opening = config.clone();
    let (core, identity) = tokio::task::spawn_blocking(move || open(&opening))
        .await
        .map_err(|e| CoreError::Internal(format!("start-up failed: {e}")))??;
    // Client certificates are optional at the TLS layer only because
    // enrollment comes before a host has one; a presented certificate must
    // chain to the hosts CA or the admin CA (else the handshake fails), and
    // each service then requires the right kind of certificate by its hash.
    // The handshakes are guestkey_pinned_tls's, not tonic's, so that a
    // refused client reads the alert that says why.
    let acceptor = guestkey_pinned_tls::Acceptor::new(
        &identity.cert_pem,
        &identity.key_pem,
        &identity.client_roots_pem(),
        "the hosts CA and the admin CA",
        guestkey_pinned_tls::ClientAuth::Optional,
        "hosts and guestkeyctl present a certificate of this server's hosts CA or admin CA \
         (an admin credential made before `guestkey-server migrate-roles` needs a new one)",
    )
    .map_err(|e| CoreError::Internal(format!("TLS configuration: {e}")))?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        CoreError::Internal(format!(
            "cannot listen on {listen}: {e} (is another server running? pick --listen)"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| CoreError::Internal(e.to_string()))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Leadership among replicas; on SQLite this process owns the database.
    let exclusive = matches!(
        Database::of(
            &dir,
            config
                .database
                .as_ref()
                .map(crate::config::DatabaseUrl::as_str)
        )?,
        Database::Sqlite(_)
    );
    let me = Replica {
        id: uuid::Uuid::new_v4().to_string(),
        address: local.to_string(),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_ms: 0,
        seen_ms: 0,
    };
    let times = LeaseTimes {
        lease: std::time::Duration::from_millis(config.leader.lease_ms),
        renew: std::time::Duration::from_millis(config.leader.renew_ms),
    };
    core.set_replica(crate::domain::leader::Me {
        id: me.id.clone(),
        alive_within: times.lease,
        exclusive,
    });
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(None);
    let lease = tokio::spawn(crate::domain::leader::keep_lease(
        core.clone(),
        me,
        times,
        exclusive,
        leading_tx,
        stop_rx.clone(),
    ));
    let scheduler = tokio::spawn(crate::scheduler::run(
        core.clone(),
        stop_rx.clone(),
        leading_rx,
    ));
    let mut stop_server = stop_rx.clone();
    let role = config.role;
    let serve = Server::builder()
        .layer(crate::transport::role::RoleLayer(role))
        .add_service(AdminServer::new(AdminService(core.clone())))
        .add_service(HostApiServer::new(HostService(core.clone())))
        .serve_with_incoming_shutdown(acceptor.incoming(listener), async move {
            let _ = stop_server.changed().await;
        });
    println!("listening on https://{local}");
    tracing::info!(%local, ?role, "guestkey-server listening");
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
    let _ = scheduler.await;
    let _ = lease.await;
    Ok(())
}
