//! libvirt domain XML: finds the disks of a domain and gives each managed
//! disk the `<encryption>` element naming its volume's libvirt secret.
//!
//! The rewrite splices the original text: bytes outside the replaced
//! `<encryption>` elements (and the inserted `<uuid>`, if the domain had
//! none) are left exactly as the operator wrote them.
//!
//! Input limits: at most [`MAX_XML`] bytes, no DOCTYPE (no entity
//! definitions, so no entity expansion), root element `<domain>`.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Largest domain XML accepted.
pub const MAX_XML: usize = 1 << 20;

/// Why the XML was refused; names the line where it can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Too large.
    #[error("domain XML is {0} bytes, more than the 1 MiB limit")]
    TooLarge(usize),
    /// Not well-formed.
    #[error("domain XML is not well-formed (line {line}): {message}")]
    Malformed {
        /// 1-based line.
        line: usize,
        /// Parser's words.
        message: String,
    },
    /// Valid XML that is not a usable domain.
    #[error("domain XML (line {line}): {message}")]
    Invalid {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Where a disk's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `<disk type='volume'><source pool='P' volume='V'/>`
    Volume {
        /// Pool.
        pool: String,
        /// Volume name.
        volume: String,
    },
    /// `<disk type='file'><source file='PATH'/>`
    File(String),
    /// Anything else (block, network, no source).
    Other,
}

/// One `<disk>` of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `device` attribute (`disk`, `cdrom`...).
    pub device: String,
    /// `<target dev>`, e.g. `vda`.
    pub target: String,
    /// Source.
    pub source: DiskSource,
    /// 1-based line of the `<disk>` element.
    pub line: usize,
    // Byte offsets for the rewrite.
    end_tag: usize,
    indent: String,
    encryption_spans: Vec<(usize, usize)>,
}

/// What the domain XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, if present.
    pub uuid: Option<String>,
    /// Disks in document order.
    pub disks: Vec<Disk>,
    name_end: usize,
}

