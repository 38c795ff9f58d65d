//! Managed storage pools: `guestkeyctl pool manage --host H POOL` marks a
//! libvirt pool of a host, and from then on `pool offers` (and the
//! console) offer every cleartext volume in it for encryption, with the
//! command that does it. `pool show` describes any pool of a host: each
//! volume as guestkey sees it (a guestkey volume, cleartext and offered,
//! or why it cannot be offered).
//!
//! The host describes the pool ([`AgentClient::describe_pool`], which
//! changes nothing); encryption itself is `volume encrypt`, or `guest
//! adopt` for a volume that a guest defined outside guestkey uses (a
//! volume encrypted under such a guest would not open at its next start).
//!
//! [`AgentClient::describe_pool`]: super::agent::AgentClient::describe_pool

use std::sync::Arc;

use crate::domain::Core;
use crate::domain::adopt::described;
use crate::domain::agent::{PoolDescription, VolumeUser};
use crate::model::{Caller, CoreError, ManagedPool, Name, VolumeState};
use crate::store::Tx;

/// What guestkey makes of one volume of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// A guestkey volume.
    Managed {
        /// Its id.
        id: String,
        /// Its state.
        state: VolumeState,
    },
    /// Cleartext and encryptable: `command` does it. `offered`: the pool is
    /// managed (else the volume is only shown as cleartext).
    Cleartext {
        /// Marked managed.
        offered: bool,
        /// The `guestkeyctl` command that encrypts it.
        command: String,
        /// The command is `guest adopt` of this domain (defined outside
        /// guestkey, it uses the volume): else `volume encrypt`.
        adopt: Option<String>,
    },
    /// Not encryptable by guestkey as it is; why, and what to do.
    NotOffered {
        /// The reason, naming the fix.
        why: String,
    },
}

/// One volume of a described pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEntry {
    /// Its name in the pool.
    pub name: String,
    /// Its path on the host.
    pub path: String,
    /// The format libvirt found.
    pub format: String,
    /// Guest-visible size (0 when qemu-img did not read it).
    pub capacity_bytes: u64,
    /// Domains of the host's libvirt with a disk on it.
    pub used_by: Vec<VolumeUser>,
    /// What guestkey makes of it.
    pub offer: Offer,
}

/// A pool of a host as guestkey sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// The host.
    pub host: String,
    /// The pool.
    pub pool: String,
    /// Its mark, if managed.
    pub managed: Option<ManagedPool>,
    /// The pool's type ("dir"...).
    pub kind: String,
    /// Its target path.
    pub path: String,
    /// Its volumes, by name.
    pub volumes: Vec<PoolEntry>,
}

/// `s` as one word of a POSIX shell command line.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:@%+=,/-".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn names(host: &str, pool: &str) -> Result<(Name, Name), CoreError> {
    Ok((
        Name::parse("host name", host)?,
        Name::parse("pool name", pool)?,
    ))
}

