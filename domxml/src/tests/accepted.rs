//! Documents that must be accepted, with what they must read as: real
//! `virsh dumpxml` output of libvirt 9.0 (a running guest with a backing
//! chain, an encrypted volume and a block copy under way; inactive guests
//! with every common disk form), documents written from libvirt's
//! documentation, and the XML the project's own tests define.

use crate::*;

/// One line per disk: target, device, type, source, secret, layers.
fn summary(d: &Disk) -> String {
    let secret = |e: &Option<Encryption>| match e.as_ref().and_then(|e| e.secret.as_ref()) {
        Some(SecretRef::Uuid(u)) => format!(" secret={u}"),
        Some(SecretRef::Usage(u)) => format!(" usage={u}"),
        None => String::new(),
    };
    let layers: Vec<String> = d
        .layers
        .iter()
        .map(|l| {
            let m = if l.mirror { "mirror " } else { "" };
            format!("{m}{}{}", l.source, secret(&l.encryption))
        })
        .collect();
    let layers = if layers.is_empty() {
        String::new()
    } else {
        format!(" [{}]", layers.join("; "))
    };
    format!(
        "{} {} {} {}{}{layers}",
        d.target,
        d.device,
        d.kind,
        d.source,
        secret(&d.encryption)
    )
}

#[test]
fn real_and_documented_domains_are_read_as_libvirt_reads_them() {
    let cases: &[(&str, &str, Option<&str>, &[&str])] = &[
        (
            "dumpxml-running.xml",
            "gk-domxml-run",
            Some("2ffedb80-b4a2-4716-9337-9a28b7cb37e3"),
            &[
                "vda disk file file /tmp/gk-domxml/top.qcow2 [file /tmp/gk-domxml/mid.qcow2; file /tmp/gk-domxml/base.raw]",
                "vdb disk volume volume enc.qcow2 of pool gk-domxml-pool secret=0a1b2c3d-0000-4000-8000-0000000000aa",
                "vdc disk file file /tmp/gk-domxml/data.raw",
                "sda cdrom file no source",
            ],
        ),
        (
            "dumpxml-running-blockcopy.xml",
            "gk-domxml-run",
            Some("2ffedb80-b4a2-4716-9337-9a28b7cb37e3"),
            &[
                "vda disk file file /tmp/gk-domxml/top.qcow2 [file /tmp/gk-domxml/mid.qcow2; file /tmp/gk-domxml/base.raw]",
                "vdb disk volume volume enc.qcow2 of pool gk-domxml-pool secret=0a1b2c3d-0000-4000-8000-0000000000aa",
                "vdc disk file file /tmp/gk-domxml/data.raw [mirror file /tmp/gk-domxml/copy.raw]",
                "sda cdrom file no source",
            ],
        ),
        (
            "dumpxml-inactive-simple.xml",
            "gk-domxml-run",
            Some("2ffedb80-b4a2-4716-9337-9a28b7cb37e3"),
            &[
                "vda disk file file /tmp/gk-domxml/top.qcow2",
                "vdb disk volume volume enc.qcow2 of pool gk-domxml-pool secret=0a1b2c3d-0000-4000-8000-0000000000aa",
                "vdc disk file file /tmp/gk-domxml/data.raw",
                "sda cdrom file no source",
            ],
        ),
        (
            "dumpxml-inactive-rich.xml",
            "gk-domxml-rich",
            Some("6f1c2a4e-8b3d-4c5e-9f70-1a2b3c4d5e6f"),
            RICH,
        ),
        (
            "operator-rich.xml",
            "gk-domxml-rich",
            Some("6f1c2a4e-8b3d-4c5e-9f70-1a2b3c4d5e6f"),
            RICH,
        ),
        (
            "dumpxml-inactive-forms.xml",
            "gk-domxml-forms",
            Some("7e2d3b5f-9c4e-4d6f-a081-2b3c4d5e6f70"),
            &[
                "vda disk network iscsi iqn.2013-07.com.example:iscsi-pool/1",
                "vdb disk network nbd source",
                "vdc disk file file /tmp/gk-domxml/usage.qcow2 usage=/tmp/gk-domxml/usage.qcow2",
                "vdd disk file file /tmp/gk-domxml/over-luks.qcow2 [file /tmp/gk-domxml/luks-base.qcow2 secret=0a1b2c3d-0000-4000-8000-0000000000bb]",
                "vde disk file file /tmp/gk-domxml/sliced.raw",
                "fda floppy dir no source",
                "sdc lun block block device /dev/loop6",
                "sdd cdrom file file /tmp/gk-domxml/missing.iso",
                "sde cdrom volume volume debian.iso of pool gk-domxml-isos",
            ],
        ),
        (
            "docs-forms.xml",
            "docs-forms",
            Some("c7a5fdbd-cdaf-9455-926a-d65c16db1809"),
            &[
                "vde disk nvme no source",
                "vdf disk vhostuser no source",
                "vdg disk file file /var/lib/libvirt/images/old.img [mirror file /var/lib/libvirt/images/copy.img]",
                "hdc disk network rbd image_name2",
                "vdh disk block block device /dev/mapper/encrypted secret=c7a5fdbd-0000-4000-8000-000000000001",
            ],
        ),
        (
            "tests-template-file-disk.xml",
            "g1",
            None,
            &[
                "vda disk file file /var/lib/guestkey-tests/g1.qcow2 secret=00000000-0000-0000-0000-000000000000",
            ],
        ),
        (
            "server-tests-two-disks.xml",
            "g2",
            None,
            &[
                "vda disk volume volume a-disk of pool default",
                "vdb disk file file /srv/test-agent/default/0b7c4c52-8f0e-4a8e-9d3c-2b1f8c2a7e10 secret=00000000-0000-0000-0000-000000000000",
            ],
        ),
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/accepted");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut listed: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    listed.sort();
    assert_eq!(files, listed, "every vector in {dir} has a row here");
    for (file, name, uuid, disks) in cases {
        let xml = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let d = parse(&xml).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(d.name, *name, "{file}");
        assert_eq!(d.uuid.as_deref(), *uuid, "{file}");
        let got: Vec<String> = d.disks.iter().map(summary).collect();
        assert_eq!(got, *disks, "{file}");
        // The fuzzing rule holds: independent readings agree, rewrite works.
        assert!(fuzzing::check(xml.as_bytes()), "{file}");
    }
}

const RICH: &[&str] = &[
    "vda disk file file /tmp/gk-domxml/top.qcow2 [file /tmp/gk-domxml/mid.qcow2; file /tmp/gk-domxml/base.raw]",
    "vdb disk volume volume rich-data.qcow2 of pool gk-domxml-pool secret=0a1b2c3d-0000-4000-8000-000000000001",
    "vdc disk file file /tmp/gk-domxml/enc-in-source.qcow2 secret=0a1b2c3d-0000-4000-8000-000000000002",
    "vdd disk block block device /dev/loop7",
    "vde disk network rbd pool/image",
    "sdb disk file file /tmp/gk-domxml/data.raw",
    "sda cdrom file no source",
    "fda floppy file no source",
];

#[test]
fn a_disks_driver_type_and_readonly_flag_are_read() {
    let xml = "<domain type='kvm'><name>t</name><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/p/a'/><target dev='vda'/></disk>
      <disk type='file' device='disk'><source file='/p/b'/><target dev='vdb'/><readonly/></disk>
    </devices></domain>";
    let d = parse(xml).unwrap();
    assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
    assert!(!d.disks[0].readonly);
    assert_eq!(d.disks[1].format, None);
    assert!(d.disks[1].readonly);
}
