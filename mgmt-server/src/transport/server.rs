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
    let database = Database::of(
        &dir,
        config
            .database
            .as_ref()
            .map(crate::config::DatabaseUrl::as_str),
    )?;
    let exclusive = matches!(database, Database::Sqlite(_));
    let url = advertised_url(config.url.as_deref(), local, &identity.cert_pem)?;
    match (&url, exclusive) {
        (_, true) => {}
        (Some(u), false) => tracing::info!(url = %u, "hosts are given this replica's URL"),
        (None, false) => tracing::warn!(
            %local,
            "hosts are not given this replica's URL: set url (--url https://NAME:PORT) to a name the server certificate holds"
        ),
    }
    let me = Replica {
        id: uuid::Uuid::new_v4().to_string(),
        address: local.to_string(),
        url: url.unwrap_or_default(),
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
        database: database.shown(),
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
        leading_rx.clone(),
    ));
    let metrics = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let m = Arc::new(crate::transport::metrics::Metrics::new(
                core.counters(),
                guestkey_rpc_metrics::cert_expiry_unix(&identity.cert_pem),
                source_kind(&config.master_key_source),
            ));
            let (at, _task) = crate::transport::metrics::serve(
                addr,
                m.clone(),
                core.clone(),
                leading_rx.clone(),
                stop_rx.clone(),
            )
            .await?;
            tracing::info!("metrics served at http://{at}/metrics");
            Some(m as Arc<dyn guestkey_rpc_metrics::Observer>)
        }
    };
    if let Some(console) = config.console {
        if config.role == crate::config::ServerRole::Verifier {
            return Err(CoreError::FailedPrecondition(
                "console.listen: a verifier has no console (it keeps no volumes or guests); remove [console] from its config".into(),
            ));
        }
        let (at, _task) = crate::transport::console::serve(
            console.listen,
            console.session_idle_secs,
            &identity,
            core.clone(),
            stop_rx.clone(),
        )
        .await?;
        tracing::info!("web console served at https://{at}/");
    }
    let mut stop_server = stop_rx.clone();
    let role = config.role;
    let serve = Server::builder()
        .layer(guestkey_rpc_metrics::RpcLayer(metrics))
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

/// The kind of master key source, for the metrics (no path).
fn source_kind(s: &crate::masterkey::MasterKeySource) -> &'static str {
    use guestkey_protect::ProtectorSpec as P;
    match s {
        P::File(_) => "file",
        P::Env(_) => "env",
        P::Prompt => "prompt",
        P::Tpm(_) => "tpm",
    }
}

/// The URL hosts are given for this replica: `url` of the config, which
/// must name a name of the server certificate, or else `https://LISTEN`
/// when the listen address is one the certificate names (none otherwise:
/// an unspecified address like 0.0.0.0, or a name hosts could not check).
fn advertised_url(
    configured: Option<&str>,
    local: std::net::SocketAddr,
    cert_pem: &str,
) -> Result<Option<String>, CoreError> {
    let names = crate::ca::subject_alt_names(cert_pem).map_err(|e| {
        CoreError::Internal(format!("cannot read the server certificate's names: {e}"))
    })?;
    let named = |name: &str| {
        names.iter().any(|n| {
            n.eq_ignore_ascii_case(name)
                || n.strip_prefix("*.").is_some_and(|zone| {
                    name.split_once('.')
                        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(zone))
                })
        })
    };
    match configured {
        Some(url) => {
            let name = crate::config::url_name(url);
            if named(name) {
                Ok(Some(url.to_owned()))
            } else {
                Err(CoreError::FailedPrecondition(format!(
                    "url: {url} names {name}, which the server certificate does not (it names {}): hosts would refuse it; give one of those names, or add the name with a new certificate",
                    names.join(", ")
                )))
            }
        }
        None if local.ip().is_unspecified() => Ok(None),
        None => {
            let ip = local.ip().to_string();
            Ok(named(&ip).then(|| match local {
                std::net::SocketAddr::V4(_) => format!("https://{local}"),
                std::net::SocketAddr::V6(a) => format!("https://[{}]:{}", a.ip(), a.port()),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::advertised_url;

    #[test]
    fn hosts_are_given_a_url_the_server_certificate_names_and_no_other() {
        let ca = crate::ca::Ca::generate(crate::ca::Role::Server, "test")
            .unwrap()
            .0;
        let sans = ["kms1.example", "*.kms.example", "127.0.0.1"];
        let cert = ca
            .issue("test", sans.map(String::from).to_vec(), 30)
            .unwrap()
            .cert;
        let at = |a: &str| a.parse().unwrap();
        let url = |c: Option<&str>, l: &str| advertised_url(c, at(l), &cert);
        assert_eq!(
            url(Some("https://kms1.example:7443"), "0.0.0.0:7443")
                .unwrap()
                .as_deref(),
            Some("https://kms1.example:7443")
        );
        assert_eq!(
            url(Some("https://b.kms.example:7443"), "0.0.0.0:7443")
                .unwrap()
                .as_deref(),
            Some("https://b.kms.example:7443")
        );
        let e = url(Some("https://kms9.example:7443"), "0.0.0.0:7443")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kms9.example") && e.contains("kms1.example"),
            "{e}"
        );
        // Without url: the listen address, if the certificate names it.
        assert_eq!(
            url(None, "127.0.0.1:7443").unwrap().as_deref(),
            Some("https://127.0.0.1:7443")
        );
        assert_eq!(url(None, "0.0.0.0:7443").unwrap(), None);
        assert_eq!(url(None, "10.0.0.6:7443").unwrap(), None);
    }
}
