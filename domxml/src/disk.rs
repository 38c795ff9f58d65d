//! One `/domain/devices/disk`, read as libvirt 9.0 reads it
//! (`virDomainDiskDefParseXML`): `type` (default `file`), `device`
//! (default `disk`), the first `<source>`, `<target>`, `<encryption>` in
//! `<disk>` or in `<source>`, the `<backingStore>` chain and `<mirror>`;
//! refusing whatever libvirt would read otherwise than a naive reader.

use crate::error::{XmlError, invalid};
use crate::model::{Disk, DiskSource, Encryption, Layer, SecretRef};
use crate::read::single;
use crate::text::{canonical_uuid, plain_value};
use crate::tree::Element;

const DEVICES: &[&str] = &["disk", "cdrom", "floppy", "lun"];

/// Source types, and the `<source>` attributes each reads to find its
/// data. libvirt reads only those of the disk's type and ignores the rest,
/// so a `<source>` carrying another type's attribute is refused.
const LOCATION: &[(&str, &[&str])] = &[
    ("file", &["file", "fdgroup"]),
    ("block", &["dev"]),
    ("dir", &["dir"]),
    (
        "network",
        &[
            "protocol",
            "name",
            "query",
            "tls",
            "tlsHostname",
            "tlsFromConfig",
        ],
    ),
    ("volume", &["pool", "volume", "mode"]),
    ("nvme", &["type", "namespace", "managed"]),
    ("vhostuser", &["type", "path"]),
];

fn check_kind(kind: &str, el: &Element) -> Result<(), XmlError> {
    if LOCATION.iter().any(|(k, _)| *k == kind) {
        return Ok(());
    }
    let known: Vec<&str> = LOCATION.iter().map(|(k, _)| *k).collect();
    Err(invalid(
        el.line,
        format!(
            "<{}> type='{kind}' is not a type libvirt knows: use one of {}",
            el.name,
            known.join(", ")
        ),
    ))
}

/// A location attribute's value: present values must not be empty (libvirt
/// takes `file=''` for no source at all).
fn location<'a>(src: &'a Element, name: &str) -> Result<Option<&'a str>, XmlError> {
    match src.attr(name) {
        None => Ok(None),
        Some("") => Err(invalid(
            src.line,
            format!(
                "<source {name}=''> is empty, which libvirt reads as no source: leave <source> out for an empty drive"
            ),
        )),
        Some(v) => Ok(Some(plain_value(v, &format!("<source {name}>"), src.line)?)),
    }
}

/// The source `src` of an image of type `kind`.
fn source(kind: &str, src: &Element) -> Result<DiskSource, XmlError> {
    let mine = LOCATION
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, a)| *a)
        .unwrap_or_default();
    for a in &src.attrs {
        let owners: Vec<&str> = LOCATION
            .iter()
            .filter(|(_, attrs)| attrs.contains(&a.name.as_str()))
            .map(|(k, _)| *k)
            .collect();
        if !owners.is_empty() && !mine.contains(&a.name.as_str()) {
            return Err(invalid(
                src.line,
                format!(
                    "<source {}='{}'> belongs to type='{}', but this image has type='{kind}', and libvirt ignores it: remove it or change the type",
                    a.name,
                    a.value,
                    owners.join("' or type='")
                ),
            ));
        }
    }
    Ok(match kind {
        "file" => location(src, "file")?.map_or(DiskSource::Other, |p| DiskSource::File(p.into())),
        "block" => location(src, "dev")?.map_or(DiskSource::Other, |p| DiskSource::Block(p.into())),
        "volume" => match (location(src, "pool")?, location(src, "volume")?) {
            (Some(pool), Some(volume)) => DiskSource::Volume {
                pool: pool.into(),
                volume: volume.into(),
            },
            (None, None) => DiskSource::Other,
            _ => {
                return Err(invalid(
                    src.line,
                    "a <disk type='volume'> source needs pool and volume attributes, both",
                ));
            }
        },
        "network" => match location(src, "protocol")? {
            Some(protocol) => DiskSource::Network {
                protocol: protocol.into(),
                name: location(src, "name")?.map(Into::into),
            },
            None => {
                return Err(invalid(
                    src.line,
                    "a network <source> needs a protocol attribute",
                ));
            }
        },
        _ => DiskSource::Other,
    })
}

