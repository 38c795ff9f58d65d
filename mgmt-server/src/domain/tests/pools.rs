//! Managed pools against fake hosts: what each kind of volume is shown as
//! (a guestkey volume, cleartext and offered with the command that
//! encrypts it, or why not), marking and unmarking (audited, repeatable),
//! and every bad request refused with nothing changed. The whole flow runs
//! on the real libvirtd and guestkeyd in tests/tests/adoption.rs.

use super::Bed;
use crate::domain::agent::{PoolDescription, PoolImage, PoolVolume, VolumeUser};
use crate::domain::pools::{Offer, PoolView};
use crate::model::CoreError;

fn image(encrypted: bool, backing: bool) -> Option<Result<PoolImage, String>> {
    Some(Ok(PoolImage {
        encrypted,
        backing,
        capacity_bytes: 1 << 20,
    }))
}

fn vol(
    name: &str,
    format: &str,
    image: Option<Result<PoolImage, String>>,
    used_by: &[(&str, bool)],
) -> PoolVolume {
    PoolVolume {
        name: name.into(),
        path: format!("/pools/default/{name}"),
        format: format.into(),
        image,
        used_by: used_by
            .iter()
            .map(|(d, running)| VolumeUser {
                domain: (*d).into(),
                running: *running,
            })
            .collect(),
        base_of: vec![],
    }
}

fn offer<'a>(v: &'a PoolView, name: &str) -> &'a Offer {
    &v.volumes
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} not listed: {v:?}"))
        .offer
}

fn why(o: &Offer) -> &str {
    match o {
        Offer::NotOffered { why } => why,
        other => panic!("offered: {other:?}"),
    }
}

