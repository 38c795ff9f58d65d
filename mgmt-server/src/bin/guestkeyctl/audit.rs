//! `guestkeyctl audit`: list the audit log, or verify its hash chain.
//! Imports `connect` and `output`.

use clap::Args;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Args)]
pub(crate) struct AuditArgs {
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

pub(crate) async fn run(a: AuditArgs, ctx: &Ctx) -> Result<(), Failure> {
    let mut c = ctx.connect().await?;
    if a.verify {
        let v = c
            .verify_audit(pb::VerifyAuditRequest {})
            .await
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
