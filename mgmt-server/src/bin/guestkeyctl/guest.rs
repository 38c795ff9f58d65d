//! `guestkeyctl guest ...`: define guests from libvirt domain XML, adopt
//! the ones a host's libvirt has already, list,
//! show, start, stop, migrate and undefine them. Imports `connect` and
//! `output`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum GuestCmd {
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
    /// Bring a guest that already exists in a host's libvirt (made by
    /// virt-manager, virt-install or `virsh define`) under guestkey. Every
    /// disk is checked first: a refusal names the disk and what to do, and
    /// changes nothing. Then its cleartext disks are encrypted (online if
    /// it runs) and it is defined through guestkey from the host's own
    /// definition, with the <encryption> elements, so that it starts from
    /// virsh and virt-manager like any managed guest. Read-only disks and
    /// CD-ROMs stay as they are.
    Adopt {
        /// Host whose libvirt has the guest.
        #[arg(long)]
        host: String,
        /// The domain's name or UUID, as `virsh list --all` shows it.
        domain: String,
        /// Leave this disk (its target dev, e.g. vdb) cleartext; repeatable.
        #[arg(long, value_name = "TARGET")]
        skip: Vec<String>,
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

pub(crate) async fn run(cmd: GuestCmd, ctx: &Ctx) -> Result<(), Failure> {
    let r = |guest: String| pb::GuestRef {
        name_or_uuid: guest,
    };
    let mut show_xml = false;
    let g = match cmd {
        GuestCmd::Define { host, xml } => {
            let domain_xml = read_domain_xml(&xml)?;
            ctx.connect()
                .await?
                .define_guest(pb::DefineGuestRequest { host, domain_xml })
                .await
        }
        GuestCmd::Adopt { host, domain, skip } => {
            // Encrypting a disk online takes as long as copying it.
            let mut c = ctx
                .connect_with_timeout(Duration::from_secs(6 * 3600))
                .await?;
            if !ctx.json {
                eprintln!("adopting {domain} on host {host}...");
            }
            let a = c
                .adopt_guest(pb::AdoptGuestRequest { host, domain, skip })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let g = a.guest.clone().unwrap_or_default();
            let left: Vec<String> = a
                .left
                .iter()
                .map(|l| format!("{} ({})", l.target, l.reason))
                .collect();
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.join(", ")
                }
            };
            let text = format!(
                "{}\nencrypted now:   {}\nalready managed: {}\nleft cleartext:  {}",
                output::guest_text(&g),
                list(&a.encrypted),
                list(&a.already_managed),
                list(&left)
            );
            let json = serde_json::json!({
                "guest": output::guest_json(&g),
                "encrypted": a.encrypted,
                "already_managed": a.already_managed,
                "left": a.left.iter().map(|l| serde_json::json!({"target": l.target, "reason": l.reason})).collect::<Vec<_>>(),
            });
            output::emit(ctx.json, json, text);
            return Ok(());
        }
        GuestCmd::List { host } => {
            let guests = ctx
                .connect()
                .await?
                .list_guests(pb::ListGuestsRequest {
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .guests;
            output::emit(
                ctx.json,
                serde_json::json!(guests.iter().map(output::guest_json).collect::<Vec<_>>()),
                output::guests_table(&guests),
            );
            return Ok(());
        }
        GuestCmd::Show { guest, xml } => {
            show_xml = xml;
            ctx.connect().await?.get_guest(r(guest)).await
        }
        GuestCmd::Undefine { guest } => ctx.connect().await?.undefine_guest(r(guest)).await,
        GuestCmd::Start { guest } => ctx.connect().await?.start_guest(r(guest)).await,
        GuestCmd::Stop { guest } => ctx.connect().await?.stop_guest(r(guest)).await,
        GuestCmd::Migrate {
            guest,
            to,
            live,
            r#unsafe,
        } => {
            // A migration lasts as long as libvirt needs to move the guest.
            let mut c = ctx
                .connect_with_timeout(Duration::from_secs(6 * 3600))
                .await?;
            if !ctx.json {
                eprintln!("migrating {guest} to host {to}...");
            }
            c.migrate_guest(pb::MigrateGuestRequest {
                name_or_uuid: guest,
                to_host: to,
                live,
                r#unsafe,
            })
            .await
        }
    }
    .map_err(rpc_error)?
    .into_inner();
    let text = if show_xml {
        g.domain_xml.clone()
    } else {
        output::guest_text(&g)
    };
    output::emit(ctx.json, output::guest_json(&g), text);
    Ok(())
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
