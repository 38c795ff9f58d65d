//! A host's progress on a long volume operation: the one-line text that
//! `volume show` prints, and the progress bar (indicatif) on stderr while
//! a command waits: a bar when the host reports how many bytes are done, a
//! spinner with the volume's state otherwise. The bar is drawn only when
//! stderr is a terminal and `--json` is not given; stdout never sees it.

use std::io::IsTerminal;
use std::time::Duration;

use guestkey_proto::admin as pb;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

use super::size;

/// Longest progress line `volume show` prints.
const MAX_LINE: usize = 200;

/// The progress bar on stderr while a command waits for a host; cleared
/// when done or dropped.
pub(crate) struct Bar {
    bar: ProgressBar,
    /// What the bar shows now: a bar (true) or a spinner (false).
    counting: Option<bool>,
    /// Whether the spinner turns by itself (not in tests).
    animate: bool,
}

impl Bar {
    /// A bar on stderr if it is a terminal and `json` is false, else a
    /// hidden one.
    pub(crate) fn new(json: bool) -> Self {
        if json || !std::io::stderr().is_terminal() {
            Self::with_target(ProgressDrawTarget::hidden(), false)
        } else {
            Self::with_target(ProgressDrawTarget::stderr(), true)
        }
    }

    fn with_target(target: ProgressDrawTarget, animate: bool) -> Self {
        let bar = ProgressBar::with_draw_target(None, target).with_finish(ProgressFinish::AndClear);
        Self {
            bar,
            counting: None,
            animate,
        }
    }

    /// Shows the volume's progress as it is now.
    pub(crate) fn draw(&mut self, v: &pb::Volume) {
        let (done, total) = (v.progress_done_bytes, v.progress_total_bytes);
        let counting = total > 0;
        if self.counting != Some(counting) {
            self.bar.set_style(if counting {
                bar_style()
            } else {
                spinner_style()
            });
            if counting {
                self.bar.disable_steady_tick();
            } else if self.animate {
                self.bar.enable_steady_tick(Duration::from_millis(120));
            }
            self.counting = Some(counting);
        }
        if counting {
            self.bar.set_length(total);
            self.bar.set_position(done.min(total));
        }
        self.bar.set_message(message(v));
    }

    /// Removes the bar from the terminal.
    pub(crate) fn clear(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn bar_style() -> ProgressStyle {
    // The templates are constants that parse.
    ProgressStyle::with_template("[{bar:25}] {percent:>3}%  {wide_msg}")
        .expect("valid template")
        .progress_chars("#-")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {wide_msg}").expect("valid template")
}

/// `[#####-----]  45%  460.0M of 1G  re-encrypting`, or the state and the
/// last error when the host reports no progress.
pub(crate) fn progress_line(v: &pb::Volume) -> String {
    let (done, total) = (v.progress_done_bytes, v.progress_total_bytes);
    let line = match done.min(total).saturating_mul(100).checked_div(total) {
        Some(pct) => {
            let pct = pct as usize;
            format!(
                "[{}{}] {pct:>3}%  {}",
                "#".repeat(pct / 4),
                "-".repeat(25 - pct / 4),
                message(v)
            )
        }
        None => message(v),
    };
    line.chars().take(MAX_LINE).collect()
}

/// The words after the bar: bytes done and the phase, or the phase or
/// state; the error the server retries after.
fn message(v: &pb::Volume) -> String {
    let (done, total) = (v.progress_done_bytes, v.progress_total_bytes);
    let mut m = if total > 0 {
        format!("{} of {}  {}", size(done), size(total), v.progress_phase)
    } else if !v.progress_phase.is_empty() {
        format!("{}...", v.progress_phase)
    } else {
        format!("{}...", v.state)
    };
    if !v.last_error.is_empty() {
        m.push_str(&format!("  (retrying: {})", v.last_error));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the bar draws on a 100-column terminal, line by line.
    fn drawn(volumes: &[pb::Volume]) -> String {
        let term = indicatif::InMemoryTerm::new(4, 100);
        let mut bar =
            Bar::with_target(ProgressDrawTarget::term_like(Box::new(term.clone())), false);
        let mut out = String::new();
        for v in volumes {
            bar.draw(v);
            bar.bar.tick();
            out.push_str(&term.contents());
            out.push_str("\n---\n");
        }
        bar.clear();
        out.push_str(&format!("after clear: {:?}\n", term.contents()));
        out
    }

    #[test]
    fn the_terminal_bar() {
        let counting = pb::Volume {
            state: "rekeying".into(),
            progress_phase: "re-encrypting".into(),
            progress_done_bytes: 482_345_123 / 4,
            progress_total_bytes: 482_345_123,
            ..Default::default()
        };
        let retrying = pb::Volume {
            last_error: "host kvm-02 unreachable: connection refused".into(),
            progress_done_bytes: 482_345_123,
            ..counting.clone()
        };
        let waiting = pb::Volume {
            state: "pending-create".into(),
            last_error: "host kvm-late unreachable: ".to_owned() + &"x".repeat(200),
            ..Default::default()
        };
        insta::assert_snapshot!(drawn(&[counting, retrying, waiting]));
    }
}
