//! Checks shared by the fuzz target (`domxml/fuzz`, which enables the
//! `fuzzing` feature) and the unit tests, which run them over the committed
//! seeds.
//!
//! The rule, for every input that [`parse`] accepts:
//! 1. roxmltree, a second and independent XML parser, parses it too;
//! 2. a naive libvirt-like reading of roxmltree's tree (XPath `[1]`
//!    semantics: the first matching element, which must be outside any
//!    namespace; attributes found by local name, first one, as
//!    `xmlGetProp` does; string values untrimmed; libvirt's lax UUID
//!    parser; disks from every `<devices>`; a `<sysinfo>` UUID standing in
//!    for a missing `<uuid>`) gives exactly our result;
//! 3. a sloppy "last wins" reading (last matching element and attribute,
//!    namespaces ignored, text trimmed, the uuid crate's parser, disks of
//!    the last `<devices>`) gives it too;
//! 4. [`rewrite`] with new secrets on some disks (and a `<uuid>` when there
//!    is none) parses again to the same domain with the new secrets, the
//!    readings of 2 and 3 agree on it, and rewriting it again with the same
//!    secrets changes nothing.
//!
//! Compared: name, UUID, and for each disk its device, type, target,
//! source, secret, and each layer's source and secret.

use crate::{DiskSource, Domain, SecretRef, parse, rewrite};
use roxmltree::Node;

/// What a reader makes of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// `<name>`.
    pub name: Option<String>,
    /// `<uuid>`, canonical.
    pub uuid: Option<String>,
    /// Disks, in document order.
    pub disks: Vec<DiskReading>,
}

/// What a reader makes of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskReading {
    /// `device`.
    pub device: String,
    /// `type`.
    pub kind: String,
    /// `<target dev>`.
    pub target: String,
    /// Source.
    pub source: DiskSource,
    /// Secret of the disk's own `<encryption>`.
    pub secret: Option<SecretRef>,
    /// (source, secret) of each backing layer, then of the mirror's.
    pub layers: Vec<(DiskSource, Option<SecretRef>)>,
}

