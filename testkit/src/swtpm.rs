//! A TPM simulator (`swtpm`) per test: the only stand-in in the TPM tests,
//! and an acceptable one (a real TPM is not something a test may clear or
//! extend). Each instance has its own state directory and ports on
//! 127.0.0.1; it is stopped when dropped. tss-esapi reaches it with
//! [`Swtpm::tcti`], tpm2-tools with the same string.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cleanup::{Made, ProcessGuard};
use crate::{free_ports, temp_dir};

/// A running swtpm.
pub struct Swtpm {
    child: Option<(Child, ProcessGuard)>,
    state: PathBuf,
    /// Its own state directory (removed when dropped, or on a signal).
    _gone: Option<Made>,
    port: u16,
    ctrl: u16,
}

impl Swtpm {
    /// A new simulated TPM (fresh state: a TPM of its own, with its own
    /// seeds).
    pub fn start() -> Self {
        let state = temp_dir("swtpm");
        let gone = Made::dir(&state);
        let mut s = Self::start_in(state);
        s._gone = Some(gone);
        s
    }

    /// A simulator on the state in `state` (the same TPM as whoever used
    /// that state before: a reboot of that machine).
    pub fn start_in(state: PathBuf) -> Self {
        // The swtpm TCTI reaches the control channel on PORT+1.
        let port = free_ports(2);
        let mut s = Self {
            child: None,
            state,
            _gone: None,
            port,
            ctrl: port + 1,
        };
        s.run(true);
        s
    }

    /// Starts swtpm; on `new` ports a taken port means other ports. A
    /// restart is said on stderr, shown with the test's output if it fails.
    #[allow(clippy::print_stderr)]
    fn run(&mut self, new: bool) {
        // A port found free may be taken before swtpm binds it (another
        // test's process, or a test thread's spawn that still holds the
        // probe socket until its exec): swtpm then exits, and is started
        // again on other ports. A reboot keeps its ports, so it only waits.
        for attempt in 0.. {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(why) if attempt < 5 => {
                    eprintln!("swtpm on {}: {why}; starting it again", self.port);
                    if new {
                        self.port = free_ports(2);
                        self.ctrl = self.port + 1;
                    }
                }
                Err(why) => panic!("swtpm on {} did not start: {why}", self.port),
            }
        }
    }

    /// Starts swtpm and waits until its TPM answers a command. A connection
    /// alone proves nothing: the port may briefly be held by someone else's
    /// socket while swtpm has not bound it yet.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = self.state.with_extension("log");
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--server"])
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.ctrl))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?)
            .spawn()
            .expect("swtpm runs (Debian package swtpm; scripts/setup installs it)");
        let guard = Made::process(child.id(), "swtpm");
        self.child = Some((child, guard));
        let said = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            text.trim().to_owned()
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if answers(self.port) {
                let _ = std::fs::remove_file(&log);
                return Ok(());
            }
            if let Some((c, _)) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!("swtpm exited ({status}): {}", said()));
                }
            }
            if Instant::now() >= end {
                self.stop();
                return Err(format!("its TPM did not answer within 20 s: {}", said()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its TCTI string.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Its state directory (copy it to clone the TPM, which a real one
    /// does not allow: only for tests of what a copy may not do).
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// Stops it (as a power-off: the state stays).
    pub fn stop(&mut self) {
        if let Some((mut c, _guard)) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A reboot: stopped and started on the same state, so PCRs are reset.
    pub fn reboot(&mut self) {
        self.stop();
        self.run(false);
    }

    /// Runs a tpm2-tools command against it (`tpm2_pcrextend`, `tpm2_clear`,
    /// ...) and panics with its output when it fails.
    pub fn tool(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(["--tcti", &self.tcti()])
            .args(args)
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `der` as the TPM's ECC P-256 EK certificate (NV index
    /// 0x01c0000a, where a manufacturer puts it and tss-esapi reads it).
    pub fn write_ek_certificate(&self, der: &[u8]) {
        let dir = crate::temp_dir("ek-cert");
        let _gone = crate::cleanup::Made::dir(&dir);
        let file = dir.join("ek.der");
        std::fs::write(&file, der).unwrap();
        let file = file.to_str().unwrap();
        let size = der.len().to_string();
        self.tool(
            "tpm2_nvdefine",
            &[
                "0x01c0000a",
                "-C",
                "o",
                "-s",
                &size,
                "-a",
                "ownerread|ownerwrite|authread|authwrite",
            ],
        );
        self.tool("tpm2_nvwrite", &["0x01c0000a", "-C", "o", "-i", file]);
    }

    /// Extends SHA-256 PCR `pcr` with `data`'s digest (a simulated update of
    /// what that PCR measures).
    pub fn extend(&self, pcr: u8, data: &[u8]) {
        use std::fmt::Write;
        let digest = sha256_hex(data);
        let mut arg = String::new();
        let _ = write!(arg, "{pcr}:sha256={digest}");
        self.tool("tpm2_pcrextend", &[&arg]);
    }
}

/// Whether a TPM on `port` answers TPM2_GetRandom (8 bytes): a response
/// header with a TPM tag (0x8001 or 0x8002).
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    const GET_RANDOM_8: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut header = [0u8; 10];
    if s.write_all(&GET_RANDOM_8).is_err()
        || s.read_exact(&mut header).is_err()
        || !matches!(header[..2], [0x80, 0x01] | [0x80, 0x02])
    {
        return false;
    }
    // The rest of the response, so that closing resets nothing.
    let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let rest = u64::from(size.saturating_sub(10).min(4096));
    std::io::copy(&mut s.take(rest), &mut std::io::sink()).is_ok()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