fn line_of(xml: &str, pos: usize) -> usize {
    xml.as_bytes()[..pos.min(xml.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn attr(e: &BytesStart<'_>, key: &str, xml: &str, pos: usize) -> Result<Option<String>, XmlError> {
    for a in e.attributes() {
        let a = a.map_err(|err| XmlError::Malformed {
            line: line_of(xml, pos),
            message: err.to_string(),
        })?;
        if a.key.0 == key {
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| XmlError::Malformed {
                    line: line_of(xml, pos),
                    message: err.to_string(),
                })?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

/// Parses a domain's name, UUID and disks.
pub fn parse(xml: &str) -> Result<Domain, XmlError> {
    if xml.len() > MAX_XML {
        return Err(XmlError::TooLarge(xml.len()));
    }
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<String> = Vec::new();
    let mut domain = Domain {
        name: String::new(),
        uuid: None,
        disks: vec![],
        name_end: 0,
    };
    let mut disk: Option<(Disk, String)> = None; // (disk, type attribute)
    let mut text = String::new();
    let mut last_text = String::new();
    let mut seen_root = false;
    loop {
        let start = reader.buffer_position() as usize;
        let ev = reader.read_event().map_err(|e| XmlError::Malformed {
            line: line_of(xml, reader.error_position() as usize),
            message: e.to_string(),
        })?;
        let end = reader.buffer_position() as usize;
        let invalid = |message: String| XmlError::Invalid {
            line: line_of(xml, start),
            message,
        };
        match ev {
            Event::DocType(_) => {
                return Err(invalid("a DOCTYPE is not allowed in domain XML".into()));
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = e.name().0.to_owned();
                let empty = matches!(ev, Event::Empty(_));
                if stack.is_empty() {
                    if seen_root || name != "domain" {
                        return Err(invalid(format!(
                            "the root element must be <domain>, found <{name}>"
                        )));
                    }
                    seen_root = true;
                }
                let parent = stack.last().map(String::as_str);
                let path_is = |p: &[&str]| stack.iter().map(String::as_str).eq(p.iter().copied());
                match (name.as_str(), parent) {
                    ("disk", Some("devices")) if path_is(&["domain", "devices"]) && !empty => {
                        let kind = attr(e, "type", xml, start)?.unwrap_or_default();
                        let device =
                            attr(e, "device", xml, start)?.unwrap_or_else(|| "disk".into());
                        disk = Some((
                            Disk {
                                device,
                                target: String::new(),
                                source: DiskSource::Other,
                                line: line_of(xml, start),
                                end_tag: 0,
                                indent: String::new(),
                                encryption_spans: vec![],
                            },
                            kind,
                        ));
                    }
                    ("source", Some("disk")) if disk.is_some() => {
                        if let Some((d, kind)) = disk.as_mut() {
                            d.source = match kind.as_str() {
                                "volume" => match (attr(e, "pool", xml, start)?, attr(e, "volume", xml, start)?) {
                                    (Some(pool), Some(volume)) => DiskSource::Volume { pool, volume },
                                    _ => return Err(invalid("a <disk type='volume'> source needs pool and volume attributes".into())),
                                },
                                "file" => match attr(e, "file", xml, start)? {
                                    Some(f) => DiskSource::File(f),
                                    None => DiskSource::Other,
                                },
                                _ => DiskSource::Other,
                            };
                        }
                    }
                    ("target", Some("disk")) => {
                        if let Some((d, _)) = disk.as_mut() {
                            d.target = attr(e, "dev", xml, start)?.unwrap_or_default();
                        }
                    }
                    ("encryption", Some("disk" | "source")) if disk.is_some() => {
                        if let Some((d, _)) = disk.as_mut() {
                            if empty {
                                d.encryption_spans.push((start, end));
                            } else {
                                // Skip to the matching end tag.
                                let end_ev = reader.read_to_end(e.name()).map_err(|err| {
                                    XmlError::Malformed {
                                        line: line_of(xml, start),
                                        message: err.to_string(),
                                    }
                                })?;
                                let _ = end_ev;
                                d.encryption_spans
                                    .push((start, reader.buffer_position() as usize));
                            }
                        }
                        continue;
                    }
                    _ => {}
                }
                if !empty {
                    stack.push(name);
                    text.clear();
                }
            }
            Event::End(ref e) => {
                let name = e.name().0.to_owned();
                let parent_path: Vec<&str> = stack.iter().map(String::as_str).collect();
                match (name.as_str(), parent_path.as_slice()) {
                    ("name", ["domain", "name"]) => {
                        domain.name = text.trim().to_owned();
                        domain.name_end = end;
                    }
                    ("uuid", ["domain", "uuid"]) => domain.uuid = Some(text.trim().to_owned()),
                    ("disk", ["domain", "devices", "disk"]) => {
                        if let Some((mut d, _)) = disk.take() {
                            d.end_tag = start;
                            d.indent = last_text
                                .rsplit('\n')
                                .next()
                                .map(|s| format!("\n{s}"))
                                .unwrap_or_default();
                            domain.disks.push(d);
                        }
                    }
                    _ => {}
                }
                stack.pop();
                text.clear();
            }
            Event::Text(t) => {
                let s = t.xml10_content();
                text.push_str(&s);
                last_text = s.into_owned();
                continue;
            }
            Event::GeneralRef(r) => {
                // Only the predefined entities and character references exist
                // without a DTD.
                let s = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => match &*r.xml10_content() {
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "amp" => "&".into(),
                        "apos" => "'".into(),
                        "quot" => "\"".into(),
                        other => return Err(invalid(format!("unknown entity &{other};"))),
                    },
                };
                text.push_str(&s);
                continue;
            }
            Event::Eof => {
                if let Some(open) = stack.last() {
                    return Err(XmlError::Malformed {
                        line: line_of(xml, xml.len()),
                        message: format!("the document ends inside <{open}>"),
                    });
                }
                break;
            }
            _ => {}
        }
        last_text.clear();
    }
    if !seen_root {
        return Err(XmlError::Invalid {
            line: 1,
            message: "no <domain> element".into(),
        });
    }
    if domain.name.is_empty() {
        return Err(XmlError::Invalid {
            line: 1,
            message: "the domain has no <name>".into(),
        });
    }
    if let Some(u) = &domain.uuid {
        if uuid::Uuid::parse_str(u).is_err() {
            return Err(XmlError::Invalid {
                line: 1,
                message: format!("<uuid> {u:?} is not a UUID"),
            });
        }
    }
    Ok(domain)
}

/// The domain XML with `<encryption>` set on the disks given as
/// (index into `domain.disks`, libvirt secret UUID), any other
/// `<encryption>` of those disks removed, and `<uuid>` added after `<name>`
/// when `add_uuid` is given.
pub fn rewrite(
    xml: &str,
    domain: &Domain,
    secrets: &[(usize, String)],
    add_uuid: Option<&str>,
) -> String {
    // (offset, bytes to remove, text to insert), applied back to front.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    if let Some(u) = add_uuid {
        edits.push((domain.name_end, 0, format!("\n  <uuid>{u}</uuid>")));
    }
    for (i, secret) in secrets {
        let d = &domain.disks[*i];
        for (s, e) in &d.encryption_spans {
            // Take the element's own line with it: the whitespace before it,
            // back to and including the newline.
            let before = &xml[..*s];
            let ws = before.len() - before.trim_end_matches([' ', '\t']).len();
            let start = if before[..before.len() - ws].ends_with('\n') {
                s - ws - 1
            } else {
                *s
            };
            edits.push((start, e - start, String::new()));
        }
        edits.push((
            d.end_tag,
            0,
            format!("  <encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption>{}", d.indent),
        ));
    }
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = xml.to_owned();
    for (at, remove, insert) in edits {
        out.replace_range(at..at + remove, &insert);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let out = rewrite(XML, &d, &[(0, "aaaa".into()), (1, "bbbb".into())], Some(u));
        assert!(
            !out.contains("00000000-0000-0000-0000-000000000000"),
            "{out}"
        );
        assert_eq!(
            out.matches(
                "<encryption format='luks'><secret type='passphrase' uuid='aaaa'/></encryption>"
            )
            .count(),
            1,
            "{out}"
        );
        assert_eq!(out.matches("uuid='bbbb'").count(), 1);
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
                &[(0, "aaaa".into()), (1, "bbbb".into())],
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
}
