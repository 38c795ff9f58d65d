//! Checks of the few values guestkey reads: text-only elements, UUIDs in
//! canonical form, names and attribute values without control characters.

use crate::error::{XmlError, invalid};
use crate::tree::{Element, Node};

/// The text of an element that must hold text only (`<name>`, `<uuid>`).
/// libvirt reads the string value of the element: all text inside it,
/// CDATA and child elements' text included, comments left out. Anything
/// but plain text could make two readers disagree, so it is refused.
pub(crate) fn text_only<'a>(el: &'a Element, what: &str) -> Result<&'a str, XmlError> {
    Ok(text_refs(el, what)?.0)
}

/// [`text_only`], and whether the text holds character or entity
/// references.
pub(crate) fn text_refs<'a>(el: &'a Element, what: &str) -> Result<(&'a str, bool), XmlError> {
    let mut text = ("", false);
    for n in &el.children {
        match n {
            Node::Text(t, refs) => text = (t, *refs),
            Node::Element(c) => {
                return Err(invalid(
                    c.line,
                    format!("{what} must hold text only, not <{}>: remove it", c.name),
                ));
            }
            Node::CData => {
                return Err(invalid(
                    el.line,
                    format!("{what} holds a CDATA section: write its text plainly"),
                ));
            }
            Node::Comment => {
                return Err(invalid(
                    el.line,
                    format!("{what} holds a comment: remove it"),
                ));
            }
            Node::Pi => {
                return Err(invalid(
                    el.line,
                    format!("{what} holds a processing instruction: remove it"),
                ));
            }
        }
    }
    Ok(text)
}

/// Whether `s` is a UUID as libvirt writes it: 8-4-4-4-12 lower-case hex.
pub(crate) fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

/// What libvirt's own lax reading of `s` gives (it skips surrounding white
/// space and any `-` or ` ` between hex digit pairs, and takes upper
/// case), in canonical form; only used to suggest the right spelling.
fn libvirt_reading(s: &str) -> Option<String> {
    let mut digits = String::with_capacity(32);
    let mut rest = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    while digits.len() < 32 {
        let mut it = rest.chars();
        match (it.next()?, it.next()) {
            ('-' | ' ', _) => rest = &rest[1..],
            (a, Some(b)) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {
                digits.push(a.to_ascii_lowercase());
                digits.push(b.to_ascii_lowercase());
                rest = &rest[2..];
            }
            _ => return None,
        }
    }
    if !rest.chars().all(|c| c.is_ascii_whitespace()) {
        return None;
    }
    uuid::Uuid::parse_str(&digits)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

/// `value` if it is a canonical UUID; otherwise says how to write it.
pub(crate) fn canonical_uuid(value: &str, what: &str, line: usize) -> Result<String, XmlError> {
    if is_canonical_uuid(value) {
        return Ok(value.to_owned());
    }
    let how = "write it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (lower-case hex digits, no spaces or braces)";
    Err(invalid(
        line,
        match libvirt_reading(value) {
            Some(c) => format!(
                "{what} {value:?} is not in canonical form, which libvirt and guestkey could compare differently: {how}: {c}"
            ),
            None => format!("{what} {value:?} is not a UUID: {how}"),
        },
    ))
}

/// The domain name, which libvirt takes exactly as written.
pub(crate) fn check_name(name: &str, line: usize) -> Result<(), XmlError> {
    if name.is_empty() {
        return Err(invalid(
            line,
            "the domain has no <name>: add <name>NAME</name>",
        ));
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err(invalid(
            line,
            format!(
                "<name> {name:?} starts or ends with white space, which libvirt keeps as part of the name: remove it"
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(
            line,
            format!("<name> {name:?} holds a control character (tab, new line...): remove it"),
        ));
    }
    Ok(())
}

/// An attribute value guestkey reads: no control characters (a `&#10;`
/// would survive in it where a literal new line becomes a space).
pub(crate) fn plain_value<'a>(
    value: &'a str,
    what: &str,
    line: usize,
) -> Result<&'a str, XmlError> {
    if value.chars().any(char::is_control) {
        return Err(invalid(
            line,
            format!("{what} {value:?} holds a control character: remove it"),
        ));
    }
    Ok(value)
}
