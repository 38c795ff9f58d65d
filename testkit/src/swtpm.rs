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
        s.run();
        s
    }

    fn run(&mut self) {
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--server"])
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.ctrl))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm runs (Debian package swtpm; scripts/setup installs it)");
        let guard = Made::process(child.id(), "swtpm");
        self.child = Some((child, guard));
        let end = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < end,
                "swtpm did not listen on {}",
                self.port
            );
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
        self.run();
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

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
