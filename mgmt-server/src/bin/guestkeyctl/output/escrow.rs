//! The renderings of escrow requests and packets (`volume escrow`,
//! `escrow list|approve|deny|fetch`): text and JSON, pinned by the
//! snapshots below.

use guestkey_proto::admin as pb;
use serde_json::{Value, json};

use super::{Empty, fields, table, time};

/// An escrow request as JSON.
pub(crate) fn escrow_json(e: &pb::EscrowEntry) -> Value {
    json!({"id": e.id, "volume_id": e.volume_id, "volume_name": e.volume_name, "host": e.host,
           "generation": e.generation, "recipients": e.recipients, "reason": e.reason,
           "requested_by": e.requested_by, "requested_unix": e.requested_unix,
           "state": e.state, "decided_by": e.decided_by, "decided_unix": e.decided_unix,
           "note": e.note, "obsolete": e.obsolete, "luks_uuid": e.luks_uuid,
           "packet_bytes": e.packet_bytes})
}

/// The state as listed: a made packet is `current` or `obsolete`.
fn shown_state(e: &pb::EscrowEntry) -> String {
    match (e.state.as_str(), e.obsolete) {
        ("made", true) => "obsolete".into(),
        ("made", false) => "current".into(),
        (s, _) => s.to_owned(),
    }
}

/// A recipient shortened: `age1` and its first and last characters.
fn short_recipient(r: &str) -> String {
    let chars: Vec<char> = r.chars().collect();
    if chars.len() <= 16 {
        return r.to_owned();
    }
    let head: String = chars[..10].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// The recipients shortened: the first two, then how many more.
fn short_recipients(rs: &[String]) -> String {
    let mut out: Vec<String> = rs.iter().take(2).map(|r| short_recipient(r)).collect();
    if rs.len() > 2 {
        out.push(format!("+{}", rs.len() - 2));
    }
    out.join(",")
}

/// A duration in its largest whole unit: `45s`, `12m`, `3h`, `2d`.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `escrow list` as a table; `now` for each request's age.
pub(crate) fn escrow_table(es: &[pb::EscrowEntry], now: i64) -> String {
    if es.is_empty() {
        return "no escrow request (pending or current; --all shows every one)\n".into();
    }
    table(
        &[
            "ID",
            "VOLUME",
            "GEN",
            "STATE",
            "REQUESTED BY",
            "DECIDED BY",
            "RECIPIENTS",
            "AGE",
        ],
        es.iter()
            .map(|e| {
                vec![
                    e.id.clone(),
                    e.volume_name.clone(),
                    e.generation.to_string(),
                    shown_state(e),
                    e.requested_by.clone(),
                    if e.decided_by.is_empty() {
                        "-".into()
                    } else {
                        e.decided_by.clone()
                    },
                    short_recipients(&e.recipients),
                    age(now - e.requested_unix),
                ]
            })
            .collect(),
    )
}

/// An escrow request as a key/value block.
pub(crate) fn escrow_text(e: &pb::EscrowEntry) -> String {
    let mut rows = vec![
        ("id", e.id.clone()),
        ("volume", format!("{} ({})", e.volume_name, e.volume_id)),
        ("host", e.host.clone()),
        ("generation", e.generation.to_string()),
        ("state", shown_state(e)),
        ("recipients", e.recipients.join(" ")),
        ("reason", e.reason.clone()),
        ("requested by", e.requested_by.clone()),
        ("requested", time(e.requested_unix)),
        ("decided by", e.decided_by.clone()),
    ];
    if e.decided_unix > 0 {
        rows.push(("decided", time(e.decided_unix)));
    }
    rows.push(("note", e.note.clone()));
    rows.push(("luks uuid", e.luks_uuid.clone()));
    if e.packet_bytes > 0 {
        rows.push(("packet", format!("{} bytes", e.packet_bytes)));
    }
    fields(12, &rows, Empty::Skip)
}

/// `volume escrow`: the request, and what the second admin runs.
pub(crate) fn escrow_requested_text(e: &pb::EscrowEntry) -> String {
    format!(
        "{}\nescrow request {} waits for another admin's approval (two-person rule):\n  guestkeyctl escrow approve {}\nit expires in 7 days if not decided\n",
        escrow_text(e),
        e.id,
        e.id
    )
}

/// `escrow approve|deny`: the outcome, and for a made packet how to get it.
pub(crate) fn escrow_decided_text(e: &pb::EscrowEntry) -> String {
    let next = if e.state == "made" {
        format!(
            "the packet is on the server: guestkeyctl escrow fetch {} --out FILE\n",
            e.id
        )
    } else {
        String::new()
    };
    format!("{}{next}", escrow_text(e))
}

/// `escrow fetch`: where the packet went and how to open it.
pub(crate) fn escrow_fetched_text(
    id: &str,
    file: &str,
    bytes: usize,
    entry: Option<&pb::EscrowEntry>,
) -> String {
    let mut out = format!(
        "wrote escrow packet {id} ({bytes} bytes) to {file}\nopen it offline with: guestkey-recover show {file} --identity IDENTITY\n"
    );
    match entry {
        Some(e) if e.obsolete => out.push_str(&format!(
            "warning: this packet is obsolete: it holds key generation {} of volume {}, which was rekeyed, deleted or decrypted since; it opens nothing now\n",
            e.generation, e.volume_name
        )),
        Some(_) => {}
        None => out.push_str(
            "warning: the request is not among the 1000 newest: whether the packet is current is not known (`guestkeyctl volume show` gives the volume's generation)\n",
        ),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_796_119_200;

    fn entry(id: &str, state: &str, obsolete: bool, recipients: usize) -> pb::EscrowEntry {
        pb::EscrowEntry {
            id: id.into(),
            volume_id: "6f1c2b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f".into(),
            volume_name: "web-disk".into(),
            host: "kvm-a".into(),
            generation: 3,
            recipients: (0..recipients)
                .map(|i| {
                    format!("age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8{i}")
                })
                .collect(),
            reason: "yearly offline copy".into(),
            requested_by: "admin:alice".into(),
            requested_unix: T - 7200,
            state: state.into(),
            decided_by: if state == "pending" {
                String::new()
            } else {
                "admin:bob".into()
            },
            decided_unix: if state == "pending" { 0 } else { T - 3600 },
            note: String::new(),
            obsolete,
            luks_uuid: if state == "made" {
                "0d6f1a3e-7c2b-4e59-9a41-3b8c5d2e1f00".into()
            } else {
                String::new()
            },
            packet_bytes: if state == "made" { 1234 } else { 0 },
        }
    }

    #[test]
    fn renderings() {
        let es = [
            entry("es-0a1b2c3d4e5f", "pending", false, 1),
            entry("es-112233445566", "made", false, 3),
            entry("es-aabbccddeeff", "made", true, 2),
            entry("es-ffeeddccbbaa", "denied", false, 1),
        ];
        insta::assert_snapshot!("escrow_table", escrow_table(&es, T));
        insta::assert_snapshot!("escrow_table_empty", escrow_table(&[], T));
        insta::assert_snapshot!("escrow_requested", escrow_requested_text(&es[0]));
        insta::assert_snapshot!("escrow_made", escrow_decided_text(&es[1]));
        insta::assert_snapshot!(
            "escrow_fetched_obsolete",
            escrow_fetched_text("es-aabbccddeeff", "/root/web.age", 1234, Some(&es[2]))
        );
        insta::assert_snapshot!(
            "escrow_json",
            crate::output::json_text(&escrow_json(&es[1]))
        );
    }
}
