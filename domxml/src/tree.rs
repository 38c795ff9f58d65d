//! Well-formed XML to a small element tree (names, attribute values, text,
//! byte offsets, lines), with the checks libxml2 makes and quick-xml does
//! not: one root, no text outside it, XML 1.0 in UTF-8 only, legal
//! characters and names, `<` never inside an attribute value, no DOCTYPE,
//! bounded depth (the rules themselves are in `wellformed`). Used by `read`
//! only.

use crate::error::{XmlError, invalid, malformed};
use crate::wellformed::{check_decl, check_name, check_prefixes, check_value_chars, legal_char};
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