/// What guestkey makes of each volume of `desc`, pool `pool` of `host`.
fn view(
    tx: &mut dyn Tx,
    host: &str,
    pool: &str,
    managed: Option<ManagedPool>,
    desc: PoolDescription,
) -> Result<PoolView, CoreError> {
    let guests: Vec<String> = tx.guests(Some(host))?.into_iter().map(|g| g.name).collect();
    let mut volumes = Vec::with_capacity(desc.volumes.len());
    let unreadable = desc.unreadable_domains.clone();
    for v in desc.volumes {
        // A decrypted volume is cleartext again, its name free.
        let known = tx
            .volume_named(&v.name)?
            .filter(|k| k.state != VolumeState::Decrypted);
        let capacity_bytes = match &v.image {
            Some(Ok(i)) => i.capacity_bytes,
            _ => 0,
        };
        let not = |why: String| Offer::NotOffered { why };
        let offer = match (&known, &v.image) {
            (Some(k), _) if k.host == host && k.pool == pool => Offer::Managed {
                id: k.id.clone(),
                state: k.state,
            },
            (Some(k), _) => not(format!(
                "the name {} is taken by the guestkey volume in pool {} of host {}: volume names are unique per server; clone it under another name (`virsh vol-clone --pool {pool} {} NEW`)",
                v.name, k.pool, k.host, shell_word(&v.name)
            )),
            (None, None) => not(format!(
                "libvirt sees format {:?}: guestkey encrypts qcow2 and raw volumes only",
                v.format
            )),
            (None, Some(Err(why))) => not(format!("qemu-img cannot read it: {why}")),
            (None, Some(Ok(i))) if i.encrypted => not(
                "encrypted by something other than guestkey (its key is not on this server): decrypt it with the tool that made it first".into(),
            ),
            (None, Some(Ok(i))) if i.backing => not(
                "it has a backing file or an external data file: make it self-contained first (`qemu-img convert`, or `virsh blockpull` while a guest runs)".into(),
            ),
            (None, Some(Ok(_))) if !v.base_of.is_empty() => not(format!(
                "it is the backing file of {}: encrypting it would break {}; make {} self-contained first (`qemu-img convert`)",
                v.base_of.join(", "),
                if v.base_of.len() == 1 { "that image" } else { "those images" },
                if v.base_of.len() == 1 { "it" } else { "them" },
            )),
            (None, Some(Ok(_))) if !unreadable.is_empty() => not(format!(
                "the host could not read the definition of domain {}, so whether it uses this volume is not known: fix or undefine it (`virsh dumpxml`)",
                unreadable.join(", ")
            )),
            (None, Some(Ok(_))) => encrypt_offer(host, pool, &v.name, &v.format, &v.used_by, &guests, managed.is_some()),
        };
        volumes.push(PoolEntry {
            name: v.name,
            path: v.path,
            format: v.format,
            capacity_bytes,
            used_by: v.used_by,
            offer,
        });
    }
    Ok(PoolView {
        host: host.to_owned(),
        pool: pool.to_owned(),
        managed,
        kind: desc.kind,
        path: desc.path,
        volumes,
    })
}

