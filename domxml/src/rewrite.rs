//! Gives disks the `<encryption>` naming their volume's libvirt secret by
//! splicing the original text: bytes outside the replaced `<encryption>`
//! elements (and the inserted `<uuid>`) stay exactly as written.

use crate::model::Domain;
use quick_xml::escape::escape;

/// The domain XML with `<encryption format='luks'>` naming secret UUID
/// `secret` on each disk given as (index into `domain.disks`, secret), the
/// disk's own `<encryption>` (in `<disk>` or its `<source>`) removed, and
/// `<uuid>` added after `<name>` when `add_uuid` is given. `secret` and
/// `add_uuid` should be canonical UUIDs; they are escaped whatever they
/// are. A disk given twice gets the last secret; an index past the disks
/// is ignored. Backing layers keep their own `<encryption>`.
///
/// # Panics
/// If `xml` is not the text `domain` was parsed from (its length differs).
pub fn rewrite(
    xml: &str,
    domain: &Domain,
    secrets: &[(usize, String)],
    add_uuid: Option<&str>,
) -> String {
    assert_eq!(
        xml.len(),
        domain.source_len,
        "rewrite() needs the text the domain was parsed from"
    );
    // (offset, bytes to remove, text to insert), applied back to front.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    if let Some(u) = add_uuid {
        edits.push((
            domain.name_end,
            0,
            format!("\n  <uuid>{}</uuid>", escape(u)),
        ));
    }
    let mut chosen: Vec<(usize, &str)> = Vec::new();
    for (i, secret) in secrets {
        if *i < domain.disks.len() {
            chosen.retain(|(j, _)| j != i);
            chosen.push((*i, secret));
        }
    }
    for (i, secret) in chosen {
        let d = &domain.disks[i];
        for (s, e) in &d.encryption_spans {
            // Take the element's own line with it: the whitespace before it,
            // back to and including the newline.
            let before = &xml[..*s];
            let kept = before.trim_end_matches([' ', '\t']);
            let start = match kept.strip_suffix('\n') {
                Some(k) => k.len(),
                None => *s,
            };
            edits.push((start, e - start, String::new()));
        }
        let lead = if d.indent.is_empty() { "" } else { "  " };
        edits.push((
            d.end_tag,
            0,
            format!(
                "{lead}<encryption format='luks'><secret type='passphrase' uuid='{}'/></encryption>{}",
                escape(secret),
                d.indent
            ),
        ));
    }
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = xml.to_owned();
    for (at, remove, insert) in edits {
        out.replace_range(at..at + remove, &insert);
    }
    out
}
