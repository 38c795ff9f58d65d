//! The strict reading of a domain: the tree from `tree`, then the rules that
//! keep guestkey's reading and libvirt's the same (namespaces, singletons,
//! `<name>`, `<uuid>`, `<sysinfo>` UUIDs, where disks may be). Disks are
//! read by `disk`.

use crate::disk;
use crate::error::{XmlError, invalid};
use crate::model::Domain;
use crate::text::{canonical_uuid, check_name, text_only, text_refs};
use crate::tree::{self, Element};
use std::collections::HashMap;

/// The one child element of `parent` named `name`, if any; a second one is
/// refused, since libvirt reads only the first and a reader that keeps the
/// last would disagree with it.
pub(crate) fn single<'a>(
    parent: &'a Element,
    name: &str,
    within: &str,
) -> Result<Option<&'a Element>, XmlError> {
    let mut found = parent.elements().filter(|e| e.name == name);
    let first = found.next();
    if let (Some(first), Some(second)) = (first, found.next()) {
        return Err(invalid(
            second.line,
            format!(
                "a second <{name}> in {within} (the first is on line {}): libvirt reads only the first; keep one",
                first.line
            ),
        ));
    }
    Ok(first)
}

/// Namespace rules, over the whole document but `<metadata>` and the
/// prefixed extension elements of `<domain>` (`<qemu:commandline>`...),
/// whose insides libvirt hands to their owners untouched.
///
/// libvirt finds elements by XPath, which matches an unprefixed name only
/// outside any namespace: a default namespace (`xmlns='...'`) hides the
/// elements under it from libvirt, so it is refused. libvirt reads
/// attributes with `xmlGetProp`, which ignores prefixes: `x:type='block'`
/// is read as `type`, so prefixed attributes are refused. A prefixed
/// element inside the domain's own elements is ignored by libvirt and
/// would mislead a reader: refused too. And `<disk>` elements count only
/// as `/domain/devices/disk`.
fn check_tree(el: &Element, path: &mut Vec<String>) -> Result<(), XmlError> {
    let at_top = path.len() == 1;
    let here = || {
        path.last()
            .map(|p| format!("inside <{p}>"))
            .unwrap_or_else(|| "at the top".into())
    };
    if el.name.contains(':') && !at_top {
        return Err(invalid(
            el.line,
            format!(
                "<{}> {} has a namespace prefix; libvirt ignores such elements here: remove it",
                el.name,
                here()
            ),
        ));
    }
    for a in &el.attrs {
        if a.name == "xmlns" {
            return Err(invalid(
                el.line,
                format!(
                    "xmlns='{}' on <{}> puts it and what is inside it in a namespace, where libvirt no longer finds them: remove it",
                    a.value, el.name
                ),
            ));
        }
        if a.name.starts_with("xmlns:") {
            // Checked by `tree`; a declared prefix changes nothing unprefixed.
            continue;
        }
        if let Some((_, local)) = a.name.split_once(':') {
            return Err(invalid(
                el.line,
                format!(
                    "attribute {} of <{}> has a namespace prefix, and libvirt ignores prefixes (it reads it as {local}): remove the prefix or the attribute",
                    a.name, el.name
                ),
            ));
        }
    }
    if el.name == "disk" && path.iter().map(String::as_str).ne(["domain", "devices"]) {
        return Err(invalid(
            el.line,
            format!(
                "a <disk> {}: libvirt reads only the disks of /domain/devices; move it into <devices>",
                here()
            ),
        ));
    }
    if el.name.contains(':') || (at_top && el.name == "metadata") {
        // Opaque to libvirt: handed to the extension's or application's owner.
        return Ok(());
    }
    path.push(el.name.clone());
    for c in el.elements() {
        check_tree(c, path)?;
    }
    path.pop();
    Ok(())
}

/// The text of a UUID element: plain, not empty.
fn uuid_text<'a>(el: &'a Element, what: &str) -> Result<&'a str, XmlError> {
    let (text, refs) = text_refs(el, what)?;
    if refs {
        return Err(invalid(
            el.line,
            format!("{what} holds a character or entity reference: write the UUID plainly"),
        ));
    }
    if text.is_empty() {
        return Err(invalid(
            el.line,
            format!(
                "{what} is empty, which libvirt reads as no UUID at all: write the UUID in it or remove the element"
            ),
        ));
    }
    Ok(text)
}

/// Every `<sysinfo><system><entry name='uuid'>` must be the domain's
/// `<uuid>`: libvirt refuses a mismatch, and takes the entry as the
/// domain's UUID when `<uuid>` is missing (guestkey would make a new one).
fn check_sysinfo(root: &Element, uuid: Option<&str>) -> Result<(), XmlError> {
    for sys in root.elements().filter(|e| e.name == "sysinfo") {
        for system in sys.elements().filter(|e| e.name == "system") {
            for entry in system
                .elements()
                .filter(|e| e.name == "entry" && e.attr("name") == Some("uuid"))
            {
                let what = "<sysinfo> <entry name='uuid'>";
                let u = canonical_uuid(uuid_text(entry, what)?, what, entry.line)?;
                match uuid {
                    None => {
                        return Err(invalid(
                            entry.line,
                            format!(
                                "{what} is {u} but the domain has no <uuid>, so libvirt would take this one: add <uuid>{u}</uuid> after <name>"
                            ),
                        ));
                    }
                    Some(d) if d != u => {
                        return Err(invalid(
                            entry.line,
                            format!(
                                "{what} is {u}, not the domain's <uuid> {d}: make them the same"
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
    }
    Ok(())
}

/// Reads `xml` strictly (see the crate documentation).
pub(crate) fn domain(xml: &str) -> Result<Domain, XmlError> {
    if xml.len() > crate::MAX_XML {
        return Err(XmlError::TooLarge(xml.len()));
    }
    let root = tree::build(xml)?;
    if root.name != "domain" {
        return Err(invalid(
            root.line,
            format!("the root element must be <domain>, found <{}>", root.name),
        ));
    }
    check_tree(&root, &mut Vec::new())?;
    let top = "<domain>";
    let Some(name_el) = single(&root, "name", top)? else {
        return Err(invalid(
            root.line,
            "the domain has no <name>: add <name>NAME</name>",
        ));
    };
    let name = text_only(name_el, "<name>")?;
    check_name(name, name_el.line)?;
    let uuid = match single(&root, "uuid", top)? {
        None => None,
        Some(u) => {
            let text = uuid_text(u, "<uuid>")?;
            Some(canonical_uuid(text, "<uuid>", u.line)?)
        }
    };
    check_sysinfo(&root, uuid.as_deref())?;
    let mut disks = Vec::new();
    if let Some(devices) = single(&root, "devices", top)? {
        for d in devices.elements().filter(|e| e.name == "disk") {
            disks.push(disk::read(xml, d)?);
        }
    }
    let mut targets: HashMap<&str, usize> = HashMap::new();
    for d in &disks {
        if let Some(first) = targets.insert(&d.target, d.line) {
            return Err(invalid(
                d.line,
                format!(
                    "a second disk with target dev='{}' (the first is on line {first}): give each disk its own target",
                    d.target
                ),
            ));
        }
    }
    Ok(Domain {
        name: name.to_owned(),
        uuid,
        disks,
        name_end: name_el.end,
        source_len: xml.len(),
    })
}
