//! Well-formed XML to a small element tree (names, attribute values, text,
//! byte offsets, lines), with the checks libxml2 makes and quick-xml does
//! not: one root, no text outside it, XML 1.0 in UTF-8 only, legal
//! characters and names, `<` never inside an attribute value, no DOCTYPE,
//! bounded depth. Used by `read` only.

use crate::error::{XmlError, invalid, malformed};
use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Deepest nesting accepted (libxml2 refuses more than 256 levels; no
/// domain comes near either).
pub(crate) const MAX_DEPTH: usize = 128;

/// One element: its name as written (`prefix:local` or `local`), attributes
/// in document order with their values normalized as XML says, children.
#[derive(Debug)]
pub(crate) struct Element {
    pub(crate) name: String,
    pub(crate) attrs: Vec<Attr>,
    pub(crate) children: Vec<Node>,
    /// Offset of the `<` of the start tag.
    pub(crate) start: usize,
    /// Offset of the `<` of the end tag (`end` for an empty element).
    pub(crate) close: usize,
    /// Offset just after the element.
    pub(crate) end: usize,
    /// 1-based line of the start tag.
    pub(crate) line: usize,
}

/// One attribute.
#[derive(Debug)]
pub(crate) struct Attr {
    pub(crate) name: String,
    pub(crate) value: String,
}

/// A child of an element. Adjacent text and references are one `Text`
/// (with whether references were part of it).
#[derive(Debug)]
pub(crate) enum Node {
    Element(Element),
    Text(String, bool),
    CData,
    Comment,
    Pi,
}

impl Element {
    /// Child elements.
    pub(crate) fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    /// The value of attribute `name` (exact name as written).
    pub(crate) fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.as_str())
    }
}

/// Counts lines up to an offset; offsets mostly grow, so it keeps its place.
struct Lines<'a> {
    xml: &'a [u8],
    pos: usize,
    line: usize,
}

impl Lines<'_> {
    fn at(&mut self, pos: usize) -> usize {
        let pos = pos.min(self.xml.len());
        if pos < self.pos {
            self.pos = 0;
            self.line = 1;
        }
        self.line += self.xml[self.pos..pos]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.pos = pos;
        self.line
    }
}

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
fn check_name(name: &str, what: &str, line: usize) -> Result<(), XmlError> {
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

fn check_value_chars(value: &str, what: &str, line: usize) -> Result<(), XmlError> {
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

fn element(e: &BytesStart<'_>, start: usize, line: usize) -> Result<Element, XmlError> {
    let name = e.name().0.to_owned();
    check_name(&name, "element name", line)?;
    // quick-xml takes `a='1'b='2'`; XML (and libxml2) need white space
    // between attributes.
    let mut quote = None;
    let mut chars = e.attributes_raw().chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            None if c == '\'' || c == '"' => quote = Some(c),
            Some(q) if c == q => {
                quote = None;
                if chars
                    .peek()
                    .is_some_and(|n| !matches!(n, ' ' | '\t' | '\r' | '\n' | '/'))
                {
                    return Err(malformed(
                        line,
                        format!("in <{name}>: attributes must be separated by white space"),
                    ));
                }
            }
            _ => {}
        }
    }
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| malformed(line, format!("in <{name}>: {err}")))?;
        let key = a.key.0.to_owned();
        check_name(&key, &format!("attribute name in <{name}>"), line)?;
        if a.value.contains('<') {
            return Err(malformed(
                line,
                format!("attribute {key} of <{name}> holds '<': write it as &lt;"),
            ));
        }
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|err| malformed(line, format!("attribute {key} of <{name}>: {err}")))?
            .into_owned();
        check_value_chars(&value, &format!("attribute {key} of <{name}>"), line)?;
        attrs.push(Attr { name: key, value });
    }
    Ok(Element {
        name,
        attrs,
        children: Vec::new(),
        start,
        close: 0,
        end: 0,
        line,
    })
}

fn push_text(stack: &mut [Element], s: &str, is_ref: bool) {
    if let Some(parent) = stack.last_mut() {
        if let Some(Node::Text(t, refs)) = parent.children.last_mut() {
            t.push_str(s);
            *refs |= is_ref;
        } else {
            parent.children.push(Node::Text(s.to_owned(), is_ref));
        }
    }
}

fn resolve_ref(name: &str, line: usize) -> Result<char, XmlError> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix('x') {
            Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                u32::from_str_radix(hex, 16).ok()
            }
            None if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) => num.parse().ok(),
            _ => None,
        };
        return match code.and_then(char::from_u32) {
            Some(c) if legal_char(c) => Ok(c),
            _ => Err(malformed(
                line,
                format!("&{name}; is not a character XML allows"),
            )),
        };
    }
    match name {
        "lt" => Ok('<'),
        "gt" => Ok('>'),
        "amp" => Ok('&'),
        "apos" => Ok('\''),
        "quot" => Ok('"'),
        other => Err(invalid(
            line,
            format!(
                "unknown entity &{other};: without a DTD only &lt; &gt; &amp; &apos; &quot; and character references exist"
            ),
        )),
    }
}

