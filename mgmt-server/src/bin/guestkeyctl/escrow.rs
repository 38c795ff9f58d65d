//! `guestkeyctl escrow ...`: escrow requests (made by `guestkeyctl volume
//! escrow`) and their packets. Another admin than the requester approves
//! (two-person rule); the host then makes the packet, which `fetch` writes
//! to a new file (mode 0600, never over an existing one) for
//! `guestkey-recover`. Imports `connect` and `output`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Client, Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum EscrowCmd {
    /// The requests, newest first: pending ones and current packets
    /// (id, volume, key generation, state, who asked and decided,
    /// recipients, age).
    List {
        /// Only this volume's (name or UUID).
        #[arg(long)]
        volume: Option<String>,
        /// Also denied, expired and obsolete ones (packets of a key
        /// generation the volume no longer has).
        #[arg(long)]
        all: bool,
    },
    /// Approve a pending request (not your own: two-person rule): the
    /// volume's host makes the packet, and the server keeps it.
    Approve {
        /// Request id (es-...).
        id: String,
        /// A note kept with the decision and in the audit log.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Deny a pending request (the requester may withdraw their own).
    Deny {
        /// Request id (es-...).
        id: String,
        /// A note kept with the decision and in the audit log.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Write a made packet to a new file (mode 0600; an existing file is
    /// never overwritten), to open offline with `guestkey-recover show FILE
    /// --identity IDENTITY`. Audited.
    Fetch {
        /// Request id (es-...).
        id: String,
        /// The file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub(crate) async fn run(cmd: EscrowCmd, ctx: &Ctx) -> Result<(), Failure> {
    let mut c = ctx.connect().await?;
    let (id, approve, note) = match cmd {
        EscrowCmd::List { volume, all } => {
            let es = list(&mut c, volume.unwrap_or_default(), all).await?;
            output::emit(
                ctx.json,
                serde_json::json!(es.iter().map(output::escrow_json).collect::<Vec<_>>()),
                output::escrow_table(&es, output::now_unix()),
            );
            return Ok(());
        }
        EscrowCmd::Fetch { id, out } => return fetch(&mut c, &id, &out, ctx.json).await,
        EscrowCmd::Approve { id, note } => (id, true, note),
        EscrowCmd::Deny { id, note } => (id, false, note),
    };
    let e = c
        .decide_escrow(pb::DecideEscrowRequest { id, approve, note })
        .await
        .map_err(rpc_error)?
        .into_inner();
    output::emit(
        ctx.json,
        output::escrow_json(&e),
        output::escrow_decided_text(&e),
    );
    Ok(())
}

async fn list(c: &mut Client, volume: String, all: bool) -> Result<Vec<pb::EscrowEntry>, Failure> {
    Ok(c.list_escrow(pb::ListEscrowRequest { volume, all })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .entries)
}

/// Fetches the packet and writes it to `out`, a file made here.
async fn fetch(c: &mut Client, id: &str, out: &Path, json: bool) -> Result<(), Failure> {
    let shown = out.display().to_string();
    if out.symlink_metadata().is_ok() {
        return Err(Failure(format!(
            "{shown} exists: give --out a file that does not exist yet (a packet never overwrites one)"
        )));
    }
    let p = c
        .get_escrow_packet(pb::EscrowRef { id: id.to_owned() })
        .await
        .map_err(rpc_error)?
        .into_inner();
    // For the warning on an obsolete packet.
    let entry = list(c, String::new(), true)
        .await?
        .into_iter()
        .find(|e| e.id == id);
    write_new(out, &p.packet)
        .map_err(|e| Failure(format!("cannot write the packet to {shown}: {e}")))?;
    output::emit(
        json,
        serde_json::json!({"id": p.id, "file": shown, "bytes": p.packet.len(),
                           "obsolete": entry.as_ref().map(|e| e.obsolete)}),
        output::escrow_fetched_text(&p.id, &shown, p.packet.len(), entry.as_ref()),
    );
    Ok(())
}

/// Creates `path` (O_EXCL, mode 0600) with `bytes`, synced; a file left
/// half written is removed.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let done = f.write_all(bytes).and_then(|()| f.sync_all());
    if done.is_err() {
        drop(f);
        let _ = std::fs::remove_file(path);
    }
    done
}