/// Our reading, in the same terms.
pub fn ours(d: &Domain) -> Reading {
    Reading {
        name: Some(d.name.clone()),
        uuid: d.uuid.clone(),
        disks: d
            .disks
            .iter()
            .map(|k| DiskReading {
                device: k.device.clone(),
                kind: k.kind.clone(),
                target: k.target.clone(),
                source: k.source.clone(),
                secret: k.encryption.as_ref().and_then(|e| e.secret.clone()),
                layers: k
                    .layers
                    .iter()
                    .map(|l| {
                        (
                            l.source.clone(),
                            l.encryption.as_ref().and_then(|e| e.secret.clone()),
                        )
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// How a naive reader picks among matches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Style {
    /// libvirt's: first match, namespace-aware elements, lax UUIDs.
    LibvirtLike,
    /// Last match, local names only, trimmed text.
    LastWins,
}

/// libvirt's `virUUIDParse`, written again here: surrounding white space,
/// and `-` or ` ` between hex digit pairs, are skipped.
pub fn virt_uuid_parse(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    while n < 16 {
        match b.get(i)? {
            b'-' | b' ' => i += 1,
            _ => {
                let hi = (*b.get(i)? as char).to_digit(16)?;
                let lo = (*b.get(i + 1)? as char).to_digit(16)?;
                out[n] = (hi * 16 + lo) as u8;
                n += 1;
                i += 2;
            }
        }
    }
    if !b[i..].iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(uuid::Uuid::from_bytes(out).hyphenated().to_string())
}

struct Naive(Style);

impl Naive {
    fn matches(&self, n: &Node<'_, '_>, name: &str) -> bool {
        n.is_element()
            && n.tag_name().name() == name
            && (self.0 == Style::LastWins || n.tag_name().namespace().is_none())
    }

    fn all<'a, 'i>(&self, n: Node<'a, 'i>, name: &str) -> Vec<Node<'a, 'i>> {
        n.children().filter(|c| self.matches(c, name)).collect()
    }

    fn child<'a, 'i>(&self, n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
        let all = self.all(n, name);
        match self.0 {
            Style::LibvirtLike => all.first().copied(),
            Style::LastWins => all.last().copied(),
        }
    }

    /// `xmlGetProp`: by local name, whatever the namespace.
    fn attr<'a>(&self, n: Node<'a, '_>, name: &str) -> Option<&'a str> {
        let mut it = n
            .attributes()
            .filter(|a| a.name() == name)
            .map(|a| a.value());
        match self.0 {
            Style::LibvirtLike => it.next(),
            Style::LastWins => it.next_back(),
        }
    }

    /// XPath's `string()`, or "" for no node; LastWins trims.
    fn string(&self, n: Option<Node<'_, '_>>) -> String {
        let s: String = n
            .map(|n| {
                n.descendants()
                    .filter(|d| d.is_text())
                    .filter_map(|d| d.text())
                    .collect()
            })
            .unwrap_or_default();
        match self.0 {
            Style::LibvirtLike => s,
            Style::LastWins => s.trim().to_owned(),
        }
    }

    fn uuid(&self, s: &str) -> Option<String> {
        match self.0 {
            Style::LibvirtLike => virt_uuid_parse(s),
            Style::LastWins => uuid::Uuid::parse_str(s)
                .ok()
                .map(|u| u.hyphenated().to_string()),
        }
    }

    fn nonempty(s: Option<&str>) -> Option<&str> {
        s.filter(|s| !s.is_empty())
    }

    fn source(&self, kind: &str, src: Option<Node<'_, '_>>) -> DiskSource {
        let Some(s) = src else {
            return DiskSource::Other;
        };
        let a = |k: &str| Self::nonempty(self.attr(s, k)).map(str::to_owned);
        match kind {
            "file" => a("file").map_or(DiskSource::Other, DiskSource::File),
            "block" => a("dev").map_or(DiskSource::Other, DiskSource::Block),
            "volume" => match (a("pool"), a("volume")) {
                (Some(pool), Some(volume)) => DiskSource::Volume { pool, volume },
                _ => DiskSource::Other,
            },
            "network" => match a("protocol") {
                Some(protocol) => DiskSource::Network {
                    protocol,
                    name: a("name"),
                },
                None => DiskSource::Other,
            },
            _ => DiskSource::Other,
        }
    }

    fn secret(&self, enc: Option<Node<'_, '_>>) -> Option<SecretRef> {
        let s = self.child(enc?, "secret")?;
        match self.attr(s, "uuid") {
            Some(u) => self.uuid(u).map(SecretRef::Uuid),
            None => self
                .attr(s, "usage")
                .map(|u| SecretRef::Usage(u.to_owned())),
        }
    }

    fn chain(&self, parent: Node<'_, '_>, out: &mut Vec<(DiskSource, Option<SecretRef>)>) {
        let Some(b) = self.child(parent, "backingStore") else {
            return;
        };
        let Some(kind) = self.attr(b, "type") else {
            return;
        };
        let src = self.child(b, "source");
        out.push((
            self.source(kind, src),
            self.secret(src.and_then(|s| self.child(s, "encryption"))),
        ));
        self.chain(b, out);
    }

    fn disk(&self, d: Node<'_, '_>) -> DiskReading {
        let src = self.child(d, "source");
        let kind = match src {
            Some(_) => self.attr(d, "type").unwrap_or("file"),
            None => "file",
        };
        let own = self.child(d, "encryption");
        let in_src = src.and_then(|s| self.child(s, "encryption"));
        let enc = match self.0 {
            // libvirt parses <source> (and its <encryption>) first.
            Style::LibvirtLike => in_src.or(own),
            Style::LastWins => own.or(in_src),
        };
        let mut layers = Vec::new();
        self.chain(d, &mut layers);
        if let Some(m) = self.child(d, "mirror") {
            match self.attr(m, "type") {
                Some(kind) => {
                    let msrc = self.child(m, "source");
                    layers.push((
                        self.source(kind, msrc),
                        self.secret(msrc.and_then(|s| self.child(s, "encryption"))),
                    ));
                    self.chain(m, &mut layers);
                }
                None => layers.push((self.source("file", Some(m)), None)),
            }
        }
        DiskReading {
            device: self.attr(d, "device").unwrap_or("disk").to_owned(),
            kind: kind.to_owned(),
            target: self
                .child(d, "target")
                .and_then(|t| self.attr(t, "dev"))
                .unwrap_or_default()
                .to_owned(),
            source: self.source(kind, src),
            secret: self.secret(enc),
            layers,
        }
    }

    fn read(&self, doc: &roxmltree::Document<'_>) -> Reading {
        let root = doc.root_element();
        let name = Some(self.string(self.child(root, "name"))).filter(|s| !s.is_empty());
        let mut uuid = Some(self.string(self.child(root, "uuid")))
            .filter(|s| !s.is_empty())
            .and_then(|s| self.uuid(&s));
        if uuid.is_none() && self.0 == Style::LibvirtLike {
            // libvirt takes a <sysinfo> system UUID for a missing <uuid>.
            for s in self.all(root, "sysinfo") {
                let entry = self.child(s, "system").and_then(|sys| {
                    sys.children()
                        .find(|e| self.matches(e, "entry") && e.attribute("name") == Some("uuid"))
                });
                if let Some(u) = entry
                    .map(|e| self.string(Some(e)))
                    .filter(|s| !s.is_empty())
                {
                    uuid = self.uuid(&u);
                    break;
                }
            }
        }
        let devices = match self.0 {
            Style::LibvirtLike => self.all(root, "devices"),
            Style::LastWins => self.child(root, "devices").into_iter().collect(),
        };
        let disks = devices
            .into_iter()
            .flat_map(|dv| self.all(dv, "disk"))
            .map(|d| self.disk(d))
            .collect();
        Reading { name, uuid, disks }
    }
}

/// The naive reading of `xml` in `style`, or roxmltree's error.
pub fn naive(xml: &str, style: Style) -> Result<Reading, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    Ok(Naive(style).read(&doc))
}

/// Panics unless both naive readings of `xml` equal `ours`.
fn agree(xml: &str, ours: &Reading) {
    for style in [Style::LibvirtLike, Style::LastWins] {
        match naive(xml, style) {
            Ok(r) => assert_eq!(&r, ours, "{style:?} reading differs from parse()"),
            Err(e) => panic!("roxmltree refuses what parse() accepted: {e}"),
        }
    }
}

/// The secret the rewrite check gives disk `i`.
fn new_secret(i: usize) -> String {
    format!("5ec2e7a0-0000-4000-8000-{i:012x}")
}

/// Checks the rule above for `data`; returns whether [`parse`] accepted it.
/// Panics where the rule breaks (the fuzzer reports that as a crash).
pub fn check(data: &[u8]) -> bool {
    let Ok(xml) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(dom) = parse(xml) else {
        return false;
    };
    let mine = ours(&dom);
    agree(xml, &mine);
    // Which disks get a new secret: a pattern drawn from the input.
    let pick = data
        .iter()
        .fold(0u32, |h, b| h.rotate_left(5) ^ u32::from(*b));
    let secrets: Vec<(usize, String)> = (0..dom.disks.len())
        .filter(|i| pick & (1 << (i % 32)) != 0 || pick & 1 == 0)
        .map(|i| (i, new_secret(i)))
        .collect();
    let added = "a11ed000-0000-4000-8000-000000000001";
    let add = dom.uuid.is_none().then_some(added);
    let out = rewrite(xml, &dom, &secrets, add);
    let again = match parse(&out) {
        Ok(d) => d,
        Err(e) => panic!("rewrite() output does not parse: {e}\n{out}"),
    };
    let mut want = mine.clone();
    if want.uuid.is_none() {
        want.uuid = Some(added.into());
    }
    for (i, s) in &secrets {
        want.disks[*i].secret = Some(SecretRef::Uuid(s.clone()));
    }
    assert_eq!(
        ours(&again),
        want,
        "rewrite() changed more than the secrets"
    );
    for (i, _) in &secrets {
        let e = again.disks[*i]
            .encryption
            .as_ref()
            .and_then(|e| e.format.as_deref());
        assert_eq!(e, Some("luks"), "rewritten disk {i} is not LUKS");
    }
    agree(&out, &want);
    assert_eq!(
        rewrite(&out, &again, &secrets, None),
        out,
        "rewriting the rewritten XML again changed it"
    );
    true
}
