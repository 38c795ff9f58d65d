//! What guestkeyctl prints: the primitives here (tables, key/value
//! blocks, JSON, sizes, times), the renderings of each kind of server
//! answer in `views`, the progress line and terminal progress bar in
//! `progress`. Everything returns text and is snapshot-tested from fixed
//! protobuf values (`tests`); only `emit` and `print_json` print. Imports
//! the protobuf types and nothing of the subcommand groups; every group
//! imports it.

mod progress;
#[cfg(test)]
mod tests;
mod views;

pub(crate) use progress::{Bar, progress_line};
pub(crate) use views::*;

/// Prints `doc` as JSON when `json`, else `text` as it is.
pub(crate) fn emit(json: bool, doc: serde_json::Value, text: String) {
    if json {
        print_json(&doc);
    } else {
        print!("{text}");
    }
}

/// Prints `v` as pretty JSON and a newline.
pub(crate) fn print_json(v: &serde_json::Value) {
    print!("{}", json_text(v));
}

/// `v` as pretty JSON and a newline.
pub(crate) fn json_text(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// A table: a header row, then one line per row; columns left-aligned,
/// two spaces apart, trailing spaces trimmed.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
    out
}

/// Whether a key/value block shows rows whose value is empty.
#[derive(Clone, Copy)]
pub(crate) enum Empty {
    Show,
    Skip,
}

/// A key/value block: each key padded to `width`, a space, the value.
pub(crate) fn fields(width: usize, rows: &[(&str, String)], empty: Empty) -> String {
    let mut out = String::new();
    for (k, v) in rows {
        if v.is_empty() && matches!(empty, Empty::Skip) {
            continue;
        }
        out.push_str(&format!("{k:<width$} {v}\n"));
    }
    out
}

/// A byte size in binary units: `10G`, `64M`, `1000B`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut i = 0;
    while i + 1 < UNITS.len()
        && bytes >= 1 << (10 * (i + 1))
        && bytes.is_multiple_of(1 << (10 * (i + 1)))
    {
        i += 1;
    }
    format!("{}{}", bytes >> (10 * i), UNITS[i])
}

/// Unix seconds as `2026-12-01 09:30:00Z`; `-` for none (0).
pub(crate) fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| unix.to_string())
}
