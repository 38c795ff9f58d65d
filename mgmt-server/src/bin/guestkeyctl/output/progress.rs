//! A host's progress on a long volume operation: the one-line text that
//! `volume show` prints, and the progress bar on stderr while a command
//! waits (only in a terminal, never with `--json`).

use guestkey_proto::admin as pb;

use super::size;

/// A one-line progress bar on stderr, drawn only in a terminal.
pub(crate) struct Bar {
    on: bool,
    drawn: bool,
}

impl Bar {
    pub(crate) fn new(json: bool) -> Self {
        Self {
            on: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            drawn: false,
        }
    }

    pub(crate) fn draw(&mut self, v: &pb::Volume) {
        if !self.on {
            return;
        }
        let line = progress_line(v);
        eprint!("\r\x1b[2K{line}");
        self.drawn = true;
    }

    pub(crate) fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

/// `[#####-----]  45%  460M of 1G  re-encrypting`, or the state and the
/// last error when the host reports no progress.
pub(crate) fn progress_line(v: &pb::Volume) -> String {
    let (done, total) = (v.progress_done_bytes, v.progress_total_bytes);
    let mut line = if let Some(pct) = done.min(total).saturating_mul(100).checked_div(total) {
        let pct = pct as usize;
        format!(
            "[{}{}] {pct:>3}%  {} of {}  {}",
            "#".repeat(pct / 4),
            "-".repeat(25 - pct / 4),
            size(done),
            size(total),
            v.progress_phase
        )
    } else if !v.progress_phase.is_empty() {
        format!("{}...", v.progress_phase)
    } else {
        format!("{}...", v.state)
    };
    if !v.last_error.is_empty() {
        line.push_str(&format!("  (retrying: {})", v.last_error));
    }
    line.chars().take(200).collect()
}
