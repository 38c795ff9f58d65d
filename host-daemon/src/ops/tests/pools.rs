//! `describe_pool` on the fakes: each volume with libvirt's format, what
//! the image says of itself, and the domains using it (by file path or by
//! pool and volume name); bad names and missing pools refused.

use super::bed;
use crate::model::{DomainState, Format};
use crate::ops::OpsError;
use crate::ops::fakes::{Domain, Image};

fn image(format: Format, keys: Vec<Vec<u8>>, backing: bool) -> Image {
    Image {
        format,
        size: 1 << 20,
        keys,
        data_key: 0,
        data: 7,
        backing,
    }
}

#[test]
fn a_pool_is_described_with_each_volume_and_its_users() {
    let b = bed();
    {
        let mut w = b.w.lock().unwrap();
        w.images.insert(
            "/pools/p/a.qcow2".into(),
            image(Format::Qcow2, vec![], false),
        );
        w.images.insert(
            "/pools/p/b.raw".into(),
            image(Format::Raw, vec![b"k".to_vec()], false),
        );
        w.images.insert(
            "/pools/p/c.qcow2".into(),
            image(Format::Qcow2, vec![], true),
        );
        w.images
            .insert("/elsewhere/d.raw".into(), image(Format::Raw, vec![], false));
        // c.qcow2 is built on a.qcow2.
        w.backing_of
            .insert("/pools/p/c.qcow2".into(), "/pools/p/a.qcow2".into());
        w.domains.insert(
            "u1".into(),
            Domain {
                xml: "<domain type='kvm'><name>by-path</name><uuid>5a1b2c3d-0000-4000-8000-0000000000b1</uuid><devices><disk type='file' device='disk'><source file='/pools/p/a.qcow2'/><target dev='vda'/></disk></devices></domain>".into(),
                state: DomainState::Running,
                autostart: false,
                disks: vec![],
            },
        );
        w.domains.insert(
            "u2".into(),
            Domain {
                xml: "<domain type='kvm'><name>by-name</name><uuid>5a1b2c3d-0000-4000-8000-0000000000b2</uuid><devices><disk type='volume' device='disk'><source pool='pool' volume='a.qcow2'/><target dev='vda'/></disk><disk type='volume' device='disk'><source pool='other' volume='b.raw'/><target dev='vdb'/></disk></devices></domain>".into(),
                state: DomainState::ShutOff,
                autostart: false,
                disks: vec![],
            },
        );
    }
    let d = b.d.describe_pool("pool").unwrap();
    assert_eq!(d.path, "/pools/p");
    let names: Vec<&str> = d.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["a.qcow2", "b.raw", "c.qcow2"]);
    let a = &d.volumes[0];
    assert_eq!(a.format, "qcow2");
    let users: Vec<(&str, bool)> = a
        .used_by
        .iter()
        .map(|u| (u.domain.as_str(), u.running))
        .collect();
    assert_eq!(users, [("by-path", true), ("by-name", false)]);
    let info = |i: usize| d.volumes[i].info.clone().unwrap().unwrap();
    assert!(!info(0).encrypted && !info(0).backing);
    assert!(info(1).encrypted, "b.raw holds a keyslot");
    assert!(
        d.volumes[1].used_by.is_empty(),
        "b.raw of another pool is not this one's"
    );
    assert!(info(2).backing);
    assert_eq!(d.volumes[0].base_of, ["c.qcow2"]);
    assert!(d.volumes[1].base_of.is_empty());
    assert!(d.unreadable_domains.is_empty());

    // A definition that cannot be read is named, not skipped.
    b.w.lock().unwrap().domains.insert(
        "u3".into(),
        Domain {
            xml: "<domain type='kvm'><name>broken</name><devices><disk type='file'><source file='/pools/p/b.raw'/></disk></devices>".into(),
            state: DomainState::ShutOff,
            autostart: false,
            disks: vec![],
        },
    );
    let d = b.d.describe_pool("pool").unwrap();
    assert_eq!(d.unreadable_domains.len(), 1, "{d:?}");
}

#[test]
fn bad_pool_names_and_missing_pools_are_refused() {
    let b = bed();
    for bad in ["", "a/b", "bell\u{7}", &"p".repeat(256)] {
        let e = b.d.describe_pool(bad).unwrap_err();
        assert!(matches!(e, OpsError::Invalid(_)), "{bad:?}: {e}");
    }
    let e = b.d.describe_pool("nosuch").unwrap_err();
    assert!(
        e.to_string().contains("no storage pool named nosuch"),
        "{e}"
    );
}

#[test]
fn one_pool_is_described_at_a_time() {
    let b = bed();
    let held = b.d.describing.lock().unwrap();
    let e = b.d.describe_pool("pool").unwrap_err();
    assert!(e.to_string().contains("try again in a moment"), "{e}");
    drop(held);
    b.d.describe_pool("pool").unwrap();
}
