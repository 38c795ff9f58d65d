//! `guest adopt`: a guest that already exists in a host's libvirt (made by
//! virt-manager, virt-install or `virsh define`) comes under guestkey. The
//! host describes the domain ([`AgentClient::describe_domain`], which
//! changes nothing); every disk is checked before anything changes (a
//! refusal names the disk and what to do, and leaves all as it was); then
//! each cleartext disk is encrypted through `volume encrypt` (offline, or
//! online when the guest runs), and the guest is defined through guestkey
//! from the host's definition, so its disks get their `<encryption>` and
//! its host their keys.
//!
//! A failure after the first encryption (host unreachable, say) leaves the
//! disks encrypted so far as managed volumes; `guest adopt` again takes
//! them as they are and finishes.
//!
//! [`AgentClient::describe_domain`]: super::agent::AgentClient::describe_domain

use std::sync::Arc;
use std::time::Duration;

use crate::domain::Core;
use crate::domain::agent::{AgentError, AgentErrorKind, DiskPlace, DomainDescription, ImagePlace};
use crate::domain::guests::managed_volume;
use crate::domxml::{self, DiskSource};
use crate::model::{Caller, CoreError, GuestInfo, InvalidInput, Name, VolumeFormat};
use crate::store::Tx;

/// How long `adopt` waits for the host to take the new definition.
const DEFINE_WAIT: Duration = Duration::from_secs(60);

/// A cleartext disk to encrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToEncrypt {
    /// `<target dev>`.
    pub target: String,
    /// Its pool on the host.
    pub pool: String,
    /// Its volume name there (and the guestkey volume's name).
    pub volume: String,
    /// Its container format.
    pub format: VolumeFormat,
}

/// What adoption does to each disk, decided before anything changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Cleartext disks to encrypt.
    pub encrypt: Vec<ToEncrypt>,
    /// Disks on guestkey volumes already (target, volume name).
    pub managed: Vec<(String, String)>,
    /// Disks left as they are (target, why).
    pub left: Vec<(String, String)>,
}

/// What `guest adopt` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// The guest, as `guest show` has it now.
    pub guest: GuestInfo,
    /// Volumes encrypted now (names).
    pub encrypted: Vec<String>,
    /// Disks found on guestkey volumes already (volume names).
    pub already_managed: Vec<String>,
    /// Disks left cleartext (target, why).
    pub left: Vec<(String, String)>,
}

fn refuse(dom_name: &str, target: &str, line: usize, why: String) -> CoreError {
    CoreError::FailedPrecondition(format!(
        "guest {dom_name}: disk {target} (line {line} of its definition): {why}; nothing was changed"
    ))
}

fn skip_hint(target: &str) -> String {
    format!("or leave it cleartext with --skip {target}")
}

/// The host name, the domain's name or UUID, and the `--skip` targets, as
/// the admin gave them.
fn check_request(host: &str, domain: &str, skip: &[String]) -> Result<Name, CoreError> {
    let host = Name::parse("host name", host)?;
    let bad = |why: &str| InvalidInput {
        what: "domain",
        value: domain.to_owned(),
        why: why.to_owned(),
    };
    if domain.is_empty() {
        return Err(bad("give the name or UUID that `virsh list --all` shows on the host").into());
    }
    if domain.len() > 255 || domain.chars().any(char::is_control) {
        return Err(
            bad("a libvirt domain name has at most 255 bytes and no control characters").into(),
        );
    }
    for t in skip {
        if t.is_empty() || t.len() > 32 || !t.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(InvalidInput {
                what: "--skip",
                value: t.clone(),
                why: "give a disk's target dev, e.g. vdb".into(),
            }
            .into());
        }
    }
    Ok(host)
}

