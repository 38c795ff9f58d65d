//! What guestkeyctl prints: the primitives here (tables, key/value
//! blocks, JSON, sizes, times), the renderings of each kind of server
//! answer in `views` (escrow requests in `escrow`), the progress line and terminal progress bar in
//! `progress`. Everything returns text and is snapshot-tested from fixed
//! protobuf values (`tests`); only `emit` and `print_json` print. Imports
//! the protobuf types and nothing of the subcommand groups; every group
//! imports it.

mod escrow;
mod progress;
#[cfg(test)]
mod tests;
mod views;

pub(crate) use escrow::*;
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
/// two spaces apart, trailing spaces trimmed, never wrapped.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(headers.to_vec())
        .add_rows(rows);
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t.trim_fmt() + "\n"
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

/// A byte size in binary units (powers of 1024): a whole multiple of its
/// largest unit as it is (`10G`, `64M`, `1536M`, `1000B`), any other size
/// with one decimal (`460.0M`).
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut i = 0;
    while i + 1 < UNITS.len()
        && bytes >= 1 << (10 * (i + 1))
        && bytes.is_multiple_of(1 << (10 * (i + 1)))
    {
        i += 1;
    }
    if i == 0 && bytes >= 1024 {
        return bytesize::ByteSize::b(bytes)
            .display()
            .iec_short()
            .to_string();
    }
    format!("{}{}", bytes >> (10 * i), UNITS[i])
}

/// Unix seconds as `2026-12-01 09:30:00Z`; `-` for none (0).
pub(crate) fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    mgmt_server::names::format_utc(unix).unwrap_or_else(|| unix.to_string())
}

/// Now, Unix seconds.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