/// An `<encryption>`: its format and its one `<secret>`.
fn encryption(el: &Element, spans: &mut Vec<(usize, usize)>) -> Result<Encryption, XmlError> {
    spans.push((el.start, el.end));
    let secret = match single(el, "secret", "one <encryption>")? {
        None => None,
        Some(s) => {
            if s.elements().next().is_some() {
                return Err(invalid(
                    s.line,
                    "<secret> must be empty: remove what is inside it",
                ));
            }
            match (s.attr("uuid"), s.attr("usage")) {
                (Some(u), None) => {
                    Some(SecretRef::Uuid(canonical_uuid(u, "<secret uuid>", s.line)?))
                }
                (None, Some(u)) => Some(SecretRef::Usage(
                    plain_value(u, "<secret usage>", s.line)?.into(),
                )),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        s.line,
                        "a <secret> has both uuid and usage, which libvirt refuses: keep one",
                    ));
                }
                (None, None) => {
                    return Err(invalid(s.line, "a <secret> needs a uuid attribute"));
                }
            }
        }
    };
    // libvirt reads only ./secret; one deeper would be read by no one.
    for c in el.elements().filter(|c| c.name != "secret") {
        if let Some(deep) = find(c, "secret") {
            return Err(invalid(
                deep.line,
                format!(
                    "a <secret> inside <{}>: libvirt reads only <secret> directly in <encryption>; move it there",
                    c.name
                ),
            ));
        }
    }
    let format = match el.attr("format") {
        Some(f) => Some(plain_value(f, "<encryption format>", el.line)?.to_owned()),
        None => None,
    };
    Ok(Encryption {
        format,
        secret,
        line: el.line,
    })
}

/// The first element named `name` at or below `el`.
fn find<'a>(el: &'a Element, name: &str) -> Option<&'a Element> {
    if el.name == name {
        return Some(el);
    }
    el.elements().find_map(|c| find(c, name))
}

/// Every `<encryption>` at or below `el` whose start is not in `read`.
fn stray_encryption<'a>(el: &'a Element, read: &[(usize, usize)]) -> Option<&'a Element> {
    if el.name == "encryption" && !read.iter().any(|(s, _)| *s == el.start) {
        return Some(el);
    }
    el.elements().find_map(|c| stray_encryption(c, read))
}

/// The layer `el` (a typed `<backingStore>` or `<mirror>`) of type `kind`.
fn layer(
    el: &Element,
    kind: &str,
    mirror: bool,
    spans: &mut Vec<(usize, usize)>,
) -> Result<Layer, XmlError> {
    check_kind(kind, el)?;
    let within = format!("one <{}>", el.name);
    single(el, "format", &within)?;
    let Some(src) = single(el, "source", &within)? else {
        return Err(invalid(
            el.line,
            format!("a <{}> with a type needs a <source>", el.name),
        ));
    };
    let source = source(kind, src)?;
    let encryption = match single(src, "encryption", "one <source>")? {
        Some(e) => Some(encryption(e, spans)?),
        None => None,
    };
    Ok(Layer {
        kind: kind.to_owned(),
        source,
        encryption,
        mirror,
        line: el.line,
    })
}

/// The `<backingStore>` chain below `parent`, top first.
fn chain(
    parent: &Element,
    mirror: bool,
    layers: &mut Vec<Layer>,
    spans: &mut Vec<(usize, usize)>,
) -> Result<(), XmlError> {
    let within = format!("one <{}>", parent.name);
    let Some(b) = single(parent, "backingStore", &within)? else {
        return Ok(());
    };
    let Some(kind) = b.attr("type") else {
        // The chain's terminator: libvirt reads nothing inside it.
        if let Some(c) = b.elements().next() {
            return Err(invalid(
                c.line,
                "a <backingStore> without type ends the chain, and libvirt ignores what is inside it: add its type or remove its contents",
            ));
        }
        return Ok(());
    };
    layers.push(layer(b, kind, mirror, spans)?);
    chain(b, mirror, layers, spans)
}