/// The XML declaration `decl` (`<?xml ... ?>`): `version` first, then
/// optionally `encoding`, then `standalone`, nothing else (libxml2's
/// grammar); version 1.0 and UTF-8 only.
fn check_decl(decl: &str) -> Result<(), XmlError> {
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

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(Node::Element(el)),
        None => *root = Some(el),
    }
}

/// Parses `xml` into its root element.
pub(crate) fn build(xml: &str) -> Result<Element, XmlError> {
    if xml.starts_with('\u{FEFF}') {
        return Err(invalid(
            1,
            "the document starts with a byte order mark: remove it",
        ));
    }
    let mut lines = Lines {
        xml: xml.as_bytes(),
        pos: 0,
        line: 1,
    };
    if let Some(bad) = xml.find(|c| !legal_char(c)) {
        let c = xml[bad..].chars().next().unwrap_or_default();
        return Err(malformed(
            lines.at(bad),
            format!("the character U+{:04X} is not allowed in XML", c as u32),
        ));
    }
    let mut reader = Reader::from_str(xml);
    let cfg = reader.config_mut();
    cfg.check_end_names = true;
    cfg.check_comments = true;
    cfg.allow_dangling_amp = false;
    cfg.allow_unmatched_ends = false;
    cfg.expand_empty_elements = false;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let start = reader.buffer_position() as usize;
        let ev = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => {
                let at = reader.error_position() as usize;
                return Err(malformed(lines.at(at), e.to_string()));
            }
        };
        let end = reader.buffer_position() as usize;
        let line = lines.at(start);
        let outside = stack.is_empty();
        match ev {
            Event::Decl(_) => {
                if start != 0 {
                    return Err(malformed(
                        line,
                        "an XML declaration is allowed only at the very start",
                    ));
                }
                check_decl(&xml[start..end])?;
            }
            Event::DocType(_) => {
                return Err(invalid(
                    line,
                    "a DOCTYPE is not allowed in domain XML: remove it",
                ));
            }
            Event::PI(p) => {
                let target = p.target();
                if target.eq_ignore_ascii_case("xml") {
                    return Err(malformed(
                        line,
                        "an XML declaration is allowed only at the very start",
                    ));
                }
                check_name(target, "processing instruction target", line)?;
                if target.contains(':') {
                    return Err(malformed(
                        line,
                        format!("processing instruction target {target:?} holds a colon"),
                    ));
                }
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(Node::Pi);
                }
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                if outside && root.is_some() {
                    return Err(malformed(
                        line,
                        format!("a second root element <{}>", e.name().0),
                    ));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(invalid(
                        line,
                        format!("elements nest more than {MAX_DEPTH} levels deep"),
                    ));
                }
                let mut el = element(e, start, line)?;
                if matches!(ev, Event::Empty(_)) {
                    el.close = end;
                    el.end = end;
                    attach(&mut stack, &mut root, el);
                } else {
                    stack.push(el);
                }
            }
            Event::End(_) => {
                // quick-xml checked that the name matches the open element.
                let Some(mut el) = stack.pop() else {
                    return Err(malformed(line, "an end tag without a start tag"));
                };
                el.close = start;
                el.end = end;
                attach(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                if xml[start..end].contains("]]>") {
                    return Err(malformed(
                        line,
                        "']]>' is not allowed in text: write ]]&gt;",
                    ));
                }
                let s = t.xml10_content();
                if outside {
                    if !s.chars().all(|c| matches!(c, ' ' | '\t' | '\n' | '\r')) {
                        return Err(malformed(line, "text outside the root element"));
                    }
                } else {
                    push_text(&mut stack, &s, false);
                }
            }
            Event::GeneralRef(r) => {
                if outside {
                    return Err(malformed(line, "a reference outside the root element"));
                }
                let c = resolve_ref(&r.xml10_content(), line)?;
                push_text(&mut stack, c.encode_utf8(&mut [0; 4]), true);
            }
            Event::CData(_) => {
                let Some(parent) = stack.last_mut() else {
                    return Err(malformed(line, "CDATA outside the root element"));
                };
                parent.children.push(Node::CData);
            }
            Event::Comment(_) => {
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(Node::Comment);
                }
            }
            Event::Eof => {
                if let Some(open) = stack.last() {
                    return Err(malformed(
                        lines.at(xml.len()),
                        format!("the document ends inside <{}>", open.name),
                    ));
                }
                break;
            }
        }
    }
    let root = root.ok_or_else(|| invalid(1, "no <domain> element"))?;
    check_prefixes(&root, &mut Vec::new())?;
    Ok(root)
}

/// Every prefix used is declared (`xmlns:p='...'`) on the element or
/// above it (libxml2 keeps an undeclared `p:name` as a plain name, other
/// parsers refuse it); no element has the prefix `xml` or `xmlns`; no two
/// attributes have the same namespace and local name; the XML and XMLNS
/// namespaces are bound to nothing else.
fn check_prefixes<'a>(
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
