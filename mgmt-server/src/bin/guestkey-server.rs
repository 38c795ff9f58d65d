//! `guestkey-server`: the guestkey management server.

#![allow(clippy::print_stderr)] // a command-line program reports errors on stderr

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guestkey_protect::tpm::TpmSite;
use guestkey_protect::tpm::cli::{ApproveFlags, TpmFlags, resealed_text, status_text};
use mgmt_server::config::{Config, DEFAULT_LISTEN, Overrides};
use mgmt_server::init::{InitOptions, init};
use mgmt_server::masterkey::MasterKeySource;

/// guestkey management server: keeps one key per guest volume, enrolls
/// hosts, and pushes sealed keys to their host daemons over mutual TLS.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new data directory: SQLite database, master key, one CA
    /// per role (hosts, server, admin), the server certificate, and the
    /// admin credential in DATA_DIR/admin/. Refuses to touch an existing,
    /// non-empty directory.
    Init {
        /// The data directory to create.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A DNS name or IP address of this server for its TLS certificate
        /// (repeat for several). Default: localhost and 127.0.0.1.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Where the master key comes from: file:PATH (made if missing),
        /// env:VARIABLE, prompt, or tpm (a new key sealed to this machine's
        /// TPM, with the CA keys, in DATA_DIR/tpm/). Default: a new random
        /// key in DATA_DIR/master.key (mode 0600).
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
        /// The address the server will listen on, for the URL written to the
        /// admin credential.
        #[arg(long, value_name = "IP:PORT", default_value = DEFAULT_LISTEN)]
        listen: String,
        /// The database: a PostgreSQL URL (postgres://USER@HOST:PORT/DB, an
        /// empty database that several replicas can share), recorded in
        /// DATA_DIR/database. Default: SQLite in DATA_DIR/guestkey.db.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Split a recovery key of the master key and the CA keys into N
        /// shares, any M of which rebuild this server from a database
        /// backup (`guestkey-server recover`); one per --to custodian.
        #[arg(long, value_name = "M-of-N", requires = "to")]
        recovery_shares: Option<String>,
        /// A custodian's age recipient (age1..., `age-keygen -y` prints
        /// it): one share is encrypted to each (repeat N times).
        #[arg(long, value_name = "RECIPIENT", requires = "recovery_shares")]
        to: Vec<String>,
        /// Where the share files go [default: DATA_DIR/recovery-shares].
        #[arg(long, value_name = "DIR", requires = "recovery_shares")]
        shares_out: Option<PathBuf>,
        #[command(flatten)]
        tpm: TpmFlags,
    },
    /// Recovery shares of this server: split a new recovery key among
    /// custodians, show the split, refresh its copy of the certificates.
    Recovery {
        #[command(subcommand)]
        command: RecoveryCommand,
    },
    /// Rebuild a lost server's data directory on this machine from a
    /// database backup and any M of its N recovery shares. The new
    /// directory serves as the lost one did (same CAs, certificate, admin
    /// credential, master key); nothing is made if a check fails.
    Recover {
        /// The new data directory (absent or empty).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// A copy of the lost server's guestkey.db (copied in, never
        /// written).
        #[arg(long, value_name = "FILE", conflicts_with = "database")]
        from_sqlite: Option<PathBuf>,
        /// Or the PostgreSQL database the lost server used.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// A share file (repeat, M at least): as `recovery split` wrote it
        /// (with --identity), or the text its custodian decrypted with
        /// `age -d -i KEY FILE`.
        #[arg(long = "share", value_name = "FILE", required = true)]
        shares: Vec<PathBuf>,
        /// A custodian's age identity file that opens share files (repeat).
        #[arg(long = "identity", value_name = "FILE")]
        identities: Vec<PathBuf>,
    },
    /// Back up the database (SQLite) into a new file of mode 0600, safe
    /// while the server runs: one consistent instant, checked before it is
    /// named. With the recovery shares it rebuilds the server
    /// (`guestkey-server recover`). On PostgreSQL, use PostgreSQL's tools.
    Backup {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The backup file (must not exist; its directory writable only by
        /// this user).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// PCR approvals and status of the keys sealed to the TPM.
    Tpm {
        #[command(subcommand)]
        command: TpmCommand,
    },
    /// Move the master key and the CA keys: to the TPM (from files, to
    /// other PCRs, or to another TPM) or back to files. Not while the
    /// server runs; nothing is lost if it stops half-way.
    Reseal {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Back to files of mode 0600 (DATA_DIR/master.key, ca/*.key).
        #[arg(long, conflicts_with_all = ["tcti", "pcrs", "authority_key"])]
        to_files: bool,
        #[command(flatten)]
        tpm: TpmFlags,
    },
    /// Serve the admin and host APIs (gRPC over mutual TLS) and push keys
    /// to host daemons, until SIGINT or SIGTERM. One server per data
    /// directory.
    Run {
        /// The data directory made by `init` (or data_dir in --config).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Listen address [default: 127.0.0.1:7443, or listen in --config].
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<String>,
        /// A TOML configuration file (listen, data_dir, master_key_source,
        /// [limits], [retry]); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Master key source (file:PATH, env:VARIABLE, prompt)
        /// [default: file:DATA_DIR/master.key].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
        /// management (default), or verifier: a second, independent server
        /// that enrolls and attests hosts on its own and keeps the other
        /// halves of split keys (`volume create --split` on the management
        /// server, `guestkeyd enroll-verifier` on each host).
        #[arg(long, value_name = "ROLE")]
        role: Option<mgmt_server::config::ServerRole>,
        /// The database, when not the one the data directory records
        /// (postgres://... or sqlite) [default: DATA_DIR/database, else
        /// DATA_DIR/guestkey.db; or database in --config].
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// The URL hosts reach this replica at (https://NAME:PORT, a name
        /// the server certificate holds), given to every host's list of
        /// replicas on PostgreSQL [default: https://LISTEN when it listens
        /// on an address the certificate names; or url in --config].
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// The database in use, the server replicas on it, and which one leads
    /// (since when, its fence number, until when its lease holds).
    Status {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The database, when not the one the data directory records.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the data directory of another server replica (a server on
    /// PostgreSQL only): the same CAs, server certificate, admin credential,
    /// master key and database. Move it to the new machine and `run` it
    /// there; every replica serves the APIs, one leads the scheduler.
    AddReplica {
        /// The data directory of a running (or stopped) replica.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The new replica's data directory (absent or empty).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Move this installation from SQLite to an empty PostgreSQL database:
    /// copies every table in one transaction, verifies the copy (row
    /// counts, the audit chain, every key unwraps) before it commits, then
    /// records the URL in DATA_DIR/database and keeps the SQLite file as
    /// guestkey.db.before-postgres. Not while the server runs.
    MoveToPostgres {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The empty PostgreSQL database: postgres://USER@HOST:PORT/DB.
        #[arg(long, value_name = "URL")]
        database: String,
        /// Where the master key is [default: file:DATA_DIR/master.key].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
    },
    /// Named admin credentials (each call audited with its name): add,
    /// list, remove. Safe while the server runs.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Re-wrap every volume key under a new master key. Safe while the
    /// server runs: it reloads the key from its file at its next key
    /// operation (with env: or prompt sources, restart it with the new key).
    RotateMasterKey {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Where the current master key is [default: file:DATA_DIR/master.key].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
        /// Where the new key comes from: file:PATH (made if missing),
        /// env:VARIABLE or prompt [default: a new random key replacing the
        /// current key file].
        #[arg(long, value_name = "SOURCE")]
        new_master_key_source: Option<MasterKeySource>,
    },
    /// Give a data directory made before certificates had roles (one CA
    /// signed the server, admin and host certificates) one CA per role:
    /// keeps every key and the hosts' certificates; makes a server CA, an
    /// admin CA, a new server certificate and a new admin credential
    /// (DATA_DIR/admin). Then run `guestkeyd trust-server` on each host.
    /// Not while the server runs; run it again if it stopped half-way.
    MigrateRoles {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Where the master key is, for the audit record
        /// [default: file:DATA_DIR/master.key].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Make the admin credential NAME in the new directory --out (the
    /// server CA, the server's pin and URL, the certificate, its key):
    /// `guestkeyctl --admin-dir DIR` then acts as NAME.
    Add {
        /// The credential's name, as the audit log shows it (admin:NAME).
        #[arg(value_name = "NAME")]
        name: String,
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The credential directory to make (must not exist).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Where the master key is [default: what the data directory uses].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
    },
    /// List the admin credentials.
    List {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Remove the admin credential NAME: its certificate is refused at
    /// once. The last one is kept.
    Remove {
        /// The credential's name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Where the master key is [default: what the data directory uses].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
    },
}

#[derive(Subcommand)]
enum RecoveryCommand {
    /// Make a new recovery key and split it: one share file per custodian
    /// in --out, the master key and the data directory's certificates and
    /// keys sealed to it in the database. Replaces an earlier split (its
    /// shares then open nothing). Safe while the server runs.
    Split {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// M-of-N: N shares, any M of which recover the server.
        #[arg(long, value_name = "M-of-N")]
        shares: String,
        /// A custodian's age recipient (repeat N times).
        #[arg(long, value_name = "RECIPIENT", required = true)]
        to: Vec<String>,
        /// The directory for the share files (absent or empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Where the master key is [default: what the data directory uses].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
    },
    /// The split in force: M-of-N, custodians, and whether the copy of the
    /// certificates it holds is the data directory's now.
    Status {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Take the certificates and keys into the recovery record again (after
    /// they changed: `recovery status` tells); the shares stay valid.
    Refresh {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Where the master key is [default: what the data directory uses].
        #[arg(long, value_name = "SOURCE")]
        master_key_source: Option<MasterKeySource>,
    },
}

#[derive(Subcommand)]
enum TpmCommand {
    /// Sign PCR values with the PCR authority key, so that the sealed keys
    /// unseal when the PCRs have them: --current for the values now (after
    /// an update you booted), or --pcr N=SHA256 for an update's values in
    /// advance (the PCRs not named keep their current values).
    Approve {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        flags: ApproveFlags,
    },
    /// The TPM, PCRs, their current values and whether the keys unseal.
    Status {
        /// The data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
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
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, once, at the top.
            eprintln!(
                "guestkey-server: {}",
                mgmt_server::tls::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Init {
            data_dir,
            sans,
            master_key_source,
            listen,
            database,
            recovery_shares,
            to,
            shares_out,
            tpm,
        } => {
            let tpm = tpm.target(None)?;
            let recovery = match recovery_shares {
                Some(text) => {
                    let (m, n) = mgmt_server::shares::parse_m_of_n(&text)?;
                    Some(mgmt_server::recovery::SplitOptions {
                        threshold: m,
                        shares: Some(n),
                        custodians: to,
                        out: shares_out.unwrap_or_default(),
                    })
                }
                None => None,
            };
            let sans = if sans.is_empty() {
                mgmt_server::roles::DEFAULT_SANS
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            } else {
                sans
            };
            let port = listen
                .rsplit_once(':')
                .map_or("7443", |(_, p)| p)
                .to_owned();
            let url = format!("https://{}:{port}", sans[0]);
            let report = init(&InitOptions {
                data_dir: data_dir.clone(),
                sans,
                master_key_source,
                server_url: url.clone(),
                tpm,
                database,
                recovery,
            })?;
            println!("initialised {}", data_dir.display());
            println!(
                "  master key: {} (id {})",
                report.master_key_source, report.master_key_id
            );
            println!(
                "  admin credential: {} (for guestkeyctl --admin-dir)",
                report.admin_dir.display()
            );
            println!("  server URL: {url}");
            if let Some(split) = &report.recovery {
                print_split(split);
            }
            println!(
                "next: guestkey-server run --data-dir {}",
                data_dir.display()
            );
            Ok(())
        }
        Command::Run {
            data_dir,
            listen,
            config,
            master_key_source,
            role,
            database,
            url,
        } => {
            let config = Config::load(
                config.as_deref(),
                Overrides {
                    listen,
                    data_dir,
                    master_key_source,
                    role,
                    database: database.map(mgmt_server::config::DatabaseUrl),
                    url,
                },
            )?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(mgmt_server::transport::server::run(config))?;
            Ok(())
        }
        Command::Admin { command } => admin(command),
        Command::Recovery { command } => recovery(command),
        Command::Backup { data_dir, out } => {
            let r =
                mgmt_server::backup::backup(&mgmt_server::datadir::DataDir::new(&data_dir), &out)?;
            println!(
                "backed up {} into {} ({} bytes, mode 0600, checked)",
                data_dir.display(),
                r.path.display(),
                r.bytes
            );
            println!(
                "  {} volume keys, wrapped under master key {}",
                r.keys, r.master_key_id
            );
            match &r.split {
                Some((id, m, n)) => println!(
                    "  recovery split {id} ({m}-of-{n}): any {m} of its shares and this file rebuild the server (`guestkey-server recover --from-sqlite FILE --share ...`)"
                ),
                None => println!(
                    "  no recovery shares were split: without the master key this backup opens nothing; `guestkey-server recovery split` makes shares"
                ),
            }
            Ok(())
        }
        Command::Recover {
            data_dir,
            from_sqlite,
            database,
            shares,
            identities,
        } => {
            let r = mgmt_server::recovery::recover(&mgmt_server::recovery::RecoverOptions {
                data_dir: data_dir.clone(),
                from_sqlite,
                database,
                shares,
                identities,
            })?;
            let indexes: Vec<String> = r.indexes.iter().map(ToString::to_string).collect();
            println!(
                "recovered {} with shares {} of split {}",
                data_dir.display(),
                indexes.join(", "),
                r.split_id
            );
            println!(
                "  master key {} in {}/master.key (mode 0600); {} volume keys unwrap",
                r.master_key_id,
                data_dir.display(),
                r.keys
            );
            println!("  database: {}", r.database);
            println!(
                "  the CAs, the server certificate and the admin credential are the lost server's: hosts and guestkeyctl trust it as before"
            );
            println!(
                "next: guestkey-server run --data-dir {} (at the lost server's address), then `guestkey-server recovery split` to new custodians' shares if these were exposed; `guestkey-server reseal --data-dir {} --tpm-authority-key FILE` to seal the keys to this machine's TPM",
                data_dir.display(),
                data_dir.display()
            );
            Ok(())
        }
        Command::RotateMasterKey {
            data_dir,
            master_key_source,
            new_master_key_source,
        } => {
            let dir = mgmt_server::datadir::DataDir::new(&data_dir);
            let source = master_key_source.unwrap_or_else(|| dir.default_master_key_source());
            let store = mgmt_server::database::Database::of(&dir, None)?.open()?;
            let r = mgmt_server::domain::rotate::rotate(
                store.as_ref(),
                &source,
                new_master_key_source.as_ref(),
            )?;
            println!(
                "master key rotated: {} -> {}; {} volume keys re-wrapped",
                r.old_id, r.new_id, r.rewrapped
            );
            Ok(())
        }
        Command::Tpm { command } => match command {
            TpmCommand::Approve { data_dir, flags } => {
                print!("{}", flags.approve(&mgmt_server::tpm::keyset(&data_dir))?);
                Ok(())
            }
            TpmCommand::Status { data_dir } => {
                let s = mgmt_server::tpm::status(&data_dir)?;
                print!("{}", status_text(&s, "guestkey-server"));
                Ok(())
            }
        },
        Command::Reseal {
            data_dir,
            to_files,
            tpm,
        } => {
            let dir = mgmt_server::datadir::DataDir::new(&data_dir);
            let current = if dir.is_tpm() {
                Some(TpmSite::load(&dir.tpm_dir())?)
            } else {
                None
            };
            let to = tpm.reseal_to(to_files, current.as_ref())?;
            let r = mgmt_server::tpm::reseal(&data_dir, &to)?;
            print!("{}", resealed_text(&r));
            Ok(())
        }
        Command::Status {
            data_dir,
            database,
            json,
        } => {
            let dir = mgmt_server::datadir::DataDir::new(&data_dir);
            let s = mgmt_server::database::Status::read(&dir, database.as_deref())?;
            if json {
                println!("{}", s.json());
            } else {
                print!("{}", s.text());
            }
            Ok(())
        }
        Command::MoveToPostgres {
            data_dir,
            database,
            master_key_source,
        } => {
            let dir = mgmt_server::datadir::DataDir::new(&data_dir);
            let r = mgmt_server::move_db::move_to_postgres(&dir, &database, master_key_source)?;
            println!("{} now uses {}", data_dir.display(), r.database);
            for (t, n) in &r.tables {
                if *n > 0 {
                    println!("  {t}: {n} rows");
                }
            }
            println!(
                "  verified: row counts, the audit chain ({} records), {} keys unwrap",
                r.audit_records, r.keys
            );
            println!(
                "  the SQLite database is kept as {} (delete it once you no longer need it: it holds the wrapped keys)",
                r.kept.display()
            );
            println!(
                "next: guestkey-server run --data-dir {}",
                data_dir.display()
            );
            Ok(())
        }
        Command::AddReplica { data_dir, to } => {
            let dir = mgmt_server::datadir::DataDir::new(&data_dir);
            let r = mgmt_server::database::add_replica(&dir, &to)?;
            println!(
                "made {} ({} files) for a new replica on {}",
                to.display(),
                r.files,
                r.database
            );
            println!(
                "it holds the master key and CA keys: move it to the new machine as you would {} (e.g. tar over ssh, mode 0700 kept), then there:",
                data_dir.display()
            );
            println!(
                "  guestkey-server run --data-dir {} --listen IP:PORT",
                to.display()
            );
            println!(
                "hosts reach every replica with the same server certificate; give each replica's address a DNS name or IP in the certificate (init --san)"
            );
            Ok(())
        }
        Command::MigrateRoles {
            data_dir,
            master_key_source,
        } => {
            let r = mgmt_server::roles::migrate_roles(&mgmt_server::roles::MigrateOptions {
                data_dir: data_dir.clone(),
                master_key_source,
            })?;
            let d = data_dir.display();
            println!("{d} now has one CA per role; every key is kept");

            println!("  hosts CA:  {d}/ca/ca.pem (unchanged: host certificates stay valid)");
            println!(
                "  server CA: {} (signs only the server certificate, sha256 {})",
                r.server_ca.display(),
                r.server_sha256
            );
            println!(
                "  admin CA:  {d}/ca/admin-ca.pem; new admin credential in {d}/admin (admin certificate sha256 {}); {} older admin certificate(s) no longer work: copy {d}/admin again wherever it was copied",
                r.admin_sha256, r.removed_admins
            );
            println!("next:");
            println!("  guestkey-server run --data-dir {d}");
            println!(
                "  on each host, with a copy of {} as server-ca.pem: stop guestkeyd, run",
                r.server_ca.display()
            );
            println!(
                "    guestkeyd trust-server --ca-file server-ca.pem --state-dir /var/lib/guestkeyd"
            );
            println!("  and start guestkeyd again (until then the server's pushes to it wait)");
            Ok(())
        }
    }
}

fn print_split(s: &mgmt_server::recovery::SplitReport) {
    println!(
        "  recovery: split {}, {}-of-{} shares in {}:",
        s.split_id,
        s.threshold,
        s.files.len(),
        s.out.display()
    );
    for (f, custodian) in &s.files {
        println!("    {} for {custodian}", f.display());
    }
    println!(
        "  hand each file to its custodian and delete it here; any {} of them and a database backup rebuild this server (guestkey-server recover)",
        s.threshold
    );
    if let Some(old) = &s.replaced {
        println!("  split {old} is replaced: its shares open nothing now");
    }
}

fn recovery(command: RecoveryCommand) -> Result<(), Box<dyn std::error::Error>> {
    use mgmt_server::datadir::DataDir;
    match command {
        RecoveryCommand::Split {
            data_dir,
            shares,
            to,
            out,
            master_key_source,
        } => {
            let (m, n) = mgmt_server::shares::parse_m_of_n(&shares)?;
            let dir = DataDir::new(&data_dir);
            let store = mgmt_server::database::Database::of(&dir, None)?.open()?;
            let source = master_key_source.unwrap_or_else(|| dir.default_master_key_source());
            let expected = store
                .begin(mgmt_server::store::Access::Read)?
                .master_key_id()?
                .unwrap_or_default();
            let master = mgmt_server::domain::keyring::load_matching(&source, &expected)?;
            let split = mgmt_server::recovery::split(
                &dir,
                store.as_ref(),
                &master,
                &mgmt_server::recovery::SplitOptions {
                    threshold: m,
                    shares: Some(n),
                    custodians: to,
                    out,
                },
            )?;
            print_split(&split);
        }
        RecoveryCommand::Status { data_dir } => {
            let dir = DataDir::new(&data_dir);
            let store = mgmt_server::database::Database::of(&dir, None)?.open()?;
            let Some(s) = mgmt_server::recovery::status(&dir, store.as_ref())? else {
                println!("no recovery shares: `guestkey-server recovery split` makes them");
                return Ok(());
            };
            let r = &s.record;
            let when = mgmt_server::names::format_utc(r.created).unwrap_or_default();
            println!("split:      {} ({when})", r.split_id);
            println!("shares:     {}-of-{}", r.threshold, r.shares);
            println!("recovery key: {}", r.recipient);
            for (i, c) in r.custodians.iter().enumerate() {
                println!("  share {}: {c}", i + 1);
            }
            println!(
                "master key: {} ({})",
                r.master_key_id,
                if s.master_current {
                    "the one in use"
                } else {
                    "NOT the one in use: run `guestkey-server recovery refresh`"
                }
            );
            println!(
                "certificates: {}",
                if s.bundle_current {
                    "as in the data directory"
                } else {
                    "CHANGED since the split: run `guestkey-server recovery refresh`"
                }
            );
        }
        RecoveryCommand::Refresh {
            data_dir,
            master_key_source,
        } => {
            let dir = DataDir::new(&data_dir);
            let store = mgmt_server::database::Database::of(&dir, None)?.open()?;
            let source = master_key_source.unwrap_or_else(|| dir.default_master_key_source());
            if mgmt_server::recovery::refresh(&dir, store.as_ref(), &source)? {
                println!(
                    "the recovery record holds the data directory's certificates and keys as they are now; the shares stay valid"
                );
            } else {
                println!("no recovery shares: `guestkey-server recovery split` makes them");
            }
        }
    }
    Ok(())
}

fn admin(command: AdminCommand) -> Result<(), Box<dyn std::error::Error>> {
    use mgmt_server::datadir::DataDir;
    let open = |data_dir: &std::path::Path| -> Result<_, Box<dyn std::error::Error>> {
        let dir = DataDir::new(data_dir);
        let store = mgmt_server::database::Database::of(&dir, None)?.open()?;
        Ok((dir, store))
    };
    match command {
        AdminCommand::Add {
            name,
            data_dir,
            out,
            master_key_source,
        } => {
            let (dir, store) = open(&data_dir)?;
            let source = master_key_source.unwrap_or_else(|| dir.default_master_key_source());
            let a = mgmt_server::admins::add(&dir, &source, store.as_ref(), &name, &out)?;
            println!(
                "admin credential {} made in {} (certificate sha256 {}): guestkeyctl --admin-dir {} ...",
                a.name,
                a.dir.display(),
                a.sha256,
                a.dir.display()
            );
        }
        AdminCommand::List { data_dir } => {
            let (_, store) = open(&data_dir)?;
            println!("{:<20}  {:<20}  CERTIFICATE SHA-256", "NAME", "MADE");
            for (name, sha, created) in mgmt_server::admins::list(store.as_ref())? {
                let when = mgmt_server::names::format_utc(created).unwrap_or_default();
                println!("{name:<20}  {when:<20}  {sha}");
            }
        }
        AdminCommand::Remove {
            name,
            data_dir,
            master_key_source,
        } => {
            let (dir, store) = open(&data_dir)?;
            let source = master_key_source.unwrap_or_else(|| dir.default_master_key_source());
            mgmt_server::admins::remove(store.as_ref(), &source, &name)?;
            println!("admin credential {name} removed: its certificate is refused from now on");
        }
    }
    Ok(())
}
