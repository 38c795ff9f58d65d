//! `guestkeyctl audit`: list the audit log, verify it (hash chain, MACs,
//! the server's checkpoints, and a head the admin kept), or print a signed
//! head to keep.
//! Imports `connect` and `output`.

use clap::Args;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Args)]
pub(crate) struct AuditArgs {
    /// Verify the log (hash chain, MACs, the server's checkpoints) instead
    /// of listing.
    #[arg(long)]
    verify: bool,
    /// With --verify: also check against a signed head kept earlier (from
    /// `guestkeyctl audit --head`): the text, or @FILE.
    #[arg(long, value_name = "HEAD", requires = "verify")]
    against: Option<String>,
    /// Print the signed head of the log now (keep it outside the server;
    /// `--verify --against` checks the log against it later).
    #[arg(long, conflicts_with = "verify")]
    head: bool,
    /// Only records after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many records.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

pub(crate) async fn run(a: AuditArgs, ctx: &Ctx) -> Result<(), Failure> {
    // A kept head from a file is read before connecting.
    let kept = match &a.against {
        Some(h) => Some(match h.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .map_err(|e| Failure(format!("cannot read the kept head {file}: {e}")))?
                .trim()
                .to_owned(),
            None => h.trim().to_owned(),
        }),
        None => None,
    };
    let mut c = ctx.connect().await?;
    if a.head {
        let h = c
            .get_audit_head(pb::GetAuditHeadRequest {})
            .await
            .map_err(rpc_error)?
            .into_inner();
        output::emit(ctx.json, output::head_json(&h), format!("{}\n", h.signed));
        return Ok(());
    }
    if a.verify {
        let v = match kept {
            Some(kept_head) => {
                c.verify_audit_head(pb::VerifyAuditHeadRequest { kept_head })
                    .await
            }
            None => c.verify_audit(pb::VerifyAuditRequest {}).await,
        }
        .map_err(rpc_error)?
        .into_inner();
        output::emit(ctx.json, output::verify_json(&v), output::verify_text(&v));
        if !v.ok {
            return Err(Failure("the audit log does not verify".into()));
        }
        return Ok(());
    }
    let recs = c
        .list_audit(pb::ListAuditRequest {
            after_seq: a.after,
            limit: a.limit,
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .records;
    output::emit(
        ctx.json,
        output::audit_json(&recs),
        output::audit_table(&recs),
    );
    Ok(())
}
