//! guestkey libvirt plugin: the logic of `guestkey-hook`, the libvirt qemu
//! hook. It never calls libvirt (libvirt's documentation forbids hooks to);
//! it asks guestkeyd, over its root-only Unix socket, to load or unload the
//! secrets of a domain's encrypted disks, and turns guestkeyd's answer into
//! an exit status and a message the `virsh` user reads.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub mod protocol;

use protocol::{Disk, Op, Request, Source};

/// Where guestkeyd listens.
pub const DEFAULT_SOCKET: &str = "/run/guestkey/hook.sock";
/// Secret UUIDs that guestkeyd manages, one per line, kept by guestkeyd so
/// that the hook can tell, when guestkeyd does not answer, whether a domain
/// needs it.
pub const DEFAULT_MANAGED_LIST: &str = "/var/lib/guestkey/managed-secrets";
/// Where the guestkeyd serving the libvirtd that runs this hook as `uid`
/// listens, and where it keeps its managed list: the system daemon (root)
/// uses the defaults; a session daemon's user gets `hook-UID.sock` and
/// `managed-secrets-UID` in /run/guestkey (`guestkeyd run --hook-uid UID`).
pub fn paths_for_uid(uid: u32) -> (std::path::PathBuf, std::path::PathBuf) {
    if uid == 0 {
        (DEFAULT_SOCKET.into(), DEFAULT_MANAGED_LIST.into())
    } else {
        (
            format!("/run/guestkey/hook-{uid}.sock").into(),
            format!("/run/guestkey/managed-secrets-{uid}").into(),
        )
    }
}

/// Longest wait for guestkeyd's answer (it bounds its own work at 30 s).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// What the domain XML says that the hook needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DomainInfo {
    /// `<uuid>` (canonical).
    pub uuid: String,
    /// The encrypted disks (and encrypted backing layers), one per secret.
    pub disks: Vec<Disk>,
}

impl DomainInfo {
    /// The secret UUIDs the disks name.
    pub fn secrets(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.secret.clone()).collect()
    }
}

/// Reads the domain UUID and the disks' encryption secrets with the strict
/// reader the server and guestkeyd use (`guestkey-domxml`).
pub fn parse_domain(xml: &str) -> Result<DomainInfo, String> {
    use guestkey_domxml::DiskSource as S;
    let dom = guestkey_domxml::parse(xml).map_err(|e| e.to_string())?;
    let uuid = dom.identity().map_err(|e| e.to_string())?.uuid;
    let mut disks: Vec<Disk> = vec![];
    for d in dom.disk_secrets() {
        if disks.iter().any(|x| x.secret == d.secret_uuid) {
            continue;
        }
        let source = match d.source {
            S::File(p) | S::Block(p) => Source::Path(p.clone()),
            S::Volume { pool, volume } => Source::Volume {
                pool: pool.clone(),
                volume: volume.clone(),
            },
            _ => Source::Unknown,
        };
        disks.push(Disk {
            secret: d.secret_uuid.to_owned(),
            target: d.target.to_owned(),
            source,
        });
    }
    disks.sort_by(|a, b| a.secret.cmp(&b.secret));
    Ok(DomainInfo { uuid, disks })
}

