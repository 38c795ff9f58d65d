//! `guestkeyctl pending ...`: starts whose keys wait for an operator's
//! approval (volumes released `approved` or `attested+approved`), and the
//! decision. An approval is good for the one start that asked. Imports
//! `connect` and `output`.

use clap::Subcommand;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum PendingCmd {
    /// The requests waiting for a decision (host, guest, volumes, the
    /// host's attestation, time waited).
    List {
        /// Also the decided, used and expired ones.
        #[arg(long)]
        all: bool,
    },
    /// Approve a request: the start that asked gets its keys.
    Approve {
        /// Request id (rq-...).
        id: String,
        /// A note kept with the decision in the audit log.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Deny a request: the start that asked fails, saying so.
    Deny {
        /// Request id (rq-...).
        id: String,
        /// A note kept with the decision and shown to the one starting.
        #[arg(long, default_value = "")]
        note: String,
    },
}

pub(crate) async fn run(cmd: PendingCmd, ctx: &Ctx) -> Result<(), Failure> {
    let mut c = ctx.connect().await?;
    let (id, approve, note) = match cmd {
        PendingCmd::List { all } => {
            let rs = c
                .list_pending(pb::ListPendingRequest { all })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .requests;
            output::emit(
                ctx.json,
                serde_json::json!(rs.iter().map(output::pending_json).collect::<Vec<_>>()),
                output::pending_table(&rs, output::now_unix()),
            );
            return Ok(());
        }
        PendingCmd::Approve { id, note } => (id, true, note),
        PendingCmd::Deny { id, note } => (id, false, note),
    };
    let r = c
        .decide_pending(pb::DecidePendingRequest { id, approve, note })
        .await
        .map_err(rpc_error)?
        .into_inner();
    output::emit(
        ctx.json,
        output::pending_json(&r),
        format!(
            "request {} {} (host {}, guest {})\n",
            r.id, r.state, r.host, r.guest_name
        ),
    );
    Ok(())
}