#[tokio::test]
async fn each_volume_of_a_pool_is_shown_for_what_it_is() {
    let b = Bed::new();
    b.host("h1");
    b.host("h2");
    let disk = b.volume("h1", "disk").await;
    b.volume("h2", "taken").await;
    b.guest("h1", "managed-vm", &["disk"]).await;
    b.agents.set_pool(
        "h1",
        "default",
        PoolDescription {
            kind: "dir".into(),
            path: "/pools/default".into(),
            volumes: vec![
                vol(
                    "disk",
                    "qcow2",
                    image(true, false),
                    &[("managed-vm", false)],
                ),
                vol("clear.qcow2", "qcow2", image(false, false), &[]),
                vol(
                    "under-managed",
                    "raw",
                    image(false, false),
                    &[("managed-vm", true)],
                ),
                vol("web.img", "raw", image(false, false), &[("web vm", true)]),
                vol(
                    "shared.img",
                    "raw",
                    image(false, false),
                    &[("a", false), ("b", false)],
                ),
                vol(
                    "busy.img",
                    "raw",
                    image(false, false),
                    &[("a", true), ("managed-vm", true)],
                ),
                vol("luks.img", "raw", image(true, false), &[]),
                vol("child.qcow2", "qcow2", image(false, true), &[]),
                vol("cd.iso", "iso", None, &[]),
                vol(
                    "broken.qcow2",
                    "qcow2",
                    Some(Err("not a qcow2 image".into())),
                    &[],
                ),
                vol("-odd", "raw", image(false, false), &[]),
                vol("taken", "raw", image(false, false), &[]),
                PoolVolume {
                    base_of: vec!["child.qcow2".into()],
                    ..vol("base.qcow2", "qcow2", image(false, false), &[])
                },
                vol(
                    "odd-vm.img",
                    "raw",
                    image(false, false),
                    &[("-odd-vm", false)],
                ),
            ],
            unreadable_domains: vec![],
        },
    );

    let v = b
        .core
        .describe_pool("h1".into(), "default".into())
        .await
        .unwrap();
    assert_eq!(v.managed, None);
    assert_eq!(
        offer(&v, "disk"),
        &Offer::Managed {
            id: disk.id.clone(),
            state: disk.state
        }
    );
    // Not managed: cleartext volumes are shown, not offered.
    assert!(
        matches!(
            offer(&v, "clear.qcow2"),
            Offer::Cleartext { offered: false, .. }
        ),
        "{v:?}"
    );

    let m = b
        .core
        .manage_pool(b.admin.clone(), "h1".into(), "default".into())
        .await
        .unwrap();
    assert_eq!((m.host.as_str(), m.pool.as_str()), ("h1", "default"));
    assert_eq!(m.by, "admin:admin");
    let v = b
        .core
        .describe_pool("h1".into(), "default".into())
        .await
        .unwrap();
    assert_eq!(v.managed.as_ref(), Some(&m));
    assert_eq!(
        offer(&v, "clear.qcow2"),
        &Offer::Cleartext {
            offered: true,
            command: "guestkeyctl volume encrypt --host h1 --pool default --name clear.qcow2 --format qcow2".into(),
            adopt: None,
        }
    );
    // A guest defined through guestkey is redefined by `volume encrypt`.
    assert!(
        matches!(
            offer(&v, "under-managed"),
            Offer::Cleartext { adopt: None, .. }
        ),
        "{v:?}"
    );
    // A guest defined outside guestkey is adopted, disks and all.
    assert_eq!(
        offer(&v, "web.img"),
        &Offer::Cleartext {
            offered: true,
            command: "guestkeyctl guest adopt --host h1 'web vm'".into(),
            adopt: Some("web vm".into()),
        }
    );
    let cases = [
        (
            "shared.img",
            "2 domains defined outside guestkey use it (a, b)",
        ),
        ("busy.img", "2 running guests share it"),
        ("luks.img", "encrypted by something other than guestkey"),
        ("child.qcow2", "it has a backing file"),
        ("cd.iso", "libvirt sees format \"iso\""),
        ("broken.qcow2", "qemu-img cannot read it: not a qcow2 image"),
        ("-odd", "vol-clone"),
        (
            "taken",
            "taken by the guestkey volume in pool default of host h2",
        ),
        ("base.qcow2", "it is the backing file of child.qcow2"),
    ];
    for (name, says) in cases {
        let w = why(offer(&v, name));
        assert!(w.contains(says), "{name}: {w}");
    }
    // A domain name that starts like an option comes after `--`.
    assert!(
        matches!(offer(&v, "odd-vm.img"), Offer::Cleartext { command, .. } if command.ends_with("adopt --host h1 -- -odd-vm")),
        "{v:?}"
    );

    // A domain the host could not read: nothing is offered on a guess.
    b.agents.set_pool(
        "h1",
        "other",
        PoolDescription {
            kind: "dir".into(),
            path: "/pools/other".into(),
            volumes: vec![vol("free.img", "raw", image(false, false), &[])],
            unreadable_domains: vec!["broken-vm".into()],
        },
    );
    let o = b
        .core
        .describe_pool("h1".into(), "other".into())
        .await
        .unwrap();
    assert!(
        why(offer(&o, "free.img")).contains("definition of domain broken-vm"),
        "{o:?}"
    );

    // Marking again returns the mark and records nothing more.
    let again = b
        .core
        .manage_pool(b.admin.clone(), "h1".into(), "default".into())
        .await
        .unwrap();
    assert_eq!(again, m);
    let managed: Vec<String> = b
        .actions()
        .into_iter()
        .filter(|a| a.starts_with("pool."))
        .collect();
    assert_eq!(managed, ["pool.managed"]);
    assert_eq!(b.core.list_managed_pools(None).unwrap(), vec![m.clone()]);
    assert_eq!(
        b.core.list_managed_pools(Some("h1")).unwrap(),
        vec![m.clone()]
    );
    assert!(b.core.list_managed_pools(Some("h2")).unwrap().is_empty());

    let gone = b.core.unmanage_pool(&b.admin, "h1", "default").unwrap();
    assert_eq!(gone, m);
    assert!(b.core.list_managed_pools(None).unwrap().is_empty());
    let e = b.core.unmanage_pool(&b.admin, "h1", "default").unwrap_err();
    assert!(matches!(e, CoreError::NotFound(_)), "{e}");
    assert!(b.actions().iter().any(|a| a == "pool.unmanaged"));
}

#[tokio::test]
async fn bad_pool_requests_are_refused_and_nothing_changes() {
    let b = Bed::new();
    b.host("h1");
    b.agents
        .set_pool("h1", "default", PoolDescription::default());
    let before = b.snapshot();
    let audit = b.actions().len();
    let cases: [(&str, &str, &str); 5] = [
        ("h1", "nosuch", "no storage pool named nosuch"),
        ("h1", "a/b", "pool name"),
        ("h1", "", "pool name"),
        ("nohost", "default", "nohost"),
        ("bad host", "default", "host name"),
    ];
    for (host, pool, says) in cases {
        let e = b
            .core
            .manage_pool(b.admin.clone(), host.into(), pool.into())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{host}/{pool}: {e}");
        let e = b
            .core
            .describe_pool(host.into(), pool.into())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{host}/{pool}: {e}");
    }
    b.agents.set_down("h1", true);
    let e = b
        .core
        .manage_pool(b.admin.clone(), "h1".into(), "default".into())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not answer") && e.contains("nothing was changed"),
        "{e}"
    );
    let e = b.core.unmanage_pool(&b.admin, "h1", "default").unwrap_err();
    assert!(e.to_string().contains("is not managed"), "{e}");
    assert_eq!(b.snapshot(), before);
    assert_eq!(b.actions().len(), audit);
}