/// Sends one request and returns guestkeyd's answer line.
pub fn ask(socket: &Path, request: &str) -> Result<String, std::io::Error> {
    let mut s = UnixStream::connect(socket)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    s.write_all(request.as_bytes())?;
    s.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// The hook's decision for one invocation: exit status and message.
pub fn run(
    domain_name: &str,
    operation: &str,
    xml: &str,
    socket: &Path,
    managed_list: &Path,
) -> (i32, Option<String>) {
    let op = match operation {
        "prepare" => Op::Prepare,
        // QEMU holds what it needs once it started; on release the start
        // may have failed: either way the secrets go.
        "started" | "release" => Op::Release,
        _ => return (0, None),
    };
    let info = match parse_domain(xml) {
        Ok(i) => i,
        // XML libvirt could read another way: refused where it matters,
        // for a domain that names one of guestkey's secrets.
        Err(e) if op == Op::Prepare && names_managed_secret(xml, managed_list) => {
            return (1, Some(format!("guestkey: domain {domain_name}: {e}")));
        }
        Err(_) => return (0, None),
    };
    let request = Request {
        op,
        domain: info.uuid.clone(),
        disks: info.disks.clone(),
    }
    .line();
    match ask(socket, &request) {
        Ok(answer) if answer == "ok" => (0, None),
        Ok(answer) => {
            let msg = answer.strip_prefix("error ").unwrap_or(&answer);
            let status = if op == Op::Prepare { 1 } else { 0 };
            (
                status,
                Some(format!("guestkey: domain {domain_name}: {msg}")),
            )
        }
        Err(e) if op == Op::Prepare && uses_managed_secret(&info, managed_list) => (
            1,
            Some(format!(
                "guestkey: domain {domain_name} has disks encrypted by guestkey, but guestkeyd does not answer on {} ({e}): start guestkeyd",
                socket.display()
            )),
        ),
        // Not guestkey's guest (or not a start): libvirt carries on.
        Err(_) => (0, None),
    }
}

/// The secret UUIDs guestkeyd manages (empty if the list cannot be read).
fn managed(managed_list: &Path) -> Vec<String> {
    std::fs::read_to_string(managed_list)
        .map(|l| {
            l.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether any of the domain's disk secrets is one guestkeyd manages.
fn uses_managed_secret(info: &DomainInfo, managed_list: &Path) -> bool {
    let m = managed(managed_list);
    info.disks.iter().any(|d| m.contains(&d.secret))
}

/// Whether XML that did not parse names one of guestkeyd's secrets anywhere.
fn names_managed_secret(xml: &str, managed_list: &Path) -> bool {
    let lower = xml.to_ascii_lowercase();
    managed(managed_list)
        .iter()
        .any(|s| lower.contains(s.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_uuid_and_disk_secrets_only() {
        let xml = "<domain><name>g</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><devices>
            <disk type='file'><source file='/a'/><target dev='vda'/><encryption format='luks'><secret type='passphrase' uuid='aaaaaaaa-0000-0000-0000-000000000001'/></encryption></disk>
            <disk type='volume'><source pool='p' volume='v'><encryption format='luks'><secret type='passphrase' uuid='aaaaaaaa-0000-0000-0000-000000000002'/></encryption></source><target dev='vdb'/></disk>
            <disk type='file'><source file='/c'/><target dev='vdc'/></disk>
            <hostdev><source><secret uuid='bbbbbbbb-0000-0000-0000-000000000000'/></source></hostdev>
          </devices></domain>";
        let i = parse_domain(xml).unwrap();
        assert_eq!(i.uuid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
        assert_eq!(
            i.disks,
            vec![
                Disk {
                    secret: "aaaaaaaa-0000-0000-0000-000000000001".into(),
                    target: "vda".into(),
                    source: Source::Path("/a".into())
                },
                Disk {
                    secret: "aaaaaaaa-0000-0000-0000-000000000002".into(),
                    target: "vdb".into(),
                    source: Source::Volume {
                        pool: "p".into(),
                        volume: "v".into()
                    }
                },
            ]
        );
        assert!(parse_domain("<domain><name>x</name></domain>").is_err());
        // libvirt would read the first <uuid>, we would not know which.
        let two = "<domain><name>x</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca428</uuid></domain>";
        assert!(parse_domain(two).is_err());
    }

    #[test]
    fn without_guestkeyd_only_guests_with_managed_disks_are_refused() {
        let missing = Path::new("/nonexistent/guestkey.sock");
        let list = std::env::temp_dir().join(format!("gk-managed-{}", std::process::id()));
        std::fs::write(&list, "aaaaaaaa-0000-0000-0000-000000000001\n").unwrap();
        let plain =
            "<domain><name>p</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid></domain>";
        assert_eq!(run("p", "prepare", plain, missing, &list), (0, None));
        let enc = |secret: &str| {
            format!(
                "<domain><name>e</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><devices><disk type='file'><source file='/x'/><target dev='vda'/><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption></disk></devices></domain>"
            )
        };
        let managed = enc("aaaaaaaa-0000-0000-0000-000000000001");
        let (code, msg) = run("e", "prepare", &managed, missing, &list);
        assert_eq!(code, 1);
        assert!(msg.unwrap().contains("guestkeyd does not answer"));
        assert_eq!(run("e", "started", &managed, missing, &list), (0, None));
        assert_eq!(run("e", "stopped", &managed, missing, &list), (0, None));
        // An encrypted disk whose secret the operator manages: not ours.
        let own = enc("cccccccc-0000-0000-0000-000000000009");
        assert_eq!(run("o", "prepare", &own, missing, &list), (0, None));
        // XML that libvirt could read two ways: refused for a guestkey
        // guest, left to libvirt for any other.
        let ambiguous = managed.replace(
            "<target dev='vda'/>",
            "<target dev='vda'/><target dev='vdb'/>",
        );
        let (code, msg) = run("e", "prepare", &ambiguous, missing, &list);
        assert_eq!(code, 1, "{msg:?}");
        let other = own.replace(
            "<target dev='vda'/>",
            "<target dev='vda'/><target dev='vdb'/>",
        );
        assert_eq!(run("o", "prepare", &other, missing, &list), (0, None));
        std::fs::remove_file(list).unwrap();
    }
}
