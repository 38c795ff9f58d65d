//! `guestkeyctl`: the admin command line of guestkey.
//!
//! This file holds the clap `Cli`, the dispatch to one module per
//! subcommand group (`host`, `volume`, `pool`, `guest`, `policy`, `escrow`, `audit`) and the
//! error printing (`guestkeyctl: MESSAGE` on stderr, exit code 1; clap's
//! own errors exit 2). Each group parses and checks its local input first,
//! then connects through `connect` (admin credential, TLS, transport
//! hints) and renders the server's answers through `output` (tables,
//! key/value blocks, JSON, sizes, times, progress). The groups import
//! `connect` and `output`, never each other; `output` and `connect`
//! import no group. The library paths used are
//! `mgmt_server::names::{parse_size, format_utc}`, `mgmt_server::policy::parse_duration`
//! and `mgmt_server::tls::{tls_name, error_chain}`; connections go through
//! `guestkey_pinned_tls` (the server CA and the pinned server certificate).

#![allow(clippy::print_stderr)] // a command-line program reports errors on stderr

mod attestation;
mod audit;
mod connect;
mod console_user;
mod escrow;
mod guest;
mod host;
mod manual;
mod output;
mod pending;
mod policy;
mod pool;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guestkey_proto::admin as pb;

use connect::{Ctx, rpc_error};

/// guestkeyctl: administer a guestkey management server (hosts, volumes,
/// audit log) over mutual TLS with the admin credential.
#[derive(Parser)]
#[command(name = "guestkeyctl", version)]
struct Cli {
    /// Server URL, e.g. https://localhost:7443 [default: the `server` file
    /// in the admin directory].
    #[arg(long, env = "GUESTKEY_SERVER", global = true, value_name = "URL")]
    server: Option<String>,
    /// The admin credential directory made by `guestkey-server init`
    /// (DATA_DIR/admin): ca.pem, server.sha256, admin.pem, admin.key.
    #[arg(long, env = "GUESTKEY_ADMIN_DIR", global = true, value_name = "DIR")]
    admin_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hosts: register, list, show, revoke, set-migration.
    #[command(subcommand)]
    Host(host::HostCmd),
    /// Encrypted volumes: create, encrypt, decrypt, list, show, rekey,
    /// delete (crypto-shredding), escrow.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// libvirt storage pools: manage (offer every cleartext volume in it
    /// for encryption), unmanage, list, show, offers, encrypt.
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Guests: define from libvirt domain XML, list, show, start, stop,
    /// migrate, undefine.
    #[command(subcommand)]
    Guest(guest::GuestCmd),
    /// Attestation allowlists: the PCR values hosts' TPM quotes may show
    /// for keys of `attested` volumes to go to them.
    #[command(subcommand)]
    Attestation(attestation::AttestationCmd),
    /// Starts whose keys wait for an operator's approval: list, approve,
    /// deny.
    #[command(subcommand)]
    Pending(pending::PendingCmd),
    /// Escrow packets of volumes, under a two-person rule: list the
    /// requests (`volume escrow` makes one), approve or deny one (another
    /// admin than the requester approves), fetch a made packet.
    #[command(subcommand)]
    Escrow(escrow::EscrowCmd),
    /// Key rotation policies: set, list, remove.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Logins of the web console (`[console] listen` of the server): add,
    /// remove, list.
    #[command(subcommand)]
    ConsoleUser(console_user::ConsoleUserCmd),
    /// Show the audit log; --verify checks it (hash chain, MACs, signed
    /// heads); --head prints a signed head to keep outside the server.
    Audit(audit::AuditArgs),
    /// The server: the database it uses, its replicas and which one
    /// leads.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Print the server CA certificate (PEM), which signs only the
    /// server's certificate: what `guestkeyd enroll --ca-file` and
    /// `guestkeyd trust-server --ca-file` need.
    CaCert,
    /// Print the shell completion script, e.g. `guestkeyctl completions
    /// bash > /usr/share/bash-completion/completions/guestkeyctl`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (guestkeyctl.1 and one a subcommand, such as
    /// guestkeyctl-volume-create.1) into DIR.
    Man {
        /// Where to write them, e.g. /usr/local/share/man/man1.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `guestkeyctl server ...`
#[derive(clap::Subcommand)]
enum ServerCmd {
    /// The database in use, the server replicas on it, and which one leads
    /// (since when, its fence number, until when its lease holds): what
    /// `guestkey-server status` shows on a server machine.
    Status,
}

/// An error for the user: one line saying what to do.
pub(crate) struct Failure(pub(crate) String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("guestkeyctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("guestkeyctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Completions { shell } => {
            manual::completions(*shell);
            return Ok(());
        }
        Command::Man { dir } => return manual::man(dir),
        _ => {}
    }
    let ctx = Ctx::new(cli.server, cli.admin_dir, cli.json);
    match cli.command {
        Command::Host(cmd) => host::run(cmd, &ctx).await,
        Command::Volume(cmd) => volume::run(cmd, &ctx).await,
        Command::Pool(cmd) => pool::run(cmd, &ctx).await,
        Command::Guest(cmd) => guest::run(cmd, &ctx).await,
        Command::Policy(cmd) => policy::run(cmd, &ctx).await,
        Command::Attestation(cmd) => attestation::run(cmd, &ctx).await,
        Command::Pending(cmd) => pending::run(cmd, &ctx).await,
        Command::Escrow(cmd) => escrow::run(cmd, &ctx).await,
        Command::Audit(args) => audit::run(args, &ctx).await,
        Command::ConsoleUser(cmd) => console_user::run(cmd, &ctx).await,
        Command::Server(ServerCmd::Status) => {
            let s = ctx
                .connect()
                .await?
                .get_server_status(pb::GetServerStatusRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let status = mgmt_server::database::Status {
                database: s.database,
                now_ms: s.now_unix_ms,
                lease: s.lease.map(|l| mgmt_server::store::Lease {
                    holder: l.replica,
                    fence: l.fence,
                    since_ms: l.since_unix_ms,
                    expires_ms: l.until_unix_ms,
                }),
                replicas: s
                    .replicas
                    .into_iter()
                    .map(|r| mgmt_server::store::Replica {
                        id: r.id,
                        address: r.address,
                        url: r.url,
                        host: r.host,
                        pid: r.pid,
                        version: r.version,
                        started_ms: r.started_unix_ms,
                        seen_ms: r.seen_unix_ms,
                    })
                    .collect(),
            };
            output::emit(ctx.json, status.json(), status.text());
            Ok(())
        }
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
        Command::CaCert => {
            let pem = ctx
                .connect()
                .await?
                .get_ca_certificate(pb::GetCaCertificateRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .pem;
            output::emit(ctx.json, serde_json::json!({"pem": pem}), pem);
            Ok(())
        }
    }
}
