//! `guestkeyctl volume ...`: create, encrypt, decrypt, list, show, delete
//! and rekey volumes, ask for their escrow packets, and `follow` a volume
//! until its host is done (`create` by default, `rekey --wait`). Imports `connect` and `output` and the
//! library's `parse_size` and `parse_duration`.

mod follow;

use std::time::Duration;

use clap::Subcommand;
use guestkey_proto::admin as pb;
use mgmt_server::names::parse_size;
use mgmt_server::policy::parse_duration;

use crate::Failure;
use crate::connect::{Client, Ctx, rpc_error};
use crate::output::{self, Bar};
use follow::{Followed, created, follow, still_pending};

#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// "Encrypt this volume": make a key and have the host create the
    /// volume, LUKS-encrypted, in a libvirt storage pool. Waits until the
    /// host made it (a spinner in a terminal); fails if it could not.
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
        /// What a release of its key to the host needs: auto (its
        /// certificate), attested (a fresh TPM quote its allowlist
        /// matches, every time), approved (an operator's approval of each
        /// start) or attested+approved.
        #[arg(long, value_name = "POLICY", default_value = "auto")]
        release: String,
        /// Split the key: this server keeps one half, the verifier server
        /// the host enrolled with (`guestkeyd enroll-verifier`) the other,
        /// each released only after its own attestation of the host.
        /// Needs --release attested or attested+approved.
        #[arg(long)]
        split: bool,
        /// Return at once, while the volume is still pending-create; the
        /// server keeps retrying until the host made it (see `volume show`).
        #[arg(long)]
        no_wait: bool,
        /// Wait at most this long for the host (s, m, h or d), then fail;
        /// the volume stays pending and the server keeps retrying.
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "10m",
            conflicts_with = "no_wait"
        )]
        timeout: String,
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
    /// Set what a release of the volume's key needs: auto or attested.
    SetRelease {
        /// Name or UUID.
        volume: String,
        /// auto or attested.
        policy: String,
    },
    /// Delete a volume: its key is destroyed on the server and on the host
    /// (crypto-shredding), and the volume is deleted on the host.
    Delete {
        /// Name or UUID.
        volume: String,
    },
    /// Queue again a volume operation the server gave up on (state
    /// `failed`: too many answered failures; `volume show` says why).
    Retry {
        /// Name or UUID.
        volume: String,
    },
    /// Ask for an escrow packet of the volume for offline custody: its
    /// passphrase and LUKS data key, encrypted by its host with age to the
    /// recipients given (each must be in the host's --escrow-recipients
    /// file). Another admin must approve it (`guestkeyctl escrow approve
    /// ID`); then `guestkeyctl escrow fetch ID --out FILE` gets it.
    Escrow {
        /// Name or UUID.
        volume: String,
        /// An age X25519 recipient (age1..., as `age-keygen -y` prints it);
        /// repeat for more, at most 16.
        #[arg(long = "to", value_name = "RECIPIENT", required = true)]
        to: Vec<String>,
        /// Why (shown to the approver and audited; one line, up to 200
        /// characters).
        #[arg(long, default_value = "")]
        reason: String,
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

pub(crate) async fn run(cmd: VolumeCmd, ctx: &Ctx) -> Result<(), Failure> {
    let v = match cmd {
        VolumeCmd::Create {
            host,
            pool,
            name,
            size,
            format,
            release,
            split,
            no_wait,
            timeout,
        } => {
            let capacity_bytes = parse_size(&size)?;
            let limit = Duration::from_secs(parse_duration(&timeout)?);
            let mut c = ctx.connect().await?;
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    host,
                    pool,
                    name,
                    capacity_bytes,
                    format,
                    release,
                    split,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if no_wait {
                v
            } else {
                created(follow(&mut c, &v.id, ctx.json, limit).await?, &timeout)?
            }
        }
        VolumeCmd::Encrypt {
            host,
            pool,
            name,
            format,
        } => {
            let req = pb::EncryptVolumeRequest {
                host,
                pool,
                name,
                format,
            };
            encrypt(ctx.connect().await?, req, ctx.json).await?
        }
        VolumeCmd::Decrypt { volume, yes_i_know } => ctx
            .connect()
            .await?
            .decrypt_volume(pb::DecryptVolumeRequest {
                name_or_id: volume,
                confirm: yes_i_know,
            })
            .await
            .map_err(rpc_error)?
            .into_inner(),
        VolumeCmd::List { host } => {
            let vols = ctx
                .connect()
                .await?
                .list_volumes(pb::ListVolumesRequest {
                    host: host.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .volumes;
            output::emit(
                ctx.json,
                serde_json::json!(vols.iter().map(output::volume_json).collect::<Vec<_>>()),
                output::volumes_table(&vols),
            );
            return Ok(());
        }
        VolumeCmd::Escrow { volume, to, reason } => {
            let e = ctx
                .connect()
                .await?
                .request_escrow(pb::RequestEscrowRequest {
                    volume,
                    recipients: to,
                    reason,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::emit(
                ctx.json,
                output::escrow_json(&e),
                output::escrow_requested_text(&e),
            );
            return Ok(());
        }
        VolumeCmd::Show { volume } => get(&mut ctx.connect().await?, &volume).await?,
        VolumeCmd::SetRelease { volume, policy } => ctx
            .connect()
            .await?
            .set_release_policy(pb::SetReleasePolicyRequest {
                name_or_id: volume,
                release: policy,
            })
            .await
            .map_err(rpc_error)?
            .into_inner(),
        VolumeCmd::Delete { volume } => ctx
            .connect()
            .await?
            .delete_volume(pb::VolumeRef { name_or_id: volume })
            .await
            .map_err(rpc_error)?
            .into_inner(),
        VolumeCmd::Retry { volume } => ctx
            .connect()
            .await?
            .retry_volume(pb::VolumeRef { name_or_id: volume })
            .await
            .map_err(rpc_error)?
            .into_inner(),
        VolumeCmd::Rekey {
            volume,
            deep,
            now,
            online,
            offline,
            wait,
            bandwidth,
            ..
        } => {
            let bandwidth_bytes_per_sec = match bandwidth {
                Some(b) => parse_size(&b)?,
                None => 0,
            };
            let placement = match (online, offline) {
                (true, _) => "online",
                (_, true) => "offline",
                _ => "",
            };
            let req = pb::RekeyVolumeRequest {
                name_or_id: volume,
                deep: deep || now,
                placement: placement.into(),
                bandwidth_bytes_per_sec,
            };
            rekey(ctx.connect().await?, req, wait, ctx.json).await?
        }
    };
    show(&v, ctx.json);
    Ok(())
}

fn show(v: &pb::Volume, json: bool) {
    output::emit(json, output::volume_json(v), output::volume_text(v));
}

async fn get(c: &mut Client, name_or_id: &str) -> Result<pb::Volume, Failure> {
    Ok(c.get_volume(pb::VolumeRef {
        name_or_id: name_or_id.to_owned(),
    })
    .await
    .map_err(rpc_error)?
    .into_inner())
}

/// The encrypt call returns when the host is done; meanwhile its progress.
async fn encrypt(
    mut c: Client,
    req: pb::EncryptVolumeRequest,
    json: bool,
) -> Result<pb::Volume, Failure> {
    let mut watcher = c.clone();
    let watched = req.name.clone();
    let call = c.encrypt_volume(req);
    tokio::pin!(call);
    let mut bar = Bar::new(json);
    let v = loop {
        tokio::select! {
            r = &mut call => break r.map_err(rpc_error)?.into_inner(),
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(v) = get(&mut watcher, &watched).await {
                    bar.draw(&v);
                }
            }
        }
    };
    bar.clear();
    Ok(v)
}

/// Requests a rekey; with `wait`, follows it and fails if it did not
/// happen.
async fn rekey(
    mut c: Client,
    req: pb::RekeyVolumeRequest,
    wait: bool,
    json: bool,
) -> Result<pb::Volume, Failure> {
    let v = c.rekey_volume(req).await.map_err(rpc_error)?.into_inner();
    if !wait {
        return Ok(v);
    }
    match follow(&mut c, &v.id, json, Duration::from_secs(6 * 3600)).await? {
        Followed::Done(done) if done.key_generation != v.key_generation => Ok(done),
        Followed::Done(done) => Err(Failure(format!(
            "the rekey of {} did not happen: {}",
            done.name, done.last_error
        ))),
        Followed::TimedOut(p) => Err(still_pending(&p, "6h")),
    }
}
