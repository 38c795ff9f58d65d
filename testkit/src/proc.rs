//! A started program.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::cleanup::{Made, ProcessGuard};

/// A running process, stopped (SIGTERM, then waited for) when dropped.
pub struct Proc {
    child: Child,
    /// Killed on a signal that ends the test first.
    _guard: ProcessGuard,
    /// The first line it printed on stdout.
    pub first_line: String,
    /// Its stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd`; waits for a first stdout line starting with `ready`
    /// and panics with its stderr when another line (or none) comes.
    pub fn start(mut cmd: Command, ready: &str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let guard = Made::process(child.id(), &cmd.get_program().to_string_lossy());
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let stderr = child.stderr.take().unwrap();
        let collector = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&(line + "\n"));
            }
        });
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let _ = BufReader::new(stdout).read_line(&mut line);
        if !line.starts_with(ready) {
            // It failed to start: let it end and show what it said.
            let _ = child.wait();
            let _ = collector.join();
            panic!(
                "expected {ready:?} from {cmd:?}, got {line:?}: {}",
                log.lock().unwrap_or_else(|p| p.into_inner())
            );
        }
        Self {
            child,
            _guard: guard,
            first_line: line.trim().to_owned(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote on stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops it (SIGTERM, then waits).
    pub fn stop(mut self) {
        self.terminate();
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}