/// The `<mirror>` of a disk during a block job, with its own chain.
fn mirror(
    m: &Element,
    layers: &mut Vec<Layer>,
    spans: &mut Vec<(usize, usize)>,
) -> Result<(), XmlError> {
    match m.attr("type") {
        Some(kind) => {
            let l = layer(m, kind, true, spans)?;
            if let (Some(file), Some(path)) = (m.attr("file"), l.source.path()) {
                if file != path {
                    return Err(invalid(
                        m.line,
                        format!(
                            "<mirror file='{file}'> and its <source> ({path}) differ: make them the same"
                        ),
                    ));
                }
            }
            layers.push(l);
            chain(m, true, layers, spans)
        }
        None => {
            // The old form: the file is an attribute, nothing inside is read.
            if let Some(c) = m.elements().next() {
                return Err(invalid(
                    c.line,
                    "a <mirror> without type is read from its file attribute, and libvirt ignores what is inside it: add type='file'",
                ));
            }
            let Some(file) = location(m, "file")? else {
                return Err(invalid(
                    m.line,
                    "a <mirror> needs a type or a file attribute",
                ));
            };
            layers.push(Layer {
                kind: "file".into(),
                source: DiskSource::File(file.into()),
                encryption: None,
                mirror: true,
                line: m.line,
            });
            Ok(())
        }
    }
}

/// The whitespace before `</disk>` from the start of its line, with the new
/// line ("" when `</disk>` does not start its line).
fn indent(xml: &str, close: usize) -> String {
    let before = &xml[..close];
    let trimmed = before.trim_end_matches([' ', '\t']);
    if trimmed.ends_with('\n') {
        format!("\n{}", &before[trimmed.len()..])
    } else {
        String::new()
    }
}

/// Reads the disk `el` of `/domain/devices`.
pub(crate) fn read(xml: &str, el: &Element) -> Result<Disk, XmlError> {
    let line = el.line;
    let device = el.attr("device").unwrap_or("disk");
    if !DEVICES.contains(&device) {
        return Err(invalid(
            line,
            format!(
                "<disk device='{device}'> is not a device libvirt knows: use one of {}",
                DEVICES.join(", ")
            ),
        ));
    }
    let declared = el.attr("type").unwrap_or("file");
    check_kind(declared, el)?;
    let within = "one <disk>";
    let src = single(el, "source", within)?;
    let target = single(el, "target", within)?;
    let driver = single(el, "driver", within)?;
    let format = driver.and_then(|d| d.attr("type")).map(str::to_owned);
    let readonly = single(el, "readonly", within)?.is_some();
    let own_enc = single(el, "encryption", within)?;
    let mirror_el = single(el, "mirror", within)?;
    let mut spans = Vec::new();
    let (kind, source, src_enc) = match src {
        Some(s) => (
            declared,
            source(declared, s)?,
            single(s, "encryption", "one <source>")?,
        ),
        // libvirt: a disk without <source> is an empty file disk.
        None => ("file", DiskSource::Other, None),
    };
    let enc = match (own_enc, src_enc) {
        (Some(a), Some(b)) => {
            return Err(invalid(
                b.line,
                format!(
                    "an <encryption> in <disk> (line {}) and another in its <source>: libvirt refuses two; keep one",
                    a.line
                ),
            ));
        }
        (Some(e), None) | (None, Some(e)) => Some(encryption(e, &mut spans)?),
        (None, None) => None,
    };
    let own_spans = spans.clone();
    let Some(target) = target else {
        return Err(invalid(
            line,
            "a <disk> needs <target dev='...'> (for example vda)",
        ));
    };
    let dev = match target.attr("dev") {
        Some(d) if !d.is_empty() => plain_value(d, "<target dev>", target.line)?,
        _ => {
            return Err(invalid(
                target.line,
                "<target> needs a dev attribute (for example vda)",
            ));
        }
    };
    let mut layers = Vec::new();
    chain(el, false, &mut layers, &mut spans)?;
    if let Some(m) = mirror_el {
        mirror(m, &mut layers, &mut spans)?;
    }
    if let Some(stray) = stray_encryption(el, &spans) {
        return Err(invalid(
            stray.line,
            "libvirt ignores an <encryption> here: it belongs directly in <disk> or in a <source>",
        ));
    }
    Ok(Disk {
        device: device.to_owned(),
        kind: kind.to_owned(),
        target: dev.to_owned(),
        source,
        format,
        readonly,
        encryption: enc,
        layers,
        line,
        end_tag: el.close,
        indent: indent(xml, el.close),
        encryption_spans: own_spans,
    })
}
