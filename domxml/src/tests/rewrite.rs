//! The server's tests of its former `domxml` module (mgmt-server), moved
//! here: rewrite splices only the encryption elements and the inserted
//! UUID, and is stable; bad XML is refused with a line. (The secrets are
//! now UUIDs: the reader refuses anything else.)

use crate::*;

const XML: &str = "<domain type='kvm'>
  <name>web1</name>
  <memory unit='MiB'>64</memory>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='default' volume='web1-root'/>
      <target dev='vda' bus='virtio'/>
      <encryption format='luks'>
        <secret type='passphrase' uuid='00000000-0000-0000-0000-000000000000'/>
      </encryption>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web1-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/debian.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>
";

#[test]
fn finds_disks_and_rewrites_only_their_encryption() {
    let d = parse(XML).unwrap();
    assert_eq!(d.name, "web1");
    assert_eq!(d.uuid, None);
    assert_eq!(d.disks.len(), 3);
    assert_eq!(
        d.disks[0].source,
        DiskSource::Volume {
            pool: "default".into(),
            volume: "web1-root".into()
        }
    );
    assert_eq!(d.disks[0].target, "vda");
    assert_eq!(
        d.disks[1].source,
        DiskSource::File("/var/lib/libvirt/images/web1-data.qcow2".into())
    );
    assert_eq!(d.disks[2].device, "cdrom");
    let u = "11111111-2222-3333-4444-555555555555";
    let out = rewrite(
        XML,
        &d,
        &[
            (0, "aaaaaaaa-0000-4000-8000-000000000001".into()),
            (1, "bbbbbbbb-0000-4000-8000-000000000002".into()),
        ],
        Some(u),
    );
    assert!(
        !out.contains("00000000-0000-0000-0000-000000000000"),
        "{out}"
    );
    assert_eq!(
            out.matches(
                "<encryption format='luks'><secret type='passphrase' uuid='aaaaaaaa-0000-4000-8000-000000000001'/></encryption>"
            )
            .count(),
            1,
            "{out}"
        );
    assert_eq!(
        out.matches("uuid='bbbbbbbb-0000-4000-8000-000000000002'")
            .count(),
        1
    );
    assert!(out.contains(&format!("<name>web1</name>\n  <uuid>{u}</uuid>")));
    // Everything else is unchanged, and the result parses again.
    let again = parse(&out).unwrap();
    assert_eq!(again.uuid.as_deref(), Some(u));
    assert_eq!(again.disks.len(), 3);
    assert_eq!(again.disks[0].encryption_spans.len(), 1);
    for line in XML
        .lines()
        .filter(|l| !l.contains("encryption") && !l.contains("secret"))
    {
        assert!(out.contains(line), "lost line {line:?}");
    }
    // Rewriting the rewritten XML again is stable.
    assert_eq!(
        rewrite(
            &out,
            &again,
            &[
                (0, "aaaaaaaa-0000-4000-8000-000000000001".into()),
                (1, "bbbbbbbb-0000-4000-8000-000000000002".into())
            ],
            None
        ),
        out
    );
}

#[test]
fn bad_xml_is_refused_with_a_line() {
    let cases: &[(&str, &str)] = &[
        ("<domain><name>x</name>", "not well-formed"),
        ("<domain><name>x</nam></domain>", "not well-formed"),
        ("<vm><name>x</name></vm>", "root element must be <domain>"),
        (
            "<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>",
            "DOCTYPE",
        ),
        (
            "<domain><name>x</name><devices><disk type='volume'><source pool='p'/></disk></devices></domain>",
            "pool and volume",
        ),
        (
            "<domain><uuid>nope</uuid><name>x</name></domain>",
            "not a UUID",
        ),
        ("<domain></domain>", "no <name>"),
        ("", "no <domain>"),
        ("<domain><name>&bogus;</name></domain>", "entity"),
    ];
    for (xml, want) in cases {
        let e = parse(xml).unwrap_err().to_string();
        assert!(e.contains(want), "{xml}: {e}");
        assert!(e.contains("line") || e.contains("bytes"), "{e}");
    }
    let huge = format!("<domain><name>x</name>{}</domain>", " ".repeat(MAX_XML));
    assert!(matches!(parse(&huge), Err(XmlError::TooLarge(_))));
}
