//! Documents that must be refused, each with the words its error must
//! hold; and edge cases that must still be accepted.
//!
//! libvirt 9.0's readings behind the main refusals were checked with
//! `virsh define` and `dumpxml --inactive` of throw-away `gk-domxml-*`
//! guests: of two `<name>` and of two `<source>` it keeps the first;
//! `<disk xmlns:x='urn:x' x:type='block' type='file'>` becomes a block disk
//! (the prefix is ignored, the first `type` wins); a disk under
//! `xmlns='urn:x'` disappears; a `<sysinfo>` UUID becomes the domain's UUID
//! when `<uuid>` is missing; `<uuid> 11111111-2222-4333-8444-55555555550A
//! </uuid>` is stored as `...550a`; `<name> g </name>` keeps its spaces.

use crate::fuzzing::{Style, naive};
use crate::*;

const U: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

/// A domain named g with UUID [`U`] around `inner`.
fn dom(inner: &str) -> String {
    format!("<domain type='kvm'>\n  <name>g</name>\n  <uuid>{U}</uuid>\n{inner}\n</domain>\n")
}

/// [`dom`] with one `<disk>` of `attrs` holding `inner`.
fn disk_with(attrs: &str, inner: &str) -> String {
    dom(&format!(
        "  <devices>\n    <disk {attrs}>\n{inner}\n    </disk>\n  </devices>"
    ))
}

/// [`disk_with`] a file disk with target vda.
fn disk(inner: &str) -> String {
    disk_with(
        "type='file' device='disk'",
        &format!("{inner}\n      <target dev='vda' bus='virtio'/>"),
    )
}

const ENC: &str = "<encryption format='luks'><secret type='passphrase' uuid='aaaaaaaa-0000-4000-8000-000000000001'/></encryption>";

