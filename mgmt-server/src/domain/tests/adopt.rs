//! `guest adopt` against fake hosts: every disk it cannot take is refused
//! before anything changes (no volume, no guest, no call that changes the
//! host). The whole flow runs on the real libvirtd and guestkeyd in
//! tests/tests/adoption.rs.

use super::Bed;
use crate::domain::agent::{DiskPlace, DomainDescription, ImagePlace};

const UUID: &str = "5a1b2c3d-0000-4000-8000-0000000000a1";

fn disk(target: &str, file: &str, driver: &str, inner: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{driver}'/><source file='{file}'/><target dev='{target}'/>{inner}</disk>"
    )
}

fn domain(disks: &[String]) -> String {
    format!(
        "<domain type='kvm'><name>web</name><uuid>{UUID}</uuid><devices>{}</devices></domain>",
        disks.concat()
    )
}

fn place(target: &str, path: &str, place: ImagePlace, encrypted: bool, backing: bool) -> DiskPlace {
    DiskPlace {
        target: target.into(),
        path: path.into(),
        place,
        encrypted,
        backing,
    }
}

fn in_pool(volume: &str) -> ImagePlace {
    ImagePlace::InPool {
        pool: "default".into(),
        volume: volume.into(),
    }
}

/// Adopts `web` from `xml` with disks `places` on h1; returns the error.
async fn refused(b: &Bed, xml: String, places: Vec<DiskPlace>, skip: &[&str]) -> String {
    b.agents.set_domain(
        "h1",
        DomainDescription {
            uuid: UUID.into(),
            state: "shut off".into(),
            xml,
            security_info_withheld: false,
            disks: places,
        },
    );
    let before = b.snapshot();
    let e = b
        .core
        .adopt_guest(
            b.admin.clone(),
            "h1".into(),
            "web".into(),
            skip.iter().map(|s| (*s).to_owned()).collect(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(b.snapshot(), before, "a refusal changed the store: {e}");
    assert!(b.core.list_volumes(None).unwrap().is_empty(), "{e}");
    e
}

/// Disks of the definition, what the host says of them, --skip, and what
/// the refusal must say.
type Case = (
    Vec<String>,
    Vec<DiskPlace>,
    &'static [&'static str],
    &'static str,
);

#[tokio::test]
async fn disks_adoption_cannot_take_are_refused_and_nothing_changes() {
    let b = Bed::new();
    b.host("h1");
    let a = disk("vda", "/p/a.qcow2", "qcow2", "");
    let ok = place("vda", "/p/a.qcow2", in_pool("a.qcow2"), false, false);
    let cases: Vec<Case> = vec![
        (
            vec![
                a.clone(),
                disk(
                    "vdb",
                    "/p/b.qcow2",
                    "qcow2",
                    "<encryption format='luks'><secret type='passphrase' uuid='0a1b2c3d-0000-4000-8000-000000000001'/></encryption>",
                ),
            ],
            vec![
                ok.clone(),
                place("vdb", "/p/b.qcow2", in_pool("b.qcow2"), true, false),
            ],
            &[],
            "disk vdb",
        ),
        (
            vec![a.clone(), disk("vdb", "/p/b.qcow2", "qcow2", "")],
            vec![
                ok.clone(),
                place("vdb", "/p/b.qcow2", in_pool("b.qcow2"), false, true),
            ],
            &[],
            "has a backing file",
        ),
        (
            vec![a.clone(), disk("vdb", "/x/b.qcow2", "qcow2", "")],
            vec![
                ok.clone(),
                place("vdb", "/x/b.qcow2", ImagePlace::NotInPool, false, false),
            ],
            &[],
            "virsh pool-define-as NAME dir --target /x",
        ),
        (
            vec![a.clone(), disk("vdb", "/p/b.vmdk", "vmdk", "")],
            vec![
                ok.clone(),
                place("vdb", "/p/b.vmdk", ImagePlace::OtherFormat, false, false),
            ],
            &[],
            "driver type is vmdk",
        ),
        (
            vec![a.clone(), disk("vdb", "/p/gone", "raw", "")],
            vec![
                ok.clone(),
                place("vdb", "/p/gone", ImagePlace::Missing, false, false),
            ],
            &[],
            "there is no image at /p/gone",
        ),
        (
            vec![a.clone(), disk("vdb", "/p/b.raw", "raw", "")],
            vec![
                ok.clone(),
                place("vdb", "/p/b.raw", in_pool("a.qcow2"), false, false),
            ],
            &[],
            "a guestkey volume named a.qcow2",
        ),
        (
            vec![a.clone(), disk("vdb", "/p/b.raw", "raw", "")],
            vec![
                ok.clone(),
                place("vdb", "/p/b.raw", in_pool("bad name"), false, false),
            ],
            &[],
            "cannot be a guestkey name",
        ),
        (
            vec![a.clone()],
            vec![ok.clone()],
            &["vda"],
            "no disk guestkey can encrypt",
        ),
        (
            vec![a.clone()],
            vec![ok.clone()],
            &["vdq"],
            "has no disk vdq",
        ),
        (vec![a.clone()], vec![ok.clone()], &["v/a"], "target dev"),
    ];
    for (disks, places, skip, want) in cases {
        let e = refused(&b, domain(&disks), places, skip).await;
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    // A password libvirt withholds would be lost.
    b.agents.set_domain(
        "h1",
        DomainDescription {
            uuid: UUID.into(),
            state: "shut off".into(),
            xml: domain(&[a]),
            security_info_withheld: true,
            disks: vec![ok],
        },
    );
    let e = b
        .core
        .adopt_guest(b.admin.clone(), "h1".into(), "web".into(), vec![])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--security-info"), "{e}");
    // A domain the host does not have, and a host that does not exist.
    let e = b
        .core
        .adopt_guest(b.admin.clone(), "h1".into(), "nope".into(), vec![])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"nope\""), "{e}");
    let e = b
        .core
        .adopt_guest(b.admin.clone(), "h9".into(), "web".into(), vec![])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("h9"), "{e}");
    assert!(b.core.list_guests(None).unwrap().is_empty());
}