/// Decides, for each disk of `desc`, whether it is encrypted, already
/// managed or left; refuses (naming the disk and what to do) when one
/// cannot be handled. Reads only.
pub fn plan(
    tx: &mut dyn Tx,
    host: &Name,
    desc: &DomainDescription,
    skip: &[String],
) -> Result<Plan, CoreError> {
    let dom = domxml::parse(&desc.xml)
        .map_err(|e| CoreError::Xml(format!("the host's definition of the domain: {e}")))?;
    let name = dom.name.as_str();
    if desc.security_info_withheld {
        return Err(CoreError::FailedPrecondition(format!(
            "guest {name} has settings libvirt shows only with --security-info (a graphics or console password): guestkey never carries them off the host, and a definition rewritten without them would lose them; remove them (`virsh edit {name}`), adopt the guest, then set them again; nothing was changed"
        )));
    }
    let uuid = desc.uuid.to_ascii_lowercase();
    if tx.live_guest_conflicts(&uuid, host.as_str(), name)? {
        return Err(CoreError::AlreadyExists(format!(
            "guest {name} (UUID {uuid}) on host {host} is already under guestkey: see `guestkeyctl guest show {uuid}`"
        )));
    }
    for t in skip {
        if !dom.disks.iter().any(|d| &d.target == t) {
            let all: Vec<&str> = dom.disks.iter().map(|d| d.target.as_str()).collect();
            return Err(InvalidInput {
                what: "--skip",
                value: t.clone(),
                why: format!(
                    "guest {name} has no disk {t}: its disks are {}",
                    all.join(", ")
                ),
            }
            .into());
        }
    }
    let mut p = Plan::default();
    for disk in &dom.disks {
        let t = disk.target.as_str();
        if !matches!(disk.device.as_str(), "disk" | "lun") {
            continue;
        }
        if skip.iter().any(|s| s == t) {
            p.left.push((t.to_owned(), "left out with --skip".into()));
            continue;
        }
        if disk.source == DiskSource::Other {
            continue;
        }
        // A guestkey volume already (an earlier adoption that stopped half
        // way, or a disk made with `volume create`).
        let bad = |e: CoreError| match e {
            CoreError::Invalid(i) => refuse(name, t, disk.line, i.why),
            e => e,
        };
        if let Some(v) = managed_volume(tx, disk, host).map_err(bad)? {
            p.managed.push((t.to_owned(), v.name));
            continue;
        }
        if disk.readonly {
            p.left.push((t.to_owned(), "read-only".into()));
            continue;
        }
        if let DiskSource::Network { .. } | DiskSource::Block(_) = &disk.source {
            return Err(refuse(
                name,
                t,
                disk.line,
                format!(
                    "its source is {}: guestkey encrypts images in directory storage pools; move it into one {}",
                    disk.source,
                    skip_hint(t)
                ),
            ));
        }
        if let Some(e) = &disk.encryption {
            let secret = e.secret_uuid().unwrap_or("none");
            return Err(refuse(
                name,
                t,
                disk.line,
                format!(
                    "it is encrypted already, with libvirt secret {secret}, which guestkey does not hold: guestkey adopts cleartext disks {}",
                    skip_hint(t)
                ),
            ));
        }
        let Some(place) = desc.disks.iter().find(|d| d.target == t) else {
            return Err(refuse(
                name,
                t,
                disk.line,
                "the host did not describe it (the definition changed meanwhile?): try again"
                    .into(),
            ));
        };
        p.encrypt
            .push(cleartext_disk(tx, name, disk, place, &p.encrypt)?);
    }
    if p.encrypt.is_empty() && p.managed.is_empty() {
        return Err(CoreError::FailedPrecondition(format!(
            "guest {name} has no disk guestkey can encrypt (disks, not CD-ROMs, on images in a directory pool); nothing was changed"
        )));
    }
    Ok(p)
}

/// The encryption of a cleartext disk, or why it cannot be done.
fn cleartext_disk(
    tx: &mut dyn Tx,
    name: &str,
    disk: &domxml::Disk,
    place: &DiskPlace,
    planned: &[ToEncrypt],
) -> Result<ToEncrypt, CoreError> {
    let (t, line, path) = (disk.target.as_str(), disk.line, place.path.as_str());
    let no = |why: String| Err(refuse(name, t, line, why));
    let (pool, volume) = match &place.place {
        ImagePlace::InPool { pool, volume } => (pool, volume),
        ImagePlace::Missing => return no(format!("there is no image at {path} on its host")),
        ImagePlace::OtherFormat => {
            return no(format!(
                "its driver type is {}: guestkey encrypts qcow2 and raw images; convert it (qemu-img convert -O qcow2) {}",
                disk.format.as_deref().unwrap_or("?"),
                skip_hint(t)
            ));
        }
        ImagePlace::NotInPool => {
            let dir = std::path::Path::new(path)
                .parent()
                .map_or_else(|| "DIR".into(), |d| d.display().to_string());
            return no(format!(
                "its image {path} is in no active libvirt storage pool: make its directory one (`virsh pool-define-as NAME dir --target {dir}; virsh pool-start NAME`) {}",
                skip_hint(t)
            ));
        }
    };
    if place.encrypted {
        return no(format!(
            "its image {path} is encrypted, but its definition names no secret: guestkey adopts cleartext disks {}",
            skip_hint(t)
        ));
    }
    if place.backing {
        return no(format!(
            "its image {path} has a backing file: flatten it first (`virsh blockpull` while it runs, or `qemu-img convert`) {}",
            skip_hint(t)
        ));
    }
    let as_name = |what: &'static str, v: &str| {
        Name::parse(what, v).map_err(|e| {
            refuse(
                name,
                t,
                line,
                format!(
                    "its {what} {v:?} cannot be a guestkey name ({}): rename it (`virsh vol-clone`) {}",
                    e.why,
                    skip_hint(t)
                ),
            )
        })
    };
    as_name("pool name", pool)?;
    as_name("volume name", volume)?;
    if tx.volume_name_taken(volume)? || planned.iter().any(|o| &o.volume == volume) {
        return no(format!(
            "a guestkey volume named {volume} exists already (volume names are unique per server): give the image another name (`virsh vol-clone`) {}",
            skip_hint(t)
        ));
    }
    let format = match disk.format.as_deref() {
        Some("qcow2") => VolumeFormat::Qcow2,
        _ => VolumeFormat::Raw,
    };
    Ok(ToEncrypt {
        target: t.to_owned(),
        pool: pool.clone(),
        volume: volume.clone(),
        format,
    })
}

