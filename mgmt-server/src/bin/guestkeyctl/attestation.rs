//! `guestkeyctl attestation ...`: the PCR values a host's quotes may show
//! (its allowlist), added by hand or learnt from a verified quote of the
//! host now. Imports `connect` and `output`.

use clap::Subcommand;
use guestkey_proto::admin as pb;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum AttestationCmd {
    /// Allow PCR values for a host (--host) or a host group (--group):
    /// given (--pcr N=SHA256HEX, repeatable) or learnt from a quote of a
    /// host now (--learn --host HOST, once its software is known good).
    /// Each change is a new version of that allowlist.
    Allow {
        /// The host whose allowlist changes, or with --learn the host to
        /// learn from.
        #[arg(long, required_unless_present = "group")]
        host: Option<String>,
        /// The host group whose allowlist changes.
        #[arg(long)]
        group: Option<String>,
        /// An allowed SHA-256 value of a PCR, e.g. 7=3d45...; repeatable.
        #[arg(long = "pcr", value_name = "N=SHA256HEX", conflicts_with = "learn")]
        pcrs: Vec<String>,
        /// Learn the current values from a verified quote of the host.
        #[arg(long)]
        learn: bool,
        /// With --learn: the PCRs to learn (comma-separated).
        #[arg(
            long,
            value_name = "LIST",
            default_value = "0,1,2,3,4,5,6,7",
            requires = "learn"
        )]
        learn_pcrs: String,
        /// Replace the allowed values of the PCRs named instead of adding.
        #[arg(long)]
        replace: bool,
    },
    /// Show a host's or a host group's allowlist.
    Show {
        /// Host name.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        host: Option<String>,
        /// Group name.
        #[arg(long)]
        group: Option<String>,
    },
}

/// `N=HEX` as the request's allowed PCR.
fn parse_pcr(text: &str) -> Result<pb::AllowedPcr, Failure> {
    let (n, v) = text.split_once('=').ok_or_else(|| {
        Failure(format!(
            "--pcr {text}: give PCR=SHA256HEX, e.g. --pcr 7=<64 hex digits>"
        ))
    })?;
    let pcr = n
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p < 24)
        .ok_or_else(|| Failure(format!("--pcr {text}: `{n}` is not a PCR (0 to 23)")))?;
    Ok(pb::AllowedPcr {
        pcr,
        sha256: v.trim().to_ascii_lowercase(),
    })
}

fn parse_list(text: &str) -> Result<Vec<u32>, Failure> {
    text.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .ok()
                .filter(|p| *p < 24)
                .ok_or_else(|| {
                    Failure(format!(
                        "--learn-pcrs {text}: `{p}` is not a PCR (0 to 23); give e.g. 0,2,4,7"
                    ))
                })
        })
        .collect()
}

pub(crate) async fn run(cmd: AttestationCmd, ctx: &Ctx) -> Result<(), Failure> {
    let a = match cmd {
        AttestationCmd::Allow {
            host,
            group,
            pcrs,
            learn,
            learn_pcrs,
            replace,
        } => {
            if pcrs.is_empty() && !learn {
                return Err(Failure(
                    "attestation allow: give --pcr N=SHA256HEX (repeatable) or --learn".into(),
                ));
            }
            if learn && host.is_none() {
                return Err(Failure(
                    "attestation allow --learn: name the host to learn from with --host HOST".into(),
                ));
            }
            if !learn && host.is_some() && group.is_some() {
                return Err(Failure(
                    "attestation allow: give --host or --group (both only with --learn: learn from the host into the group)".into(),
                ));
            }
            let pcrs = pcrs
                .iter()
                .map(|p| parse_pcr(p))
                .collect::<Result<Vec<_>, _>>()?;
            let learn_pcrs = if learn {
                parse_list(&learn_pcrs)?
            } else {
                vec![]
            };
            let mut c = ctx.connect().await?;
            c.allow_pcrs(pb::AllowPcrsRequest {
                host: host.unwrap_or_default(),
                group: group.unwrap_or_default(),
                pcrs,
                learn,
                learn_pcrs,
                replace,
            })
            .await
        }
        AttestationCmd::Show { host, group } => {
            ctx.connect()
                .await?
                .get_allowlist(pb::AllowlistRef {
                    host: host.unwrap_or_default(),
                    group: group.unwrap_or_default(),
                })
                .await
        }
    }
    .map_err(rpc_error)?
    .into_inner();
    output::emit(
        ctx.json,
        output::allowlist_json(&a),
        output::allowlist_text(&a),
    );
    Ok(())
}
