//! `guestkeyctl`: the admin command line of guestkey.

#![allow(clippy::print_stderr)] // a command-line program reports errors on stderr

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use guestkey_proto::admin::{self as pb, admin_client::AdminClient};
use mgmt_server::names::parse_size;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// guestkeyctl: administer a guestkey management server (hosts, volumes,
/// audit log) over mutual TLS with the admin credential.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Server URL, e.g. https://localhost:7443 [default: the `server` file
    /// in the admin directory].
    #[arg(long, env = "GUESTKEY_SERVER", global = true, value_name = "URL")]
    server: Option<String>,
    /// The admin credential directory made by `guestkey-server init`
    /// (DATA_DIR/admin): ca.pem, admin.pem, admin.key.
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
    Host(HostCmd),
    /// Encrypted volumes: create, encrypt, decrypt, list, show, rekey,
    /// delete (crypto-shredding).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Guests: define from libvirt domain XML, list, show, start, stop,
    /// migrate, undefine.
    #[command(subcommand)]
    Guest(GuestCmd),
    /// Key rotation policies: set, list, remove.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Show the audit log; --verify checks its hash chain.
    Audit(AuditArgs),
    /// Print the CA certificate (PEM) that signs server, admin and host
    /// certificates.
    CaCert,
}

#[derive(Subcommand)]
enum HostCmd {
    /// Register a host and print its one-time enrollment token.
    Add {
        /// Host name (A-Z a-z 0-9 . _ -).
        name: String,
        /// HOST:PORT of the host daemon's host-agent API.
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
    },
    /// List hosts.
    List,
    /// Show one host.
    Show {
        /// Host name.
        name: String,
    },
    /// Revoke a host: its certificate stops working and no key goes to it.
    Revoke {
        /// Host name.
        name: String,
    },
    /// Set how guests migrate to this host: the libvirt URI the source
    /// host's libvirt connects to, and QEMU's migration stream URI.
    SetMigration {
        /// Host name.
        name: String,
        /// e.g. qemu+tls://host2.example/system (default: qemu+tls://
        /// with the host part of the host's address).
        #[arg(long, value_name = "URI", default_value = "")]
        libvirt_uri: String,
        /// e.g. tcp://host2.example:49152 (default: libvirt's choice).
        #[arg(long, value_name = "URI", default_value = "")]
        migration_uri: String,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// "Encrypt this volume": make a key and have the host create the
    /// volume, LUKS-encrypted, in a libvirt storage pool.
    Create {
        /// Host that gets the volume.
        #[arg(long)]
        host: String,
        /// libvirt storage pool on that host.
        #[arg(long)]
        pool: String,
        /// Volume name (unique per server).
        #[arg(long)]
        name: String,
        /// Size: bytes, or with K, M, G, T, P (powers of 1024), e.g. 10G.
        #[arg(long, allow_hyphen_values = true)]
        size: String,
        /// qcow2 (LUKS inside qcow2) or raw (LUKS).
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    /// Encrypt an existing cleartext libvirt volume and manage its key from
    /// now on. Its data is copied into a LUKS image under a new key,
    /// checked, swapped in, and the cleartext blocks are overwritten; online
    /// (block copy) if a guest runs on it. Guests defined through guestkey
    /// that use it get its key.
    Encrypt {
        /// Host where the volume is.
        #[arg(long)]
        host: String,
        /// Its libvirt storage pool.
        #[arg(long)]
        pool: String,
        /// Its libvirt volume name (the guestkey name too).
        #[arg(long)]
        name: String,
        /// Its format: qcow2 or raw (checked on the host).
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    /// Turn a volume back into cleartext and destroy its key (audited). No
    /// guest may use it.
    Decrypt {
        /// Name or UUID.
        volume: String,
        /// Confirms that the data is to be stored in clear.
        #[arg(long)]
        yes_i_know: bool,
    },
    /// List volumes.
    List {
        /// Only this host's volumes.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show a volume, by name or UUID.
    Show {
        /// Name or UUID.
        volume: String,
    },
    /// Delete a volume: its key is destroyed on the server and on the host
    /// (crypto-shredding), and the volume is deleted on the host.
    Delete {
        /// Name or UUID.
        volume: String,
    },
    /// Rotate a volume's key. --shallow: a new passphrase in a new keyslot,
    /// the old keyslot erased. --deep: a new data key, all data rewritten.
    /// A volume whose guest runs is re-encrypted online (a deep rekey by
    /// block copy; the guest keeps running). The old key is destroyed once
    /// the host confirms the new one opens the volume.
    Rekey {
        /// Name or UUID.
        volume: String,
        /// New passphrase, same data key.
        #[arg(long, conflicts_with = "deep", required_unless_present_any = ["deep", "now"])]
        shallow: bool,
        /// New data key: the data is copied into a new image under the new
        /// key, checked, swapped in, and the old image wiped.
        #[arg(long)]
        deep: bool,
        /// Suspected compromise: an immediate deep rekey (same as --deep).
        #[arg(long, conflicts_with = "shallow")]
        now: bool,
        /// Only while its guest runs (block copy; the guest keeps running).
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        /// Only while no guest runs on it.
        #[arg(long)]
        offline: bool,
        /// Wait until the host is done (a progress bar in a terminal); fail
        /// if the host refused the rekey.
        #[arg(long)]
        wait: bool,
        /// Copy at most this much per second (deep rekeys), e.g. 50M.
        #[arg(long, value_name = "SIZE")]
        bandwidth: Option<String>,
    },
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Define a guest on a host from libvirt domain XML. Disks whose source
    /// is a guestkey volume (type='volume' pool/volume, or type='file' with
    /// its path) get the matching <encryption> element, and the keys of
    /// exactly those volumes go to the host.
    Define {
        /// Host to define the guest on.
        #[arg(long)]
        host: String,
        /// The domain XML file (at most 1 MiB).
        #[arg(long, value_name = "FILE")]
        xml: PathBuf,
    },
    /// List guests.
    List {
        /// Only this host's guests.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show a guest, by name or UUID.
    Show {
        /// Name or UUID.
        guest: String,
        /// Print the domain XML as sent to the host.
        #[arg(long)]
        xml: bool,
    },
    /// Undefine a guest; its host erases the guest's keys.
    Undefine {
        /// Name or UUID.
        guest: String,
    },
    /// Start a guest on its host.
    Start {
        /// Name or UUID.
        guest: String,
    },
    /// Stop (destroy) a guest on its host.
    Stop {
        /// Name or UUID.
        guest: String,
    },
    /// Migrate a guest to another host (shared storage): its keys go to the
    /// destination, libvirt moves the guest, the source erases the keys,
    /// and the destination re-encrypts the volumes (deep rekey) within the
    /// policy's after-migration interval, at once if none sets one.
    Migrate {
        /// Name or UUID.
        guest: String,
        /// Destination host.
        #[arg(long, value_name = "HOST")]
        to: String,
        /// Live: the guest keeps running while its memory moves.
        #[arg(long)]
        live: bool,
        /// As `virsh migrate --unsafe`: migrate although libvirt cannot
        /// tell that the disks' storage and cache mode are safe to share.
        #[arg(long)]
        r#unsafe: bool,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct PolicyTarget {
    /// Every pool of this name, on any host.
    #[arg(long)]
    pool: Option<String>,
    /// One volume (name or UUID); wins over its pool's policy.
    #[arg(long)]
    volume: Option<String>,
}

impl PolicyTarget {
    fn split(self) -> (String, String) {
        match (self.pool, self.volume) {
            (Some(p), _) => ("pool".into(), p),
            (_, Some(v)) => ("volume".into(), v),
            _ => unreachable!("clap requires one of --pool and --volume"),
        }
    }
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Rotate keys older than --max-key-age: the server's scheduler rekeys
    /// them (shallow or deep).
    Set {
        #[command(flatten)]
        target: PolicyTarget,
        /// Maximum key age: a number with s, m, h or d, e.g. 90d.
        #[arg(long, value_name = "DURATION")]
        max_key_age: String,
        /// shallow (new keyslot) or deep (new data key, data rewritten).
        #[arg(long, value_name = "MODE")]
        mode: String,
        /// Deep rekey this long after the volume's guest migrated (the source
        /// host's QEMU held the data key); default: at once.
        #[arg(long, value_name = "DURATION")]
        after_migration: Option<String>,
    },
    /// List policies.
    List,
    /// Remove a policy.
    Remove {
        #[command(flatten)]
        target: PolicyTarget,
    },
}

#[derive(Args)]
struct AuditArgs {
    /// Verify the hash chain instead of listing.
    #[arg(long)]
    verify: bool,
    /// Only records after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many records.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

/// An error for the user: one line saying what to do.
struct Failure(String);

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

fn read(dir: &Path, file: &str) -> Result<String, Failure> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| {
        Failure(format!(
            "cannot read {}: {e} (--admin-dir must be the admin directory made by `guestkey-server init`)",
            path.display()
        ))
    })
}

async fn connect(cli: &Cli, timeout: std::time::Duration) -> Result<AdminClient<Channel>, Failure> {
    let dir = cli.admin_dir.clone().ok_or_else(|| {
        Failure("no admin credential: pass --admin-dir DIR or set GUESTKEY_ADMIN_DIR (DATA_DIR/admin of the server)".into())
    })?;
    let url = match &cli.server {
        Some(u) => u.clone(),
        None => read(&dir, "server")?.trim().to_owned(),
    };
    let domain = mgmt_server::tls::tls_name(&url)
        .ok_or_else(|| Failure(format!("server URL {url:?} must start with https://")))?;
    check_admin_certificate(&dir, &read(&dir, "admin.pem")?)?;
    let key = zeroize::Zeroizing::new(read(&dir, "admin.key")?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&dir, "ca.pem")?))
        .identity(Identity::from_pem(read(&dir, "admin.pem")?, key.as_bytes()))
        .domain_name(domain);
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure(format!("bad server URL {url:?}: {e}")))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| Failure(transport_hint(&url, &mgmt_server::tls::error_chain(&e))))?;
    Ok(AdminClient::new(channel))
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

fn rpc_error(s: tonic::Status) -> Failure {
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

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    // A migration lasts as long as libvirt needs to move the guest.
    let timeout = match &cli.command {
        Command::Guest(GuestCmd::Migrate { .. }) => std::time::Duration::from_secs(6 * 3600),
        _ => std::time::Duration::from_secs(60),
    };
    let mut c = connect(&cli, timeout).await?;
    match cli.command {
        Command::Host(HostCmd::Add { name, address }) => {
            let r = c
                .add_host(pb::AddHostRequest { name, address })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let h = r.host.unwrap_or_default();
            if json {
                print_json(
                    &json!({"host": host_json(&h), "enrollment_token": r.enrollment_token, "token_expires_unix": r.token_expires_unix}),
                );
            } else {
                println!("host {} registered ({})", h.name, h.address);
                println!(
                    "enrollment token (one use, expires {}):",
                    fmt_time(r.token_expires_unix)
                );
                println!("{}", r.enrollment_token);
                println!(
                    "on the host: guestkeyd enroll --server URL --token TOKEN --ca-file CA.pem --state-dir DIR"
                );
            }
        }
        Command::Host(HostCmd::List) => {
            let hosts = c
                .list_hosts(pb::ListHostsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .hosts;
            if json {
                print_json(&json!(hosts.iter().map(host_json).collect::<Vec<_>>()));
            } else {
                table(
                    &["NAME", "ADDRESS", "STATE", "VOLUMES", "ENROLLED"],
                    hosts
                        .iter()
                        .map(|h| {
                            vec![
                                h.name.clone(),
                                h.address.clone(),
                                h.state.clone(),
                                h.volume_count.to_string(),
                                fmt_time(h.enrolled_unix),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Host(HostCmd::Show { name }) => {
            let h = c
                .get_host(pb::HostRef { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_host(&h, json);
        }
        Command::Host(HostCmd::Revoke { name }) => {
            let h = c
                .revoke_host(pb::HostRef { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_host(&h, json);
        }
        Command::Volume(VolumeCmd::Create {
            host,
            pool,
            name,
            size,
            format,
        }) => {
            let capacity_bytes = parse_size(&size)?;
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    host,
                    pool,
                    name,
                    capacity_bytes,
                    format,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_volume(&v, json);
        }
        Command::Volume(VolumeCmd::Encrypt {
            host,
            pool,
            name,
            format,
        }) => {
            // The call returns when the host is done; meanwhile its progress.
            let mut watcher = c.clone();
            let watched = name.clone();
            let call = c.encrypt_volume(pb::EncryptVolumeRequest {
                host,
                pool,
                name,
                format,
            });
            tokio::pin!(call);
            let mut bar = Bar::new(json);
            let v = loop {
                tokio::select! {
                    r = &mut call => break r.map_err(rpc_error)?.into_inner(),
                    () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                        if let Ok(v) = watcher.get_volume(pb::VolumeRef { name_or_id: watched.clone() }).await {
                            bar.draw(&v.into_inner());
                        }
                    }
                }
            };
            bar.clear();
            show_volume(&v, json);
        }
        Command::Volume(VolumeCmd::Decrypt { volume, yes_i_know }) => {
            let v = c
                .decrypt_volume(pb::DecryptVolumeRequest {
                    name_or_id: volume,
                    confirm: yes_i_know,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_volume(&v, json);
        }
        Command::Volume(VolumeCmd::List { host }) => {
            let vols = c
                .list_volumes(pb::ListVolumesRequest {
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .volumes;
            if json {
                print_json(&json!(vols.iter().map(volume_json).collect::<Vec<_>>()));
            } else {
                table(
                    &[
                        "NAME", "HOST", "POOL", "FORMAT", "SIZE", "GEN", "STATE", "ID",
                    ],
                    vols.iter()
                        .map(|v| {
                            vec![
                                v.name.clone(),
                                v.host.clone(),
                                v.pool.clone(),
                                v.format.clone(),
                                fmt_size(v.capacity_bytes),
                                v.key_generation.to_string(),
                                v.state.clone(),
                                v.id.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Volume(VolumeCmd::Show { volume }) => {
            let v = c
                .get_volume(pb::VolumeRef { name_or_id: volume })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_volume(&v, json);
        }
        Command::Volume(VolumeCmd::Delete { volume }) => {
            let v = c
                .delete_volume(pb::VolumeRef { name_or_id: volume })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_volume(&v, json);
        }
        Command::Volume(VolumeCmd::Rekey {
            volume,
            deep,
            now,
            online,
            offline,
            wait,
            bandwidth,
            ..
        }) => {
            let bandwidth_bytes_per_sec = match bandwidth {
                Some(b) => parse_size(&b)?,
                None => 0,
            };
            let placement = match (online, offline) {
                (true, _) => "online",
                (_, true) => "offline",
                _ => "",
            };
            let v = c
                .rekey_volume(pb::RekeyVolumeRequest {
                    name_or_id: volume,
                    deep: deep || now,
                    placement: placement.into(),
                    bandwidth_bytes_per_sec,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if !wait {
                show_volume(&v, json);
                return Ok(());
            }
            let done = follow(&mut c, &v.id, json).await?;
            if done.key_generation == v.key_generation {
                return Err(Failure(format!(
                    "the rekey of {} did not happen: {}",
                    done.name, done.last_error
                )));
            }
            show_volume(&done, json);
        }
        Command::Guest(GuestCmd::Define { host, xml }) => {
            let domain_xml = read_domain_xml(&xml)?;
            let g = c
                .define_guest(pb::DefineGuestRequest { host, domain_xml })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_guest(&g, json, false);
        }
        Command::Guest(GuestCmd::List { host }) => {
            let guests = c
                .list_guests(pb::ListGuestsRequest {
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .guests;
            if json {
                print_json(&json!(guests.iter().map(guest_json).collect::<Vec<_>>()));
            } else {
                table(
                    &["NAME", "HOST", "STATE", "PENDING", "VOLUMES", "UUID"],
                    guests
                        .iter()
                        .map(|g| {
                            vec![
                                g.name.clone(),
                                g.host.clone(),
                                g.state.clone(),
                                g.pending.clone(),
                                g.volumes.join(","),
                                g.uuid.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Guest(GuestCmd::Show { guest, xml }) => {
            let g = c
                .get_guest(pb::GuestRef {
                    name_or_uuid: guest,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_guest(&g, json, xml);
        }
        Command::Guest(GuestCmd::Undefine { guest }) => {
            let g = c
                .undefine_guest(pb::GuestRef {
                    name_or_uuid: guest,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_guest(&g, json, false);
        }
        Command::Guest(GuestCmd::Start { guest }) => {
            let g = c
                .start_guest(pb::GuestRef {
                    name_or_uuid: guest,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_guest(&g, json, false);
        }
        Command::Guest(GuestCmd::Migrate {
            guest,
            to,
            live,
            r#unsafe,
        }) => {
            if !json {
                eprintln!("migrating {guest} to host {to}...");
            }
            let g = c
                .migrate_guest(pb::MigrateGuestRequest {
                    name_or_uuid: guest,
                    to_host: to,
                    live,
                    r#unsafe,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_guest(&g, json, false);
        }
        Command::Host(HostCmd::SetMigration {
            name,
            libvirt_uri,
            migration_uri,
        }) => {
            let h = c
                .set_host_migration(pb::SetHostMigrationRequest {
                    name,
                    libvirt_uri,
                    migration_uri,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_host(&h, json);
        }
        Command::Guest(GuestCmd::Stop { guest }) => {
            let g = c
                .stop_guest(pb::GuestRef {
                    name_or_uuid: guest,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_guest(&g, json, false);
        }
        Command::Policy(PolicyCmd::Set {
            target,
            max_key_age,
            mode,
            after_migration,
        }) => {
            let (scope, target) = target.split();
            let p = pb::Policy {
                scope,
                target,
                max_key_age_secs: mgmt_server::policy::parse_duration(&max_key_age)?,
                mode,
                after_migration_secs: after_migration
                    .as_deref()
                    .map(mgmt_server::policy::parse_duration)
                    .transpose()?
                    .unwrap_or(0),
            };
            let p = c.set_policy(p).await.map_err(rpc_error)?.into_inner();
            show_policies(&[p], json);
        }
        Command::Policy(PolicyCmd::List) => {
            let ps = c
                .list_policies(pb::ListPoliciesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .policies;
            show_policies(&ps, json);
        }
        Command::Policy(PolicyCmd::Remove { target }) => {
            let (scope, target) = target.split();
            let p = c
                .remove_policy(pb::Policy {
                    scope,
                    target,
                    ..Default::default()
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            show_policies(&[p], json);
        }
        Command::Audit(a) if a.verify => {
            let v = c
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            if json {
                print_json(
                    &json!({"ok": v.ok, "records": v.records, "first_bad_seq": v.first_bad_seq, "problem": v.problem}),
                );
            } else if v.ok {
                println!(
                    "audit log intact: {} records, hash chain verified",
                    v.records
                );
            } else {
                println!(
                    "AUDIT LOG DAMAGED at record {}: {}",
                    v.first_bad_seq, v.problem
                );
            }
            if !v.ok {
                return Err(Failure("the audit log does not verify".into()));
            }
        }
        Command::Audit(a) => {
            let recs = c
                .list_audit(pb::ListAuditRequest {
                    after_seq: a.after,
                    limit: a.limit,
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .records;
            if json {
                print_json(&json!(recs.iter().map(|r| json!({"seq": r.seq, "time_unix_ms": r.time_unix_ms, "actor": r.actor, "action": r.action, "subject": r.subject, "detail": r.detail, "hash": r.hash})).collect::<Vec<_>>()));
            } else {
                table(
                    &["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
                    recs.iter()
                        .map(|r| {
                            vec![
                                r.seq.to_string(),
                                fmt_time(r.time_unix_ms / 1000),
                                r.actor.clone(),
                                r.action.clone(),
                                r.subject.clone(),
                                r.detail.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::CaCert => {
            let pem = c
                .get_ca_certificate(pb::GetCaCertificateRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .pem;
            if json {
                print_json(&json!({"pem": pem}));
            } else {
                print!("{pem}");
            }
        }
    }
    Ok(())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn host_json(h: &pb::Host) -> serde_json::Value {
    json!({"name": h.name, "address": h.address, "state": h.state, "created_unix": h.created_unix,
           "enrolled_unix": h.enrolled_unix, "certificate_sha256": h.certificate_sha256, "volume_count": h.volume_count,
           "held_keys": h.held_keys, "inventory_reported_unix": h.inventory_reported_unix,
           "libvirt_uri": h.libvirt_uri, "migration_uri": h.migration_uri})
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    json!({"id": v.id, "name": v.name, "host": v.host, "pool": v.pool, "format": v.format,
           "capacity_bytes": v.capacity_bytes, "key_generation": v.key_generation, "state": v.state,
           "last_error": v.last_error, "attempts": v.attempts, "secret_uuid": v.secret_uuid, "created_unix": v.created_unix,
           "rekey_due_unix": v.rekey_due_unix,
           "progress": if v.progress_phase.is_empty() { serde_json::Value::Null } else {
               json!({"phase": v.progress_phase, "done_bytes": v.progress_done_bytes, "total_bytes": v.progress_total_bytes}) }})
}

fn read_domain_xml(path: &Path) -> Result<String, Failure> {
    const MAX: u64 = 1 << 20;
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > MAX {
        return Err(Failure(format!(
            "{} is {} bytes; domain XML is limited to 1 MiB",
            path.display(),
            meta.len()
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|_| Failure(format!("{} is not UTF-8 text", path.display())))
}

fn guest_json(g: &pb::Guest) -> serde_json::Value {
    json!({"uuid": g.uuid, "name": g.name, "host": g.host, "state": g.state, "pending": g.pending,
           "last_error": g.last_error, "attempts": g.attempts, "volumes": g.volumes, "domain_xml": g.domain_xml,
           "migrating_to": g.migrating_to})
}

fn show_guest(g: &pb::Guest, json: bool, xml: bool) {
    if json {
        return print_json(&guest_json(g));
    }
    if xml {
        print!("{}", g.domain_xml);
        return;
    }
    let rows = [
        ("name", g.name.clone()),
        ("uuid", g.uuid.clone()),
        ("host", g.host.clone()),
        ("state", g.state.clone()),
        ("pending", g.pending.clone()),
        ("migrating to", g.migrating_to.clone()),
        ("encrypted disks", g.volumes.join(", ")),
        (
            "attempts",
            if g.pending.is_empty() {
                String::new()
            } else {
                g.attempts.to_string()
            },
        ),
        ("last error", g.last_error.clone()),
    ];
    for (k, v) in rows {
        if !v.is_empty() {
            println!("{k:<16} {v}");
        }
    }
}

fn show_policies(ps: &[pb::Policy], json: bool) {
    if json {
        return print_json(&json!(ps
            .iter()
            .map(|p| json!({"scope": p.scope, "target": p.target, "max_key_age_secs": p.max_key_age_secs,
                             "mode": p.mode, "after_migration_secs": p.after_migration_secs}))
            .collect::<Vec<_>>()));
    }
    table(
        &["SCOPE", "TARGET", "MAX KEY AGE", "MODE", "AFTER MIGRATION"],
        ps.iter()
            .map(|p| {
                vec![
                    p.scope.clone(),
                    p.target.clone(),
                    format!("{}s", p.max_key_age_secs),
                    p.mode.clone(),
                    if p.after_migration_secs == 0 {
                        "-".into()
                    } else {
                        format!("{}s", p.after_migration_secs)
                    },
                ]
            })
            .collect(),
    );
}

fn show_host(h: &pb::Host, json: bool) {
    if json {
        return print_json(&host_json(h));
    }
    let rows = [
        ("name", h.name.clone()),
        ("address", h.address.clone()),
        ("state", h.state.clone()),
        ("volumes", h.volume_count.to_string()),
        ("registered", fmt_time(h.created_unix)),
        ("enrolled", fmt_time(h.enrolled_unix)),
        ("certificate sha256", h.certificate_sha256.clone()),
        ("keys held", h.held_keys.to_string()),
        ("last report", fmt_time(h.inventory_reported_unix)),
        (
            "libvirt URI",
            if h.libvirt_uri.is_empty() {
                "(default: qemu+tls://ADDRESS-HOST/system)".into()
            } else {
                h.libvirt_uri.clone()
            },
        ),
        ("migration URI", h.migration_uri.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<19} {v}");
    }
}

fn show_volume(v: &pb::Volume, json: bool) {
    if json {
        return print_json(&volume_json(v));
    }
    let rows = [
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("host", v.host.clone()),
        ("pool", v.pool.clone()),
        ("format", format!("{} (LUKS)", v.format)),
        ("size", fmt_size(v.capacity_bytes)),
        ("key generation", v.key_generation.to_string()),
        ("state", v.state.clone()),
        ("libvirt secret", v.secret_uuid.clone()),
        (
            "deep rekey due",
            if v.rekey_due_unix == 0 {
                String::new()
            } else {
                format!("{} (after a migration)", fmt_time(v.rekey_due_unix))
            },
        ),
        (
            "progress",
            if v.progress_phase.is_empty() {
                String::new()
            } else {
                progress_line(v)
            },
        ),
        ("attempts", v.attempts.to_string()),
        ("last error", v.last_error.clone()),
    ];
    for (k, val) in rows {
        if !val.is_empty() {
            println!("{k:<15} {val}");
        }
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}

/// States in which the host still works on a volume.
const PENDING: [&str; 6] = [
    "pending-create",
    "pending-encrypt",
    "encrypting",
    "rekeying",
    "pending-decrypt",
    "pending-delete",
];

/// Polls volume `id` until no operation is pending (at most 6 hours),
/// with a progress bar on stderr when it is a terminal; returns it then.
async fn follow(c: &mut AdminClient<Channel>, id: &str, json: bool) -> Result<pb::Volume, Failure> {
    let mut bar = Bar::new(json);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(6 * 3600);
    loop {
        let v = c
            .get_volume(pb::VolumeRef {
                name_or_id: id.to_owned(),
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        if !PENDING.contains(&v.state.as_str()) || std::time::Instant::now() > end {
            bar.clear();
            return Ok(v);
        }
        bar.draw(&v);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A one-line progress bar on stderr, drawn only in a terminal.
struct Bar {
    on: bool,
    drawn: bool,
}

impl Bar {
    fn new(json: bool) -> Self {
        Self {
            on: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            drawn: false,
        }
    }

    fn draw(&mut self, v: &pb::Volume) {
        if !self.on {
            return;
        }
        let line = progress_line(v);
        eprint!("\r\x1b[2K{line}");
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

/// `[#####-----]  45%  460M of 1.0G  re-encrypting`, or the state and the
/// last error when the host reports no progress.
fn progress_line(v: &pb::Volume) -> String {
    let (done, total) = (v.progress_done_bytes, v.progress_total_bytes);
    let mut line = if let Some(pct) = done.min(total).saturating_mul(100).checked_div(total) {
        let pct = pct as usize;
        format!(
            "[{}{}] {pct:>3}%  {} of {}  {}",
            "#".repeat(pct / 4),
            "-".repeat(25 - pct / 4),
            fmt_size(done),
            fmt_size(total),
            v.progress_phase
        )
    } else if !v.progress_phase.is_empty() {
        format!("{}...", v.progress_phase)
    } else {
        format!("{}...", v.state)
    };
    if !v.last_error.is_empty() {
        line.push_str(&format!("  (retrying: {})", v.last_error));
    }
    line.chars().take(200).collect()
}

fn fmt_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut i = 0;
    while i + 1 < UNITS.len()
        && bytes >= 1 << (10 * (i + 1))
        && bytes.is_multiple_of(1 << (10 * (i + 1)))
    {
        i += 1;
    }
    format!("{}{}", bytes >> (10 * i), UNITS[i])
}

fn fmt_time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| unix.to_string())
}
