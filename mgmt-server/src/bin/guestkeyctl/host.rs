//! `guestkeyctl host ...`: register, list, show, revoke hosts and set how
//! guests migrate to them. Imports `connect` and `output`.

use clap::Subcommand;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum HostCmd {
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
    /// Attest a host now (a fresh nonce, its TPM's quote, the checks) and
    /// show the outcome.
    Attest {
        /// Host name.
        name: String,
    },
    /// Put a host in a host group ("" for none): the group's attestation
    /// allowlist applies to it too.
    SetGroup {
        /// Host name.
        name: String,
        /// Group name ("": none).
        group: String,
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

pub(crate) async fn run(cmd: HostCmd, ctx: &Ctx) -> Result<(), Failure> {
    let mut c = ctx.connect().await?;
    let h = match cmd {
        HostCmd::Add { name, address } => {
            let r = c
                .add_host(pb::AddHostRequest { name, address })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::emit(
                ctx.json,
                output::host_added_json(&r),
                output::host_added_text(&r),
            );
            return Ok(());
        }
        HostCmd::List => {
            let hosts = c
                .list_hosts(pb::ListHostsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .hosts;
            output::emit(
                ctx.json,
                serde_json::json!(hosts.iter().map(output::host_json).collect::<Vec<_>>()),
                output::hosts_table(&hosts),
            );
            return Ok(());
        }
        HostCmd::Show { name } => c.get_host(pb::HostRef { name }).await,
        HostCmd::Revoke { name } => c.revoke_host(pb::HostRef { name }).await,
        HostCmd::Attest { name } => c.attest_host(pb::HostRef { name }).await,
        HostCmd::SetGroup { name, group } => {
            c.set_host_group(pb::SetHostGroupRequest { name, group })
                .await
        }
        HostCmd::SetMigration {
            name,
            libvirt_uri,
            migration_uri,
        } => {
            c.set_host_migration(pb::SetHostMigrationRequest {
                name,
                libvirt_uri,
                migration_uri,
            })
            .await
        }
    }
    .map_err(rpc_error)?
    .into_inner();
    output::emit(ctx.json, output::host_json(&h), output::host_text(&h));
    Ok(())
}