/// The command that encrypts cleartext volume `name`: `volume encrypt`, or
/// `guest adopt` of the one domain defined outside guestkey that uses it.
fn encrypt_offer(
    host: &str,
    pool: &str,
    name: &str,
    format: &str,
    used_by: &[VolumeUser],
    guests: &[String],
    offered: bool,
) -> Offer {
    if let Err(e) = Name::parse("volume name", name) {
        return Offer::NotOffered {
            why: format!("{e}; clone it under another name (`virsh vol-clone`)"),
        };
    }
    let running = used_by.iter().filter(|u| u.running).count();
    if running > 1 {
        return Offer::NotOffered {
            why: format!("{running} running guests share it: stop all but one first"),
        };
    }
    let outside: Vec<&VolumeUser> = used_by
        .iter()
        .filter(|u| !guests.contains(&u.domain))
        .collect();
    let (command, adopt) = match outside.as_slice() {
        [] => (
            format!(
                "guestkeyctl volume encrypt --host {} --pool {} --name {} --format {}",
                shell_word(host),
                shell_word(pool),
                shell_word(name),
                shell_word(format)
            ),
            None,
        ),
        [one] => (
            format!(
                "guestkeyctl guest adopt --host {} {}{}",
                shell_word(host),
                // A name that starts like an option.
                if one.domain.starts_with('-') {
                    "-- "
                } else {
                    ""
                },
                shell_word(&one.domain)
            ),
            Some(one.domain.clone()),
        ),
        more => {
            return Offer::NotOffered {
                why: format!(
                    "{} domains defined outside guestkey use it ({}): adopt them one at a time with `guestkeyctl guest adopt`, or remove the disk from all but one",
                    more.len(),
                    more.iter()
                        .map(|u| u.domain.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
    };
    Offer::Cleartext {
        offered,
        command,
        adopt,
    }
}

impl Core {
    /// Pool `pool` of `host` as the host describes it, the names checked.
    async fn described_pool(
        self: &Arc<Self>,
        host: &str,
        pool: &str,
    ) -> Result<(Name, Name, PoolDescription), CoreError> {
        let (host_name, pool_name) = names(host, pool)?;
        let h = host_name.to_string();
        let enrolled = self.blocking(move |c| c.enrolled_host(&h)).await?;
        let desc = self
            .agents
            .describe_pool(&enrolled, pool_name.as_str())
            .await
            .map_err(|e| described(host, e))?;
        Ok((host_name, pool_name, desc))
    }

    /// Marks pool `pool` of `host` managed once the host shows it active.
    /// Marking a managed pool again returns its mark.
    pub async fn manage_pool(
        self: &Arc<Self>,
        caller: Caller,
        host: String,
        pool: String,
    ) -> Result<ManagedPool, CoreError> {
        let (host_name, pool_name, desc) = self.described_pool(&host, &pool).await?;
        self.blocking(move |c| {
            c.write(|tx| {
                if let Some(m) = tx.managed_pool(host_name.as_str(), pool_name.as_str())? {
                    return Ok(m);
                }
                let m = ManagedPool {
                    host: host_name.to_string(),
                    pool: pool_name.to_string(),
                    since: crate::domain::now_unix(),
                    by: caller.actor(),
                };
                tx.manage_pool(&m)?;
                let shown = view(tx, &m.host, &m.pool, Some(m.clone()), desc)?;
                let offered = shown
                    .volumes
                    .iter()
                    .filter(|v| matches!(v.offer, Offer::Cleartext { .. }))
                    .count();
                c.log(
                    tx,
                    &m.by,
                    "pool.managed",
                    &format!("{}/{}", m.host, m.pool),
                    &format!(
                        "{} volumes, {offered} cleartext ones offered for encryption",
                        shown.volumes.len()
                    ),
                )?;
                Ok(m)
            })
        })
        .await
    }

    /// Unmarks pool `pool` of `host` (its volumes stay as they are).
    pub fn unmanage_pool(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
    ) -> Result<ManagedPool, CoreError> {
        let (host, pool) = names(host, pool)?;
        self.write(|tx| {
            let m = tx
                .managed_pool(host.as_str(), pool.as_str())?
                .ok_or_else(|| {
                    CoreError::NotFound(format!(
                        "pool {pool} of host {host} is not managed (see `guestkeyctl pool list`)"
                    ))
                })?;
            tx.unmanage_pool(host.as_str(), pool.as_str())?;
            self.log(
                tx,
                &caller.actor(),
                "pool.unmanaged",
                &format!("{host}/{pool}"),
                "its volumes stay as they are",
            )?;
            Ok(m)
        })
    }

    /// Managed pools, optionally of one host.
    pub fn list_managed_pools(&self, host: Option<&str>) -> Result<Vec<ManagedPool>, CoreError> {
        let host = host.map(|h| Name::parse("host name", h)).transpose()?;
        self.read(|tx| Ok(tx.managed_pools(host.as_ref().map(Name::as_str))?))
    }

    /// Pool `pool` of `host` as its host sees it now, each volume with what
    /// guestkey makes of it.
    pub async fn describe_pool(
        self: &Arc<Self>,
        host: String,
        pool: String,
    ) -> Result<PoolView, CoreError> {
        let (host_name, pool_name, desc) = self.described_pool(&host, &pool).await?;
        self.blocking(move |c| {
            c.read(|tx| {
                let managed = tx.managed_pool(host_name.as_str(), pool_name.as_str())?;
                view(tx, host_name.as_str(), pool_name.as_str(), managed, desc)
            })
        })
        .await
    }
}
