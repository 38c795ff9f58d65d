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
    /// `<uuid>`.
    pub uuid: String,
    /// Secret UUIDs named by `<encryption>` elements of disks.
    pub secrets: Vec<String>,
}

/// Reads the domain UUID and the disks' encryption secret UUIDs.
pub fn parse_domain(xml: &str) -> Result<DomainInfo, String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<String> = vec![];
    let mut info = DomainInfo::default();
    loop {
        let ev = r.read_event().map_err(|e| format!("domain XML: {e}"))?;
        match &ev {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.name().0.to_owned();
                if name == "secret"
                    && stack.iter().any(|s| s == "encryption")
                    && stack.iter().any(|s| s == "disk")
                {
                    for a in e.attributes().flatten() {
                        if a.key.0 == "uuid" {
                            info.secrets.push(a.value.to_ascii_lowercase());
                        }
                    }
                }
                if matches!(ev, Event::Start(_)) {
                    stack.push(name);
                }
            }
            Event::End(_) => {
                stack.pop();
            }
            Event::Text(t) if stack.len() == 2 && stack[1] == "uuid" => {
                info.uuid = t.xml10_content().trim().to_ascii_lowercase();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if uuid::Uuid::parse_str(&info.uuid).is_err() {
        return Err("the domain XML has no valid <uuid>".into());
    }
    info.secrets.retain(|s| uuid::Uuid::parse_str(s).is_ok());
    info.secrets.sort();
    info.secrets.dedup();
    Ok(info)
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
        "prepare" => "prepare",
        // QEMU holds what it needs once it started; on release the start
        // may have failed: either way the secrets go.
        "started" | "release" => "release",
        _ => return (0, None),
    };
    let info = match parse_domain(xml) {
        Ok(i) => i,
        Err(e) if op == "prepare" => {
            return (1, Some(format!("guestkey: domain {domain_name}: {e}")));
        }
        Err(_) => return (0, None),
    };
    let request = std::iter::once(format!("{op} {}", info.uuid))
        .chain(info.secrets.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    match ask(socket, &request) {
        Ok(answer) if answer == "ok" => (0, None),
        Ok(answer) => {
            let msg = answer.strip_prefix("error ").unwrap_or(&answer);
            let status = if op == "prepare" { 1 } else { 0 };
            (
                status,
                Some(format!("guestkey: domain {domain_name}: {msg}")),
            )
        }
        Err(e) if op == "prepare" && uses_managed_secret(&info, managed_list) => (
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

/// Whether any of the domain's disk secrets is one guestkeyd manages.
fn uses_managed_secret(info: &DomainInfo, managed_list: &Path) -> bool {
    let Ok(list) = std::fs::read_to_string(managed_list) else {
        return false;
    };
    list.lines()
        .map(str::trim)
        .any(|l| info.secrets.iter().any(|s| s == l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_uuid_and_disk_secrets_only() {
        let xml = "<domain><name>g</name><uuid>1B4E28BA-2FA1-11D2-883F-0016D3CCA427</uuid><devices>
            <disk type='file'><source file='/a'/><encryption format='luks'><secret type='passphrase' uuid='aaaaaaaa-0000-0000-0000-000000000001'/></encryption></disk>
            <disk type='file'><source file='/b'><encryption format='luks'><secret type='passphrase' uuid='aaaaaaaa-0000-0000-0000-000000000002'/></encryption></source></disk>
            <disk type='file'><source file='/c'/></disk>
            <hostdev><source><secret uuid='bbbbbbbb-0000-0000-0000-000000000000'/></source></hostdev>
          </devices></domain>";
        let i = parse_domain(xml).unwrap();
        assert_eq!(i.uuid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
        assert_eq!(
            i.secrets,
            vec![
                "aaaaaaaa-0000-0000-0000-000000000001",
                "aaaaaaaa-0000-0000-0000-000000000002"
            ]
        );
        assert!(parse_domain("<domain><name>x</name></domain>").is_err());
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
                "<domain><name>e</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><devices><disk><encryption><secret uuid='{secret}'/></encryption></disk></devices></domain>"
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
        std::fs::remove_file(list).unwrap();
    }
}