/// A host's answer to a describe call that failed, as the admin sees it.
pub(crate) fn described(host: &str, e: AgentError) -> CoreError {
    match e.kind {
        AgentErrorKind::Unreachable => CoreError::FailedPrecondition(format!(
            "host {host} does not answer ({}): nothing was changed; try again when it does",
            e.message
        )),
        _ => CoreError::FailedPrecondition(e.message),
    }
}

impl Core {
    /// Brings the guest `domain` (name or UUID) of `host`'s libvirt under
    /// guestkey; `skip` names disks (target devs) left cleartext.
    pub async fn adopt_guest(
        self: &Arc<Self>,
        caller: Caller,
        host: String,
        domain: String,
        skip: Vec<String>,
    ) -> Result<Adoption, CoreError> {
        let host_name = check_request(&host, &domain, &skip)?;
        let h = host.clone();
        let enrolled = self.blocking(move |c| c.enrolled_host(&h)).await?;
        let desc = self
            .agents
            .describe_domain(&enrolled, &domain)
            .await
            .map_err(|e| described(&host, e))?;
        let (d2, s2, n2) = (desc.clone(), skip.clone(), host_name.clone());
        let plan = self
            .blocking(move |c| c.read(|tx| plan(tx, &n2, &d2, &s2)))
            .await?;
        let mut encrypted = Vec::new();
        for d in &plan.encrypt {
            let done = self
                .encrypt_volume(
                    caller.clone(),
                    host.clone(),
                    d.pool.clone(),
                    d.volume.clone(),
                    d.format,
                )
                .await;
            if let Err(e) = done {
                let so_far = if encrypted.is_empty() {
                    "no disk was encrypted".to_owned()
                } else {
                    format!(
                        "encrypted so far: {} (guestkey volumes now; the guest does not start until its adoption is finished)",
                        encrypted.join(", ")
                    )
                };
                return Err(CoreError::FailedPrecondition(format!(
                    "disk {}: {e}; {so_far}; run `guestkeyctl guest adopt --host {host} {domain}` again to finish",
                    d.target
                )));
            }
            encrypted.push(d.volume.clone());
        }
        // An online encryption changed the definition (libvirt records the
        // disk's secret at the pivot): define from what libvirt has now.
        let desc = if encrypted.is_empty() {
            desc
        } else {
            let now = self
                .agents
                .describe_domain(&enrolled, &desc.uuid)
                .await
                .map_err(|e| described(&host, e))?;
            if now.uuid != desc.uuid {
                return Err(CoreError::FailedPrecondition(format!(
                    "the domain {domain} changed on host {host} during its adoption: run `guestkeyctl guest adopt` again"
                )));
            }
            now
        };
        let (c2, h2, xml) = (caller.clone(), host.clone(), desc.xml.clone());
        let g = self
            .blocking(move |c| c.define_guest(&c2, &h2, &xml))
            .await?;
        let detail = format!(
            "guest {} on host {host}: encrypted {}; already managed {}; left cleartext {}",
            g.name,
            list(&encrypted),
            list(&plan.managed.iter().map(|m| m.1.clone()).collect::<Vec<_>>()),
            list(
                &plan
                    .left
                    .iter()
                    .map(|l| format!("{} ({})", l.0, l.1))
                    .collect::<Vec<_>>()
            ),
        );
        let (uuid, actor) = (g.uuid.clone(), caller.actor());
        self.blocking(move |c| c.write(|tx| c.log(tx, &actor, "guest.adopted", &uuid, &detail)))
            .await?;
        let guest = self.define_settled(&g.uuid).await?;
        Ok(Adoption {
            guest,
            encrypted,
            already_managed: plan.managed.into_iter().map(|m| m.1).collect(),
            left: plan.left,
        })
    }

    /// The guest once its host has taken its definition, or as it is after
    /// [`DEFINE_WAIT`] (still pending: the pusher goes on retrying).
    async fn define_settled(self: &Arc<Self>, uuid: &str) -> Result<GuestInfo, CoreError> {
        let until = tokio::time::Instant::now() + DEFINE_WAIT;
        loop {
            let u = uuid.to_owned();
            let g = self.blocking(move |c| c.get_guest(&u)).await?;
            if g.pending.is_none() || tokio::time::Instant::now() >= until {
                return Ok(g);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
