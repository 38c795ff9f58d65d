//! `guestkeyctl pool ...`: mark libvirt storage pools managed, list them,
//! show a pool's volumes as guestkey sees them, list what managed pools
//! offer for encryption, and encrypt offered volumes. Imports `connect`
//! and `output`.

use clap::Subcommand;
use guestkey_proto::admin as pb;
use serde_json::{Value, json};

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum PoolCmd {
    /// Mark a libvirt storage pool of a host managed: `pool offers` (and
    /// the console) then offer every cleartext volume in it for
    /// encryption. The host must show the pool active.
    Manage {
        /// The host.
        #[arg(long)]
        host: String,
        /// The pool's libvirt name (`virsh pool-list` on the host).
        #[arg(value_name = "POOL")]
        pool: String,
    },
    /// Unmark a managed pool; its volumes stay as they are.
    Unmanage {
        /// The host.
        #[arg(long)]
        host: String,
        /// The pool's libvirt name.
        #[arg(value_name = "POOL")]
        pool: String,
    },
    /// List managed pools.
    List {
        /// Only this host's.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show a pool's volumes as its host sees them now (managed pool or
    /// not): guestkey volumes, cleartext ones with the command that
    /// encrypts each, and why others cannot be.
    Show {
        /// The host.
        #[arg(long)]
        host: String,
        /// The pool's libvirt name.
        #[arg(value_name = "POOL")]
        pool: String,
    },
    /// Every cleartext volume of the managed pools (of one host, or all),
    /// with the command that encrypts it.
    Offers {
        /// Only this host's pools.
        #[arg(long)]
        host: Option<String>,
    },
    /// Encrypt offered volumes of a managed pool, one after the other, as
    /// `volume encrypt` does (online under a running guestkey guest). A
    /// volume that a guest defined outside guestkey uses is left, with the
    /// `guest adopt` command that takes the guest and its disks.
    Encrypt {
        /// The host.
        #[arg(long)]
        host: String,
        /// The managed pool.
        #[arg(value_name = "POOL")]
        pool: String,
        /// Every offered volume.
        #[arg(long, conflicts_with = "names", required_unless_present = "names")]
        all: bool,
        /// These volumes only (each must be offered).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
}

pub(crate) async fn run(cmd: PoolCmd, ctx: &Ctx) -> Result<(), Failure> {
    match cmd {
        PoolCmd::Manage { host, pool } => {
            let m = ctx
                .connect()
                .await?
                .manage_pool(pb::PoolRef { host, pool })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let one = std::slice::from_ref(&m);
            output::emit(ctx.json, pools_json(one), pools_table(one));
        }
        PoolCmd::Unmanage { host, pool } => {
            let m = ctx
                .connect()
                .await?
                .unmanage_pool(pb::PoolRef { host, pool })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let one = std::slice::from_ref(&m);
            output::emit(ctx.json, pools_json(one), pools_table(one));
        }
        PoolCmd::List { host } => {
            let ps = list(ctx, host).await?;
            output::emit(ctx.json, pools_json(&ps), pools_table(&ps));
        }
        PoolCmd::Show { host, pool } => {
            let v = ctx
                .connect()
                .await?
                .describe_pool(pb::PoolRef { host, pool })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut text = format!(
                "Pool {} of host {} ({}, {}): {}\n",
                v.pool,
                v.host,
                v.kind,
                v.path,
                match &v.managed {
                    Some(m) => format!("managed since {} by {}", output::time(m.since_unix), m.by),
                    None => "not managed".into(),
                }
            );
            text.push_str(&volumes_table(&v.volumes));
            output::emit(ctx.json, view_json(&v), text);
        }
        PoolCmd::Offers { host } => offers(ctx, host).await?,
        PoolCmd::Encrypt {
            host,
            pool,
            all,
            names,
        } => encrypt(ctx, host, pool, all, names).await?,
    }
    Ok(())
}

async fn list(ctx: &Ctx, host: Option<String>) -> Result<Vec<pb::ManagedPool>, Failure> {
    Ok(ctx
        .connect()
        .await?
        .list_managed_pools(pb::ListManagedPoolsRequest {
            host: host.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .pools)
}

/// Every offered volume of every managed pool; a pool whose host does not
/// answer is reported and the others still listed.
async fn offers(ctx: &Ctx, host: Option<String>) -> Result<(), Failure> {
    let pools = list(ctx, host).await?;
    let mut c = ctx.connect().await?;
    let mut rows = vec![];
    let mut docs = vec![];
    let mut unread = vec![];
    for p in &pools {
        let r = c
            .describe_pool(pb::PoolRef {
                host: p.host.clone(),
                pool: p.pool.clone(),
            })
            .await;
        match r {
            Ok(v) => {
                for vol in v.into_inner().volumes {
                    if vol.state != "offered" {
                        continue;
                    }
                    docs.push(json!({"host": p.host, "pool": p.pool, "name": vol.name,
                        "format": vol.format, "capacity_bytes": vol.capacity_bytes,
                        "used_by": vol.used_by, "command": vol.command}));
                    rows.push(vec![
                        p.host.clone(),
                        p.pool.clone(),
                        vol.name,
                        vol.format,
                        output::size(vol.capacity_bytes),
                        vol.command,
                    ]);
                }
            }
            Err(e) => {
                let why = rpc_error(e).0;
                unread.push(json!({"host": p.host, "pool": p.pool, "error": why}));
                eprintln!("pool {} of host {}: {why}", p.pool, p.host);
            }
        }
    }
    let mut text = output::table(
        &["HOST", "POOL", "VOLUME", "FORMAT", "SIZE", "TO ENCRYPT"],
        rows,
    );
    if pools.is_empty() {
        text =
            "No managed pools: mark one with `guestkeyctl pool manage --host HOST POOL`.\n".into();
    }
    output::emit(
        ctx.json,
        json!({"offered": docs, "unreadable_pools": unread}),
        text,
    );
    if unread.is_empty() {
        Ok(())
    } else {
        Err(Failure(format!(
            "{} managed pool(s) could not be read (above)",
            unread.len()
        )))
    }
}

/// Encrypts offered volumes of a managed pool; every name is checked
/// before the first encryption.
async fn encrypt(
    ctx: &Ctx,
    host: String,
    pool: String,
    all: bool,
    names: Vec<String>,
) -> Result<(), Failure> {
    let mut c = ctx.connect().await?;
    let v = c
        .describe_pool(pb::PoolRef {
            host: host.clone(),
            pool: pool.clone(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if v.managed.is_none() {
        return Err(Failure(format!(
            "pool {pool} of host {host} is not managed: mark it with `guestkeyctl pool manage --host {host} {pool}`, or encrypt single volumes with `guestkeyctl volume encrypt`"
        )));
    }
    let chosen: Vec<&pb::PoolVolumeView> = if all {
        v.volumes.iter().filter(|x| x.state == "offered").collect()
    } else {
        let mut out = vec![];
        for n in &names {
            let Some(x) = v.volumes.iter().find(|x| &x.name == n) else {
                return Err(Failure(format!(
                    "pool {pool} of host {host} has no volume {n} (see `guestkeyctl pool show --host {host} {pool}`); nothing was encrypted"
                )));
            };
            if x.state != "offered" {
                let why = match x.state.as_str() {
                    "managed" => "it is a guestkey volume already".to_owned(),
                    _ => x.detail.clone(),
                };
                return Err(Failure(format!(
                    "volume {n} is not offered for encryption: {why}; nothing was encrypted"
                )));
            }
            if !out.iter().any(|o: &&pb::PoolVolumeView| o.name == x.name) {
                out.push(x);
            }
        }
        out
    };
    let mut rows = vec![];
    let mut docs = vec![];
    let mut failed = 0;
    for x in chosen {
        if !x.adopt_domain.is_empty() {
            rows.push(vec![x.name.clone(), "left".into(), x.command.clone()]);
            docs.push(json!({"name": x.name, "result": "left", "detail": x.command}));
            continue;
        }
        let req = pb::EncryptVolumeRequest {
            host: host.clone(),
            pool: pool.clone(),
            name: x.name.clone(),
            format: x.format.clone(),
        };
        if !ctx.json {
            eprintln!("encrypting {} ...", x.name);
        }
        match c.encrypt_volume(req).await.map(|r| r.into_inner()) {
            Ok(done) => {
                rows.push(vec![x.name.clone(), "encrypted".into(), done.id.clone()]);
                docs.push(json!({"name": x.name, "result": "encrypted", "volume_id": done.id}));
            }
            Err(e) => {
                let why = rpc_error(e).0;
                failed += 1;
                rows.push(vec![x.name.clone(), "failed".into(), why.clone()]);
                docs.push(json!({"name": x.name, "result": "failed", "detail": why}));
            }
        }
    }
    output::emit(
        ctx.json,
        json!(docs),
        output::table(&["VOLUME", "RESULT", "DETAIL"], rows),
    );
    if failed > 0 {
        return Err(Failure(format!("{failed} volume(s) not encrypted (above)")));
    }
    Ok(())
}

fn pools_json(ps: &[pb::ManagedPool]) -> Value {
    json!(
        ps.iter()
            .map(
                |p| json!({"host": p.host, "pool": p.pool, "since_unix": p.since_unix, "by": p.by})
            )
            .collect::<Vec<_>>()
    )
}

fn pools_table(ps: &[pb::ManagedPool]) -> String {
    output::table(
        &["HOST", "POOL", "MANAGED SINCE", "BY"],
        ps.iter()
            .map(|p| {
                vec![
                    p.host.clone(),
                    p.pool.clone(),
                    output::time(p.since_unix),
                    p.by.clone(),
                ]
            })
            .collect(),
    )
}

fn view_json(v: &pb::PoolView) -> Value {
    json!({
        "host": v.host, "pool": v.pool, "kind": v.kind, "path": v.path,
        "managed": v.managed.as_ref().map(|m| json!({"since_unix": m.since_unix, "by": m.by})),
        "volumes": v.volumes.iter().map(|x| json!({
            "name": x.name, "path": x.path, "format": x.format,
            "capacity_bytes": x.capacity_bytes, "used_by": x.used_by, "state": x.state,
            "volume_id": x.volume_id, "volume_state": x.volume_state,
            "command": x.command, "adopt_domain": x.adopt_domain, "detail": x.detail,
        })).collect::<Vec<_>>(),
    })
}

fn volumes_table(vs: &[pb::PoolVolumeView]) -> String {
    output::table(
        &["VOLUME", "FORMAT", "SIZE", "USED BY", "STATE", "DETAIL"],
        vs.iter()
            .map(|x| {
                let detail = match x.state.as_str() {
                    "managed" => format!("{} ({})", x.volume_id, x.volume_state),
                    "offered" | "cleartext" => x.command.clone(),
                    _ => x.detail.clone(),
                };
                vec![
                    x.name.clone(),
                    x.format.clone(),
                    if x.capacity_bytes == 0 {
                        "-".into()
                    } else {
                        output::size(x.capacity_bytes)
                    },
                    if x.used_by.is_empty() {
                        "-".into()
                    } else {
                        x.used_by.join(", ")
                    },
                    x.state.clone(),
                    detail,
                ]
            })
            .collect(),
    )
}
