//! `guestkeyd`: the guestkey host daemon.

#![allow(clippy::print_stderr)] // a command-line program reports errors on stderr

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod background;
mod tpm;
use background::spawn_background;
use guestkey_protect::tpm::cli::{TpmFlags, resealed_text};
use host_daemon::grpc::enroll::{EnrollmentToken, enroll};
use host_daemon::image::QemuImages;
use host_daemon::libvirt::{Libvirt, events};
use host_daemon::ops::Daemon;
use host_daemon::protect::{HostProtectors, keyset};
use host_daemon::state::StateDir;
use tpm::{TpmCommand, seal_first_store_key, spawn_hook, tpm_command, unlock};

/// guestkey host daemon: keeps this host's guest keys sealed, creates
/// encrypted volumes through libvirt, and gives libvirt a key only while
/// QEMU opens a disk.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the enrollment token comes from.
const TOKEN_ENV: &str = "GUESTKEY_ENROLL_TOKEN";

#[derive(Subcommand)]
enum Command {
    /// Make this host's key pairs and enroll with the management server
    /// using a one-time token from `guestkeyctl host add`: from
    /// --token-file, or the environment variable GUESTKEY_ENROLL_TOKEN
    /// (never on the command line, where other users and shell history see it).
    Enroll {
        /// Management server URL, e.g. https://kms.example:7443.
        #[arg(long, value_name = "URL")]
        server: String,
        /// A file holding the one-time enrollment token (`-`: read it from
        /// standard input).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// No longer accepted: a token in argv shows in /proc and in shell
        /// history.
        #[arg(long, hide = true, value_name = "TOKEN")]
        token: Option<String>,
        /// The server CA certificate: what `guestkeyctl ca-cert` prints
        /// (DATA_DIR/ca/server-ca.pem on the server). Only a certificate it
        /// signed passes as the server.
        #[arg(long, value_name = "CA.pem")]
        ca_file: PathBuf,
        /// Where this host keeps its keys and sealed store.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
        /// Seal this host's keys (packet-sealing and store keys) to its TPM:
        /// a copy of the state directory opens nothing elsewhere, nor here
        /// with other PCR values. Needs --tpm-authority-key.
        #[arg(long)]
        tpm: bool,
        #[command(flatten)]
        tpm_flags: TpmFlags,
    },
    /// Enroll this host, already enrolled with its management server with
    /// --tpm, with a verifier too (`guestkey-server run --role verifier`):
    /// the second server that keeps the other half of each split volume
    /// key and releases it only after its own attestation of this host.
    /// Under the same host name (the verifier's admin registers it with
    /// `guestkeyctl host add`, which prints the token). Stop guestkeyd
    /// first; start it again afterwards.
    EnrollVerifier {
        /// The verifier's URL, e.g. https://verifier.example:7443.
        #[arg(long, value_name = "URL")]
        server: String,
        /// A file holding the verifier's one-time enrollment token (`-`:
        /// standard input; or GUESTKEY_ENROLL_TOKEN).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The verifier's server CA (`guestkeyctl ca-cert` against it).
        #[arg(long, value_name = "CA.pem")]
        ca_file: PathBuf,
        /// The state directory made by `enroll --tpm`.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
    },
    /// PCR approvals and status of this host's keys sealed to the TPM.
    Tpm {
        #[command(subcommand)]
        command: TpmCommand,
    },
    /// Move this host's keys: to the TPM (from files, to other PCRs, or to
    /// another TPM) or back to files. Stop guestkeyd first; nothing is lost
    /// if it stops half-way.
    Reseal {
        /// The state directory.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
        /// Back to files of mode 0600 (sealing.key, store.key).
        #[arg(long, conflicts_with_all = ["tcti", "pcrs", "authority_key"])]
        to_files: bool,
        #[command(flatten)]
        tpm: TpmFlags,
    },
    /// Trust the server again after `guestkey-server migrate-roles` (or a
    /// new server certificate): connect with this host's certificate,
    /// check the server against --ca-file, and keep the server CA and the
    /// hash of the server's certificate it then reports. Stop guestkeyd
    /// first; start it again afterwards.
    TrustServer {
        /// The server CA certificate: what `guestkeyctl ca-cert` prints
        /// (DATA_DIR/ca/server-ca.pem on the server).
        #[arg(long, value_name = "CA.pem")]
        ca_file: PathBuf,
        /// The state directory made by `enroll`.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
    },
    /// Serve the host-agent API (mutual TLS, management server only) and
    /// the libvirt hook socket.
    Run {
        /// The state directory made by `enroll`.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/guestkeyd")]
        state_dir: PathBuf,
        /// Address of the host-agent API.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7444")]
        listen: std::net::SocketAddr,
        /// libvirt connection URI.
        #[arg(long, value_name = "URI", default_value = "qemu:///system")]
        libvirt_uri: String,
        /// The root-only socket the libvirt hook talks to.
        #[arg(long, value_name = "PATH", default_value = "/run/guestkey/hook.sock")]
        hook_socket: PathBuf,
        /// The list of secret UUIDs guestkeyd manages, which the hook reads
        /// when guestkeyd does not answer (no keys in it).
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/var/lib/guestkey/managed-secrets"
        )]
        managed_list: PathBuf,
        /// The user libvirtd runs as: 0 for the system daemon; for a
        /// session daemon its user's id, who may then use the hook socket
        /// (the hook looks for /run/guestkey/hook-UID.sock).
        #[arg(long, value_name = "UID", default_value_t = 0)]
        hook_uid: u32,
        /// Overwrite every byte of an encrypted image a deep rekey or an
        /// online copy replaced. Without it only its LUKS header and
        /// keyslots are overwritten (crypto-shredding: the rest is
        /// ciphertext under a data key that no longer exists; see
        /// docs/threat-model.md). Cleartext images a conversion replaced are
        /// always overwritten in full.
        #[arg(long)]
        overwrite_old_images: bool,
        /// Serve GET /metrics (Prometheus text format, plain HTTP: counts
        /// only, no names or keys) on this address, e.g. 127.0.0.1:9465.
        #[arg(long, value_name = "IP:PORT")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// The age X25519 recipients (one per line, `#` comments) of the
        /// custodians this host may seal escrow packets to; without it the
        /// host makes none. Root's file, writable by no one else: the
        /// server cannot add a recipient.
        #[arg(long, value_name = "FILE")]
        escrow_recipients: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("guestkeyd: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guestkeyd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(file: Option<PathBuf>, argv: Option<String>) -> Result<EnrollmentToken, String> {
    if argv.is_some() {
        return Err(format!(
            "--token is not accepted: a token on the command line shows in /proc and in shell history; put it in a file for --token-file (or `-` for standard input), or in {TOKEN_ENV}"
        ));
    }
    match (file, std::env::var(TOKEN_ENV)) {
        (Some(f), _) => EnrollmentToken::read(&f).map_err(|e| e.to_string()),
        (None, Ok(t)) => {
            let t = zeroize::Zeroizing::new(t);
            EnrollmentToken::new(&t).map_err(|e| e.to_string())
        }
        (None, Err(_)) => Err(format!(
            "no enrollment token: give --token-file FILE (`-` for standard input) or set {TOKEN_ENV}; `guestkeyctl host add` prints the token"
        )),
    }
}

