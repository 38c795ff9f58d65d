//! The well-formedness rules quick-xml leaves to its user and libxml2
//! (libvirt's parser) enforces: legal characters, namespace-well-formed
//! names, the XML declaration's grammar, declared and unreserved namespace
//! prefixes. Used by `tree` only.

use crate::error::{XmlError, invalid, malformed};
use crate::tree::Element;

/// Whether `c` may appear in an XML 1.0 document.
pub(crate) fn legal_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn name_start_char(c: char) -> bool {
    matches!(c,
        'A'..='Z' | 'a'..='z' | '_' | ':'
        | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
        | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}'
        | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}'
        | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}' | '\u{10000}'..='\u{EFFFF}')
}

fn name_char(c: char) -> bool {
    name_start_char(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// An XML name that is also a namespace-well-formed QName: one or two
/// NCNames (no colon, not starting with a digit, `-` or `.`) joined by a
/// colon.
pub(crate) fn check_name(name: &str, what: &str, line: usize) -> Result<(), XmlError> {
    let ncname = |part: &str| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| name_start_char(c) && c != ':')
            && chars.all(|c| name_char(c) && c != ':')
    };
    let ok = match name.split_once(':') {
        Some((prefix, local)) => ncname(prefix) && ncname(local),
        None => ncname(name),
    };
    if ok {
        Ok(())
    } else {
        Err(malformed(
            line,
            format!("{what} {name:?} is not a valid XML name"),
        ))
    }
}

pub(crate) fn check_value_chars(value: &str, what: &str, line: usize) -> Result<(), XmlError> {
    match value.chars().find(|c| !legal_char(*c)) {
        None => Ok(()),
        Some(c) => Err(malformed(
            line,
            format!(
                "{what} holds the character U+{:04X}, which XML does not allow",
                c as u32
            ),
        )),
    }
}

/// The XML declaration `decl` (`<?xml ... ?>`): `version` first, then
/// optionally `encoding`, then `standalone`, nothing else (libxml2's
/// grammar); version 1.0 and UTF-8 only.
pub(crate) fn check_decl(decl: &str) -> Result<(), XmlError> {
    let bad = |what: &str| malformed(1, format!("the XML declaration {decl:?}: {what}"));
    let mut rest = decl
        .strip_prefix("<?xml")
        .and_then(|r| r.strip_suffix("?>"))
        .ok_or_else(|| bad("not a declaration"))?;
    let mut seen = Vec::new();
    loop {
        let trimmed = rest.trim_start_matches([' ', '\t', '\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if trimmed.len() == rest.len() {
            return Err(bad("white space must separate its parts"));
        }
        let (name, after) = trimmed
            .split_once('=')
            .ok_or_else(|| bad("expected name='value'"))?;
        let name = name.trim_end_matches([' ', '\t', '\r', '\n']);
        let after = after.trim_start_matches([' ', '\t', '\r', '\n']);
        let quote = after.chars().next().filter(|q| *q == '\'' || *q == '"');
        let quote = quote.ok_or_else(|| bad("values must be quoted"))?;
        let (value, tail) = after[1..]
            .split_once(quote)
            .ok_or_else(|| bad("a value is not closed"))?;
        seen.push(name);
        let order_ok = match (name, seen.len()) {
            ("version", 1) => true,
            ("encoding", 2) => true,
            ("standalone", 2) => true,
            ("standalone", 3) => seen[1] == "encoding",
            _ => false,
        };
        if !order_ok {
            return Err(bad(
                "only version, encoding and standalone, in that order, may appear",
            ));
        }
        match name {
            "version" if value != "1.0" => {
                return Err(invalid(
                    1,
                    format!("XML version {value:?}: write version='1.0'"),
                ));
            }
            "encoding" if !value.eq_ignore_ascii_case("utf-8") => {
                return Err(invalid(
                    1,
                    format!(
                        "encoding {value:?}: guestkey reads UTF-8 only; write encoding='UTF-8' or leave it out"
                    ),
                ));
            }
            "standalone" if value != "yes" && value != "no" => {
                return Err(bad("standalone must be 'yes' or 'no'"));
            }
            _ => {}
        }
        rest = tail;
    }
    if seen.is_empty() {
        return Err(bad("it needs version='1.0'"));
    }
    Ok(())
}

/// Every prefix used is declared (`xmlns:p='...'`) on the element or
/// above it (libxml2 keeps an undeclared `p:name` as a plain name, other
/// parsers refuse it); no element has the prefix `xml` or `xmlns`; no two
/// attributes have the same namespace and local name; the XML and XMLNS
/// namespaces are bound to nothing else.
pub(crate) fn check_prefixes<'a>(
    el: &'a Element,
    scope: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), XmlError> {
    const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
    const RESERVED: [&str; 2] = [XML_NS, "http://www.w3.org/2000/xmlns/"];
    let bad = |what: String| Err(malformed(el.line, what));
    for a in &el.attrs {
        let prefix = a.name.strip_prefix("xmlns:");
        if a.name != "xmlns" && prefix.is_none() {
            continue;
        }
        if RESERVED.contains(&a.value.as_str())
            || matches!(prefix, Some("xml" | "xmlns"))
            || (prefix.is_some() && a.value.is_empty())
        {
            return bad(format!(
                "the namespace declaration {}='{}' on <{}> is not allowed",
                a.name, a.value, el.name
            ));
        }
    }
    let before = scope.len();
    scope.extend(
        el.attrs
            .iter()
            .filter_map(|a| a.name.strip_prefix("xmlns:").map(|p| (p, a.value.as_str()))),
    );
    let uri = |p: &str| -> Option<&str> {
        if p == "xml" {
            return Some(XML_NS);
        }
        scope.iter().rev().find(|(q, _)| *q == p).map(|(_, u)| *u)
    };
    if let Some((p, _)) = el.name.split_once(':') {
        if p == "xml" || p == "xmlns" {
            return bad(format!(
                "the element <{}> has the reserved prefix {p}:",
                el.name
            ));
        }
        if uri(p).is_none() {
            return bad(format!(
                "the namespace prefix {p}: in <{}> is not declared: add xmlns:{p}='...' or remove the prefix",
                el.name
            ));
        }
    }
    let mut expanded: Vec<(&str, &str)> = Vec::new();
    for a in &el.attrs {
        let Some((p, local)) = a.name.split_once(':') else {
            continue;
        };
        if p == "xmlns" {
            continue;
        }
        let Some(u) = uri(p) else {
            return bad(format!(
                "the namespace prefix {p}: in <{}> is not declared: add xmlns:{p}='...' or remove the prefix",
                el.name
            ));
        };
        if expanded.contains(&(u, local)) {
            return bad(format!(
                "<{}> has two attributes {local} in the namespace {u}",
                el.name
            ));
        }
        expanded.push((u, local));
    }
    for c in el.elements() {
        check_prefixes(c, scope)?;
    }
    scope.truncate(before);
    Ok(())
}
