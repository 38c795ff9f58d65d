//! `guestkeyctl policy ...`: set, list and remove key rotation policies.
//! Imports `connect` and `output` and the library's `parse_duration`.

use clap::{Args, Subcommand};
use guestkey_proto::admin as pb;
use mgmt_server::policy::parse_duration;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct PolicyTarget {
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
pub(crate) enum PolicyCmd {
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

pub(crate) async fn run(cmd: PolicyCmd, ctx: &Ctx) -> Result<(), Failure> {
    let ps = match cmd {
        PolicyCmd::Set {
            target,
            max_key_age,
            mode,
            after_migration,
        } => {
            let (scope, target) = target.split();
            let p = pb::Policy {
                scope,
                target,
                max_key_age_secs: parse_duration(&max_key_age)?,
                mode,
                after_migration_secs: after_migration
                    .as_deref()
                    .map(parse_duration)
                    .transpose()?
                    .unwrap_or(0),
            };
            let c = &mut ctx.connect().await?;
            vec![c.set_policy(p).await.map_err(rpc_error)?.into_inner()]
        }
        PolicyCmd::List => {
            ctx.connect()
                .await?
                .list_policies(pb::ListPoliciesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .policies
        }
        PolicyCmd::Remove { target } => {
            let (scope, target) = target.split();
            let p = pb::Policy {
                scope,
                target,
                ..Default::default()
            };
            let c = &mut ctx.connect().await?;
            vec![c.remove_policy(p).await.map_err(rpc_error)?.into_inner()]
        }
    };
    output::emit(
        ctx.json,
        output::policies_json(&ps),
        output::policies_table(&ps),
    );
    Ok(())
}