async fn real_main(cli: Cli) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match cli.command {
        Command::Enroll {
            server,
            token_file,
            token: argv_token,
            ca_file,
            state_dir,
            tpm,
            tpm_flags,
        } => {
            let target = match (tpm, tpm_flags.target(None)?) {
                (true, Some(t)) => Some(t),
                (true, None) => {
                    return Err(
                        "--tpm needs --tpm-authority-key FILE: the PCR authority key that approves this host's PCR values (made there if missing; keep it off this host)"
                            .into(),
                    );
                }
                (false, Some(_)) => return Err("--tpm-* options need --tpm".into()),
                (false, None) => None,
            };
            let token = token(token_file, argv_token)?;
            let name = enroll(
                &server,
                &token,
                &ca_file,
                &StateDir::new(&state_dir),
                target.as_ref(),
            )
            .await?;
            println!("enrolled as host {name}; keys in {}", state_dir.display());
            println!("next: guestkeyd run --state-dir {}", state_dir.display());
            Ok(())
        }
        Command::EnrollVerifier {
            server,
            token_file,
            ca_file,
            state_dir,
        } => {
            let _lock = host_daemon::instance::state_lock(&state_dir)?;
            let token = token(token_file, None)?;
            let name = host_daemon::grpc::verifier::enroll_verifier(
                &server,
                &token,
                &ca_file,
                &StateDir::new(&state_dir),
            )
            .await?;
            println!(
                "host {name} enrolled with the verifier at {server}; its files in {}",
                state_dir
                    .join(host_daemon::grpc::verifier::VERIFIER_DIR)
                    .display()
            );
            println!("next: guestkeyd run --state-dir {}", state_dir.display());
            Ok(())
        }
        Command::Tpm { command } => tpm_command(command),
        Command::Reseal {
            state_dir,
            to_files,
            tpm,
        } => {
            let _lock = host_daemon::instance::state_lock(&state_dir)?;
            let set = keyset(&state_dir);
            let current = if set.is_sealed() {
                Some(set.site()?)
            } else {
                None
            };
            let to = tpm.reseal_to(to_files, current.as_ref())?;
            print!("{}", resealed_text(&set.reseal(&to)?));
            Ok(())
        }
        Command::TrustServer { ca_file, state_dir } => {
            // Not beside a running guestkeyd: it read these files at start.
            let _lock = host_daemon::instance::state_lock(&state_dir)?;
            let t = host_daemon::grpc::trust::trust_server(&StateDir::new(&state_dir), &ca_file)
                .await?;
            match &t.old_sha256 {
                Some(old) if *old == t.new_sha256 => println!(
                    "the server at {} already was trusted with certificate sha256 {}; ca.pem rewritten",
                    t.server, t.new_sha256
                ),
                old => println!(
                    "trusting the server at {}: certificate sha256 {} (was {}), server CA in {}",
                    t.server,
                    t.new_sha256,
                    old.as_deref().unwrap_or("none"),
                    state_dir.join("ca.pem").display()
                ),
            }
            println!("next: guestkeyd run --state-dir {}", state_dir.display());
            Ok(())
        }
        Command::Run {
            state_dir,
            listen,
            libvirt_uri,
            hook_socket,
            managed_list,
            hook_uid,
            overwrite_old_images,
            metrics_listen,
            escrow_recipients,
        } => {
            host_daemon::image::overwrite_old_images(overwrite_old_images);
            // A bad file stops the start, before anything is served.
            let escrow_recipients = escrow_recipients
                .map(|p| host_daemon::ops::load_recipients_file(&p))
                .transpose()?;
            // Before anything else: one guestkeyd per state directory and
            // per hook socket (a second must not take the first's socket).
            let _state_lock = host_daemon::instance::state_lock(&state_dir)?;
            let _socket_lock = host_daemon::instance::socket_lock(&hook_socket)?;
            host_daemon::hardening::no_dumps()?;
            if let Err(e) = host_daemon::hardening::lock_memory() {
                tracing::warn!(error = %e, "cannot lock memory: keys could reach swap");
            }
            let dir = StateDir::new(&state_dir);
            let protectors = HostProtectors::for_dir(&dir);
            seal_first_store_key(&dir, &protectors)?;
            let gate = host_daemon::hook::Gate::default();
            let (keys, store, hook_served) = unlock(
                &dir,
                &protectors,
                &gate,
                &hook_socket,
                hook_uid,
                &managed_list,
            )
            .await?;
            let read = |f: &str| {
                std::fs::read_to_string(dir.file(f))
                    .map_err(|e| format!("cannot read {}: {e}", dir.file(f).display()))
            };
            let cert = read("tls.pem")?;
            let key = zeroize::Zeroizing::new(read("tls.key")?);
            let ca = read("ca.pem")?;
            let server_sha256 = read("server.sha256")?.trim().to_owned();
            let attestation = host_daemon::protect::HostAttestation::load(&dir)?;
            // Before the first libvirt connection.
            events::init()?;
            let daemon = Arc::new(Daemon::new(
                Box::new(Libvirt::new(&libvirt_uri)),
                Box::new(QemuImages),
                store,
                keys,
                managed_list,
                hook_uid,
            ));
            daemon.write_managed_list()?;
            if let Some(list) = escrow_recipients {
                tracing::info!(
                    recipients = list.len(),
                    "escrow packets sealed only to the recipients of --escrow-recipients"
                );
                daemon.set_escrow_recipients(list);
            }
            match host_daemon::grpc::lookup::ServerLookup::new(
                &dir,
                tokio::runtime::Handle::current(),
            ) {
                Some(l) => daemon.set_lookup(Box::new(l)),
                None => tracing::warn!(
                    "not enrolled with a server URL: refusals cannot name where a key is"
                ),
            }
            match host_daemon::grpc::verifier::VerifierHalves::new(
                &dir,
                tokio::runtime::Handle::current(),
            )? {
                Some(v) => {
                    tracing::info!(verifier = %host_daemon::ops::HalfSource::url(&v), "split keys are completed by the verifier");
                    daemon.set_verifier(Box::new(v));
                }
                None => tracing::debug!("not enrolled with a verifier: no split keys here"),
            }
            spawn_background(&daemon, &libvirt_uri);
            tokio::spawn(host_daemon::grpc::tpm_report::report_tpm(dir.clone()));
            tokio::spawn(host_daemon::grpc::enroll::retry_proof(dir.clone()));
            tokio::spawn(host_daemon::grpc::verifier::retry_verifier_proof(
                dir.clone(),
            ));
            tokio::spawn(host_daemon::grpc::report::run(dir.clone(), daemon.clone()));

            gate.open(daemon.clone());
            if !hook_served {
                spawn_hook(&gate, &hook_socket, hook_uid);
            }
            let metrics = match metrics_listen {
                None => None,
                Some(addr) => {
                    use host_daemon::grpc::metrics::{Metrics, serve};
                    let sealed = host_daemon::protect::keyset(dir.root()).is_sealed();
                    let m = Arc::new(Metrics::new(
                        guestkey_rpc_metrics::cert_expiry_unix(&cert),
                        sealed,
                    ));
                    let at = serve(addr, m.clone(), daemon.clone()).await?;
                    tracing::info!("metrics served at http://{at}/metrics");
                    Some(m as Arc<dyn guestkey_rpc_metrics::Observer>)
                }
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            println!("listening on https://{}", listener.local_addr()?);
            tracing::info!(%listen, hook = %hook_socket.display(), "guestkeyd running");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let shutdown = async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            };
            let listen = host_daemon::grpc::Listen {
                listener,
                cert,
                key,
                ca,
                server_sha256,
                attestation,
                metrics,
            };
            host_daemon::grpc::serve(daemon, listen, shutdown).await?;
            // Still under the socket's lock: the socket is ours to remove.
            if let Err(e) = std::fs::remove_file(&hook_socket) {
                tracing::warn!(socket = %hook_socket.display(), error = %e, "hook socket not removed");
            }
            Ok(())
        }
    }
}