fn cases() -> Vec<(String, &'static str)> {
    let src = "<source file='/a.qcow2'/>";
    vec![
        // Not XML 1.0 in UTF-8, or not well-formed.
        ("".into(), "no <domain>"),
        ("<domain><name>x</name>".into(), "ends inside <domain>"),
        ("<domain><name>x</nam></domain>".into(), "not well-formed"),
        ("<vm><name>x</name></vm>".into(), "root element must be <domain>"),
        (
            "<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>".into(),
            "DOCTYPE",
        ),
        ("<domain><name>&bogus;</name></domain>".into(), "unknown entity &bogus;"),
        (format!("<?xml version='1.1'?>{}", dom("")), "write version='1.0'"),
        (
            format!("<?xml version='1.0' encoding='ISO-8859-1'?>{}", dom("")),
            "write encoding='UTF-8'",
        ),
        (format!("\u{FEFF}{}", dom("")), "byte order mark"),
        (format!("\n<?xml version='1.0'?>{}", dom("")), "only at the very start"),
        (format!("{}<?XML version='1.0'?>", dom("")), "only at the very start"),
        (dom("<title>a\u{1}b</title>"), "U+0001 is not allowed"),
        (dom("<title>a&#1;b</title>"), "&#1; is not a character"),
        (dom("<title>a&#xD800;b</title>"), "&#xD800; is not a character"),
        (dom("<title a='&#0;'/>"), "not well-formed"),
        (dom("<title a='x<y'/>"), "'<'"),
        (format!("{}trailing", dom("")), "text outside the root element"),
        (format!("{}<domain/>", dom("")), "a second root element"),
        (dom("<!-- a -- b -->"), "not well-formed"),
        (dom("<a:b:c/>"), "not a valid XML name"),
        (dom("<os><type arch='x86_64' arch='i686'>hvm</type></os>"), "not well-formed"),
        (dom(&"<a>".repeat(130)), "more than 128 levels deep"),
        // Found by the fuzzer (quick-xml takes them, libxml2 and roxmltree
        // do not); also in fuzz/seeds/read/regression-*.
        (
            format!("<?xml version=\"1.0\" evcpuing=\"utf-8\"?>\n{}", dom("")),
            "only version, encoding and standalone, in that order",
        ),
        (
            disk("<source file='/a'><reservations managed='no'><source type='unix' path='/p'dmode='client'/></reservations></source>"),
            "in <source>: attributes must be separated by white space",
        ),
        (dom("<title>a]]>b</title>"), "']]>' is not allowed in text"),
        (
            dom("<x:disk xmlns:h='urn:x'><x:source file='/y'/></x:disk>"),
            "the namespace prefix x: in <x:disk> is not declared",
        ),
        (
            dom("<devices xmlns:xm0='http://www.w3.org/XML/1998/namespace'/>"),
            "the namespace declaration xmlns:xm0='http://www.w3.org/XML/1998/namespace' on <devices> is not allowed",
        ),
        (
            dom("<devices xmlns:.='urn:x'/>"),
            "attribute name in <devices> \"xmlns:.\" is not a valid XML name",
        ),
        (dom("<x:-a xmlns:x='urn:x'/>"), "element name \"x:-a\" is not a valid XML name"),
        (
            dom("<xmlns:devices/>"),
            "the element <xmlns:devices> has the reserved prefix xmlns:",
        ),
        (
            dom("<metadata><m:x xmlns:m='urn:u' xmlns:n='urn:u' m:a='1' n:a='2'/></metadata>"),
            "<m:x> has two attributes a in the namespace urn:u",
        ),
        // Two of an element libvirt reads once.
        (
            "<domain>\n<name>a</name>\n<name>b</name>\n</domain>".into(),
            "(line 3): a second <name> in <domain> (the first is on line 2): libvirt reads only the first",
        ),
        (dom(&format!("<uuid>{U}</uuid>")), "a second <uuid>"),
        (dom("<devices/><devices/>"), "a second <devices>"),
        (disk(&format!("{src}<source file='/b.qcow2'/>")), "a second <source> in one <disk>"),
        (
            disk_with(
                "type='file'",
                &format!("{src}<target dev='vda'/><target dev='vdb'/>"),
            ),
            "a second <target> in one <disk>",
        ),
        (
            disk(&format!("<driver type='raw'/>{src}<driver type='qcow2'/>")),
            "a second <driver> in one <disk>",
        ),
        (disk(&format!("{src}{ENC}{ENC}")), "a second <encryption> in one <disk>"),
        (
            disk(&format!("<source file='/a'>{ENC}{ENC}</source>")),
            "a second <encryption> in one <source>",
        ),
        (
            disk(&format!("<source file='/a'>{ENC}</source>{ENC}")),
            "an <encryption> in <disk> (line",
        ),
        (
            disk(&format!("{src}<encryption format='luks'><secret type='passphrase' uuid='{U}'/><secret type='passphrase' uuid='aaaaaaaa-0000-4000-8000-000000000002'/></encryption>")),
            "a second <secret> in one <encryption>",
        ),
        (
            disk(&format!("{src}<backingStore/><backingStore/>")),
            "a second <backingStore> in one <disk>",
        ),
        (
            disk(&format!("{src}<backingStore type='file'><format type='raw'/><source file='/b'/><source file='/c'/></backingStore>")),
            "a second <source> in one <backingStore>",
        ),
        (
            disk(&format!("{src}<mirror type='file'><source file='/b'/></mirror><mirror type='file'><source file='/c'/></mirror>")),
            "a second <mirror> in one <disk>",
        ),
        (
            dom("<devices><disk><source file='/a'/><target dev='vda'/></disk><disk><source file='/b'/><target dev='vda'/></disk></devices>"),
            "a second disk with target dev='vda'",
        ),
        // Namespaces.
        (
            "<domain xmlns='http://libvirt.org/schemas/domain/1.0'><name>g</name></domain>".into(),
            "xmlns='http://libvirt.org/schemas/domain/1.0' on <domain>",
        ),
        (
            disk_with(
                "type='file' xmlns='urn:x'",
                &format!("{src}<target dev='vda'/>"),
            ),
            "where libvirt no longer finds them",
        ),
        (
            disk_with(
                "type='file' xmlns:x='urn:x' x:type='block'",
                &format!("{src}<target dev='vda'/>"),
            ),
            "attribute x:type of <disk> has a namespace prefix, and libvirt ignores prefixes (it reads it as type)",
        ),
        (
            disk(&format!("{src}<x:source xmlns:x='urn:x' file='/b'/>")),
            "<x:source> inside <disk> has a namespace prefix",
        ),
        (
            dom("<devices xmlns:xml='http://www.w3.org/XML/1998/namespace'/>"),
            "namespace declaration xmlns:xml",
        ),
        (dom("<devices xmlns:x=''/>"), "namespace declaration xmlns:x=''"),
        (dom("<title xml:lang='en'>t</title>"), "attribute xml:lang of <title>"),
        // <name> and <uuid> that are not plain text.
        (
            format!("<domain><name>we<b>b</b>1</name><uuid>{U}</uuid></domain>"),
            "<name> must hold text only, not <b>",
        ),
        (
            "<domain><name><![CDATA[web1]]></name></domain>".into(),
            "<name> holds a CDATA section",
        ),
        ("<domain><name>web<!-- x -->1</name></domain>".into(), "<name> holds a comment"),
        ("<domain><name>web<?x y?>1</name></domain>".into(), "<name> holds a processing instruction"),
        ("<domain><name> web1</name></domain>".into(), "starts or ends with white space"),
        ("<domain><name>web1&#x20;</name></domain>".into(), "starts or ends with white space"),
        ("<domain><name>web1\n</name></domain>".into(), "starts or ends with white space"),
        ("<domain><name>web&#10;1</name></domain>".into(), "control character"),
        ("<domain><name>we\tb1</name></domain>".into(), "control character"),
        ("<domain><name></name></domain>".into(), "the domain has no <name>"),
        ("<domain><name/></domain>".into(), "the domain has no <name>"),
        ("<domain></domain>".into(), "the domain has no <name>"),
        // UUIDs not in canonical form.
        (
            "<domain><name>g</name><uuid>1B4E28BA-2FA1-11D2-883F-0016D3CCA427</uuid></domain>".into(),
            "write it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (lower-case hex digits, no spaces or braces): 1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        ),
        (
            "<domain><name>g</name><uuid>1b4e28ba2fa111d2883f0016d3cca427</uuid></domain>".into(),
            "not in canonical form",
        ),
        (
            "<domain><name>g</name><uuid>{1b4e28ba-2fa1-11d2-883f-0016d3cca427}</uuid></domain>".into(),
            "is not a UUID: write it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        ),
        (
            "<domain><name>g</name><uuid> 1b4e28ba-2fa1-11d2-883f-0016d3cca427 </uuid></domain>".into(),
            "not in canonical form",
        ),
        (
            "<domain><name>g</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca4-27</uuid></domain>".into(),
            "not in canonical form",
        ),
        (
            "<domain><name>g</name><uuid><![CDATA[1b4e28ba-2fa1-11d2-883f-0016d3cca427]]></uuid></domain>".into(),
            "<uuid> holds a CDATA section",
        ),
        (
            "<domain><name>g</name><uuid>&#x31;b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid></domain>".into(),
            "<uuid> holds a character or entity reference",
        ),
        ("<domain><name>g</name><uuid></uuid></domain>".into(), "<uuid> is empty"),
        ("<domain><name>x</name><uuid>nope</uuid></domain>".into(), "not a UUID"),
        (
            disk(&format!("{src}<encryption format='luks'><secret type='passphrase' uuid='AAAAAAAA-0000-4000-8000-000000000001'/></encryption>")),
            "<secret uuid> \"AAAAAAAA-0000-4000-8000-000000000001\" is not in canonical form",
        ),
        (
            dom("<sysinfo type='smbios'><system><entry name='uuid'>aaaaaaaa-0000-4000-8000-000000000001</entry></system></sysinfo>"),
            "not the domain's <uuid> 1b4e28ba-2fa1-11d2-883f-0016d3cca427: make them the same",
        ),
        (
            format!("<domain><name>g</name><sysinfo type='smbios'><system><entry name='uuid'>{U}</entry></system></sysinfo></domain>"),
            "the domain has no <uuid>, so libvirt would take this one: add <uuid>1b4e28ba",
        ),
        (
            dom("<sysinfo type='smbios'><system><entry name='uuid'>1B4E28BA-2FA1-11D2-883F-0016D3CCA427</entry></system></sysinfo>"),
            "<sysinfo> <entry name='uuid'> \"1B4E28BA",
        ),
        // Disks libvirt reads otherwise.
        (
            dom("<disk type='file'><source file='/a'/><target dev='vda'/></disk>"),
            "a <disk> inside <domain>: libvirt reads only the disks of /domain/devices",
        ),
        (
            dom("<devices><hub><disk type='file'><source file='/a'/><target dev='vda'/></disk></hub></devices>"),
            "a <disk> inside <hub>",
        ),
        (
            disk(&format!("{src}<disk type='file'><source file='/b'/><target dev='vdb'/></disk>")),
            "a <disk> inside <disk>",
        ),
        (disk_with("type='files'", "<target dev='vda'/>"), "type='files' is not a type libvirt knows"),
        (disk_with("device='dvd'", "<target dev='vda'/>"), "device='dvd'> is not a device libvirt knows"),
        (
            disk("<source file='/a' volume='v'/>"),
            "<source volume='v'> belongs to type='volume', but this image has type='file', and libvirt ignores it",
        ),
        (disk("<source file='/a' dev='/dev/sda'/>"), "<source dev='/dev/sda'> belongs to type='block'"),
        (
            disk_with("type='volume'", "<source pool='p' volume='v' file='/a'/><target dev='vda'/>"),
            "<source file='/a'> belongs to type='file'",
        ),
        (
            disk_with("type='volume'", "<source pool='p'/><target dev='vda'/>"),
            "pool and volume",
        ),
        (disk("<source file=''/>"), "<source file=''> is empty"),
        (disk("<source file='/a&#10;b'/>"), "control character"),
        (
            disk_with("type='network'", "<source name='x'/><target dev='vda'/>"),
            "needs a protocol attribute",
        ),
        (disk_with("type='file'", src), "a <disk> needs <target dev='...'>"),
        (
            disk_with("type='file'", &format!("{src}<target bus='virtio'/>")),
            "<target> needs a dev attribute",
        ),
        (
            disk(&format!("{src}<backingStore type='file'><format type='raw'/><source file='/b'/>{ENC}</backingStore>")),
            "libvirt ignores an <encryption> here",
        ),
        (
            disk_with("type='file'", &format!("{src}<target dev='vda'>{ENC}</target>")),
            "libvirt ignores an <encryption> here",
        ),
        (
            disk(&format!("{src}<encryption format='luks'><cipher name='aes'><secret type='passphrase' uuid='{U}'/></cipher></encryption>")),
            "libvirt reads only <secret> directly in <encryption>",
        ),
        (
            disk(&format!("{src}<encryption format='luks'><secret type='passphrase' uuid='{U}' usage='x'/></encryption>")),
            "both uuid and usage",
        ),
        (
            disk(&format!("{src}<encryption format='luks'><secret type='passphrase'/></encryption>")),
            "a <secret> needs a uuid attribute",
        ),
        (
            disk(&format!("{src}<encryption format='luks'><secret type='passphrase' uuid='{U}'><x/></secret></encryption>")),
            "<secret> must be empty",
        ),
        (
            disk(&format!("{src}<backingStore><format type='raw'/><source file='/b'/></backingStore>")),
            "a <backingStore> without type ends the chain",
        ),
        (
            disk(&format!("{src}<backingStore type='file'><format type='raw'/></backingStore>")),
            "a <backingStore> with a type needs a <source>",
        ),
        (
            disk(&format!("{src}<backingStore type='volume'><source file='/b'/></backingStore>")),
            "<source file='/b'> belongs to type='file', but this image has type='volume'",
        ),
        (
            disk(&format!("{src}<mirror file='/b' job='copy'><source file='/c'/></mirror>")),
            "a <mirror> without type is read from its file attribute",
        ),
        (
            disk(&format!("{src}<mirror type='file' file='/b' job='copy'><source file='/c'/></mirror>")),
            "<mirror file='/b'> and its <source> (/c) differ",
        ),
    ]
}

#[test]
fn ambiguous_and_bad_documents_are_refused_with_a_line_and_what_to_fix() {
    for (xml, want) in cases() {
        let e = match parse(&xml) {
            Ok(d) => panic!("accepted {xml:?} as {d:?}"),
            Err(e) => e,
        };
        let text = e.to_string();
        assert!(
            text.contains(want),
            "{xml:?}:\n  got  {text}\n  want {want}"
        );
        assert!(e.line().is_some(), "{text}");
        assert!(!fuzzing::check(xml.as_bytes()));
    }
    let huge = format!("<domain><name>x</name>{}</domain>", " ".repeat(MAX_XML));
    assert_eq!(parse(&huge), Err(XmlError::TooLarge(huge.len())));
}

/// The refusals are needed: on these documents a first-match reader and a
/// last-match reader really disagree.
#[test]
fn refused_duplicates_and_namespaces_are_read_two_ways_by_naive_readers() {
    let src = "<source file='/a.qcow2'/>";
    let two_ways = [
        "<domain><name>a</name><name>b</name></domain>".to_owned(),
        format!(
            "<domain><name>g</name><uuid>{U}</uuid><uuid>aaaaaaaa-0000-4000-8000-000000000001</uuid></domain>"
        ),
        dom("<devices><disk><target dev='vda'/></disk></devices><devices/>"),
        disk(&format!("{src}<source file='/b.qcow2'/>")),
        disk_with(
            "type='file'",
            &format!("{src}<target dev='vda'/><target dev='vdb'/>"),
        ),
        disk(&format!(
            "{src}{ENC}<encryption format='luks'><secret type='passphrase' uuid='{U}'/></encryption>"
        )),
        disk(&format!(
            "<source file='/a'>{ENC}</source><encryption format='luks'><secret type='passphrase' uuid='{U}'/></encryption>"
        )),
        disk_with(
            "type='block' xmlns:x='urn:x' x:type='file'",
            "<source file='/a' dev='/dev/b'/><target dev='vda'/>",
        ),
        disk_with(
            "type='file' xmlns='urn:x'",
            "<source file='/a'/><target dev='vda'/>",
        ),
    ];
    for xml in two_ways {
        assert!(parse(&xml).is_err(), "{xml}");
        let first = naive(&xml, Style::LibvirtLike).unwrap();
        let last = naive(&xml, Style::LastWins).unwrap();
        assert_ne!(first, last, "{xml}");
    }
}

/// Edge cases that stay accepted: what libvirt reads the same as anyone.
fn harmless() -> Vec<String> {
    vec![
        format!("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n{}", dom("")),
        dom("<metadata><disk type='file'><source file='/x'/></disk><a xmlns='urn:a'><name>n</name></a></metadata>"),
        dom("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-S'/></qemu:commandline>"),
        dom("<x:disk xmlns:x='urn:x'><x:source file='/y'/></x:disk>"),
        "<domain>\r\n  <name>g</name>\r\n  <uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>\r\n</domain>\r\n".into(),
        "<!-- comment --><?pi x?><domain><name>a&amp;b &lt;c&gt;</name></domain>".into(),
        dom("<devices><disk device='cdrom'><target dev='hdc'/></disk></devices>"),
        disk(&format!("<source file='/a'><seclabel model='dac' relabel='no'/><reservations managed='no'><source type='unix' path='/p' mode='client'/></reservations>{ENC}</source>")),
        disk("<source file='/a'/><backingStore type='block'><format type='raw'/><source dev='/dev/b'/><backingStore/></backingStore><auth username='u'><secret type='ceph' usage='x'/></auth>"),
    ]
}

#[test]
fn harmless_edge_cases_are_accepted() {
    for xml in harmless() {
        let d = parse(&xml).unwrap_or_else(|e| panic!("{xml:?}: {e}"));
        assert!(fuzzing::check(xml.as_bytes()), "{xml}");
        assert!(!d.name.is_empty());
    }
    let d = parse("<domain><name>a&amp;b &lt;c&gt;</name></domain>").unwrap();
    assert_eq!(d.name, "a&b <c>");
}
