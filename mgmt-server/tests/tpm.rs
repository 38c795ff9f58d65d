//! The server's keys sealed to its TPM (`init --master-key-source tpm`,
//! `tpm approve`, `tpm status`, `reseal`), against the real server binaries
//! and a TPM simulator per test (`swtpm`: the only stand-in here; a test
//! cannot extend, clear or copy a real TPM).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use guestkey_testkit::Swtpm;
use guestkey_testkit::cleanup::Made;

struct TpmServer {
    tpm: Swtpm,
    server: TestServer,
    authority: PathBuf,
    scratch: PathBuf,
}

impl Drop for TpmServer {
    fn drop(&mut self) {
        self.server.stop();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn server_cmd(args: &[&str]) -> std::process::Output {
    Command::new(SERVER)
        .args(args)
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = server_cmd(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = server_cmd(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn d(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl TpmServer {
    fn start() -> Self {
        let tpm = Swtpm::start();
        let scratch = temp_dir("tpm-server");
        let authority = scratch.join("offline/authority.pk8");
        let tcti = tpm.tcti();
        let server = TestServer::start_in_with(
            scratch.join("data"),
            bins(),
            None,
            &[
                "--master-key-source",
                "tpm",
                "--tpm-tcti",
                &tcti,
                "--tpm-authority-key",
                d(&authority),
            ],
        );
        Self {
            tpm,
            server,
            authority,
            scratch,
        }
    }

    fn data(&self) -> &Path {
        &self.server.dir
    }

    /// `run` in the foreground: its error when it cannot start.
    fn run_fails(&self) -> String {
        fails(&[
            "run",
            "--data-dir",
            d(self.data()),
            "--listen",
            "127.0.0.1:0",
        ])
    }
}

#[test]
fn init_seals_the_master_and_ca_keys_and_the_server_serves_with_them() {
    let mut t = TpmServer::start();
    let data = t.data().to_owned();
    for plain in [
        "master.key",
        "ca/ca.key",
        "ca/server-ca.key",
        "ca/admin-ca.key",
    ] {
        assert!(!data.join(plain).exists(), "{plain} is a plain file");
    }
    for sealed in ["master.key", "ca.key", "server-ca.key", "admin-ca.key"] {
        assert!(data.join(format!("tpm/{sealed}.tpm")).exists(), "{sealed}");
    }
    // The hosts CA (sealed) signs an enrollment; the master key (sealed)
    // wraps a volume key.
    let mut a = TestAgent::enroll(&t.server, "kvm-1");
    a.serve();
    let v = t.server.json(&[
        "volume", "create", "--host", "kvm-1", "--pool", "p", "--name", "v1", "--size", "1M",
    ]);
    assert_eq!(v["state"], "ready", "{v}");
    // Its key mixed the TPM's random bytes in.
    assert!(
        !t.server.log().contains("OS random generator alone"),
        "{}",
        t.server.log()
    );
    // A restart unseals them again.
    t.server.restart();
    assert_eq!(t.server.json(&["volume", "show", "v1"])["state"], "ready");
    let status = ok(&["tpm", "status", "--data-dir", d(&data)]);
    assert!(status.contains("PCRs          sha256:7"), "{status}");
    assert!(status.contains("unseals now   yes"), "{status}");
    assert!(
        status.contains(&format!("TPM           {}", t.tpm.tcti())),
        "{status}"
    );
}

#[test]
fn after_an_update_the_server_refuses_to_start_naming_the_pcr_until_it_is_approved() {
    let mut t = TpmServer::start();
    let data = t.data().to_owned();
    t.server.stop();
    // The update's boot measures something new into PCR 7.
    t.tpm.extend(7, b"new db entry");
    let e = t.run_fails();
    assert!(e.contains("PCR 7 is "), "{e}");
    assert!(
        e.contains(&format!(
            "guestkey-server tpm approve --data-dir {} --authority-key {} --current",
            data.display(),
            t.authority.display()
        )),
        "{e}"
    );
    let status = ok(&["tpm", "status", "--data-dir", d(&data)]);
    assert!(status.contains("unseals now   no"), "{status}");
    // The operator approves the booted values with the authority key.
    let out = ok(&[
        "tpm",
        "approve",
        "--data-dir",
        d(&data),
        "--authority-key",
        d(&t.authority),
        "--current",
        "--note",
        "db update",
    ]);
    assert!(out.contains("PCR  7 "), "{out}");
    t.server.restart();
    t.server.ok(&["host", "list"]);
    t.server.stop();

    // The next update is approved in advance: PCR 7's value after it.
    let status = ok(&["tpm", "status", "--data-dir", d(&data)]);
    let now = status
        .lines()
        .find_map(|l| l.trim().strip_prefix("PCR  7 "))
        .unwrap()
        .trim()
        .to_owned();
    let measured: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(b"kernel 6.1.0-31").into()
    };
    let next = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(hex::decode(&now).unwrap());
        h.update(measured);
        hex::encode(h.finalize())
    };
    ok(&[
        "tpm",
        "approve",
        "--data-dir",
        d(&data),
        "--authority-key",
        d(&t.authority),
        "--pcr",
        &format!("7={next}"),
        "--note",
        "kernel 6.1.0-31",
    ]);
    t.tpm.extend(7, b"kernel 6.1.0-31");
    t.server.restart();
    t.server.ok(&["host", "list"]);
}

#[test]
fn bad_tpm_requests_are_refused_by_name_and_change_nothing() {
    // init without an authority key: nothing is made.
    let scratch = temp_dir("tpm-bad");
    let _gone = Made::dir(&scratch);
    let data = scratch.join("data");
    let e = fails(&["init", "--data-dir", d(&data), "--master-key-source", "tpm"]);
    assert!(
        e.contains("--master-key-source tpm needs --tpm-authority-key FILE"),
        "{e}"
    );
    assert!(!data.exists());
    // A TPM that is not there: named, nothing made.
    let port = guestkey_testkit::free_ports(2);
    let e = fails(&[
        "init",
        "--data-dir",
        d(&data),
        "--master-key-source",
        "tpm",
        "--tpm-tcti",
        &format!("swtpm:host=127.0.0.1,port={port}"),
        "--tpm-authority-key",
        d(&scratch.join("a.pk8")),
    ]);
    assert!(e.contains("cannot open the TPM at TCTI"), "{e}");
    assert!(!data.exists());

    let t = TpmServer::start();
    let data = t.data().to_owned();
    let approvals = std::fs::read(data.join("tpm/approvals.json")).unwrap();
    // Another authority's key.
    let other = scratch.join("other.pk8");
    let e = fails(&[
        "tpm",
        "approve",
        "--data-dir",
        d(&data),
        "--authority-key",
        d(&other),
        "--current",
    ]);
    assert!(e.contains("cannot read") || e.contains("other.pk8"), "{e}");
    guestkey_protect::tpm::Authority::create(&other).unwrap();
    let e = fails(&[
        "tpm",
        "approve",
        "--data-dir",
        d(&data),
        "--authority-key",
        d(&other),
        "--current",
    ]);
    assert!(e.contains("accept approvals of authority"), "{e}");
    // A PCR the keys are not sealed for, a PCR that does not exist, a value
    // that is not one, nothing to approve.
    for (args, says) in [
        (vec!["--pcr", "3=00"], "is not a SHA-256 PCR value"),
        (vec!["--pcr", "30=00"], "is not a PCR number"),
        (vec!["--pcr", "0=zz"], "is not a SHA-256 PCR value"),
        (vec!["--pcr", "7"], "is not N=SHA256"),
        (vec![], "name the values to approve"),
    ] {
        let mut a = vec![
            "tpm",
            "approve",
            "--data-dir",
            d(&data),
            "--authority-key",
            d(&t.authority),
        ];
        a.extend(args);
        let e = fails(&a);
        assert!(e.contains(says), "{a:?}: {e}");
    }
    let e = fails(&[
        "tpm",
        "approve",
        "--data-dir",
        d(&data),
        "--authority-key",
        d(&t.authority),
        "--pcr",
        &format!("3={}", "ab".repeat(32)),
    ]);
    assert!(
        e.contains("PCR 3 is not one the keys are sealed for (sha256:7)"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(data.join("tpm/approvals.json")).unwrap(),
        approvals
    );
    // Reseal while the server runs.
    let e = fails(&["reseal", "--data-dir", d(&data), "--to-files"]);
    assert!(e.contains("stop it first"), "{e}");
    assert!(data.join("tpm/master.key.tpm").exists());
}

#[test]
fn a_copy_of_the_data_directory_on_another_tpm_opens_nothing() {
    let mut t = TpmServer::start();
    t.server.stop();
    let copy_dir = temp_dir("tpm-copy");
    let _gone = Made::dir(&copy_dir);
    let copy = copy_dir.join("data");
    let status = Command::new("cp")
        .args(["-a", d(t.data()), d(&copy)])
        .status()
        .unwrap();
    assert!(status.success());
    // The copy's TPM settings point at the other machine's TPM.
    let other = Swtpm::start();
    let o = Command::new(SERVER)
        .args(["run", "--data-dir", d(&copy), "--listen", "127.0.0.1:0"])
        .env("GUESTKEY_TPM_TCTI", other.tcti())
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains("sealed by another TPM, or this TPM was cleared"),
        "{e}"
    );
}

#[test]
fn reseal_moves_the_keys_to_files_to_other_pcrs_and_back_keeping_every_key() {
    let mut t = TpmServer::start();
    let mut a = TestAgent::enroll(&t.server, "kvm-1");
    a.serve();
    t.server.json(&[
        "volume", "create", "--host", "kvm-1", "--pool", "p", "--name", "v1", "--size", "1M",
    ]);
    t.server.stop();
    let data = t.data().to_owned();
    let mk = |data: &Path| data.join("master.key");

    // To files.
    let out = ok(&["reseal", "--data-dir", d(&data), "--to-files"]);
    assert!(
        out.contains("resealed master.key, ca.key, server-ca.key, admin-ca.key"),
        "{out}"
    );
    assert!(mk(&data).exists() && !data.join("tpm").exists());
    t.server.restart();
    assert_eq!(t.server.json(&["volume", "show", "v1"])["state"], "ready");
    t.server.stop();

    // To a TPM that is not there: refused, the keys stay in their files.
    let port = guestkey_testkit::free_ports(2);
    let e = fails(&[
        "reseal",
        "--data-dir",
        d(&data),
        "--tpm-tcti",
        &format!("swtpm:host=127.0.0.1,port={port}"),
        "--tpm-authority-key",
        d(&t.authority),
    ]);
    assert!(e.contains("cannot open the TPM at TCTI"), "{e}");
    assert!(mk(&data).exists());
    assert!(!data.join("tpm").exists() && !data.join("tpm.new").exists());

    // Back to the TPM, bound to PCRs 0 and 7 now.
    let out = ok(&[
        "reseal",
        "--data-dir",
        d(&data),
        "--tpm-tcti",
        &t.tpm.tcti(),
        "--tpm-pcrs",
        "0,7",
        "--tpm-authority-key",
        d(&t.authority),
    ]);
    assert!(out.contains("from files to TPM"), "{out}");
    assert!(!mk(&data).exists(), "the plain master key stayed");
    assert!(!data.join("ca/ca.key").exists());
    let status = ok(&["tpm", "status", "--data-dir", d(&data)]);
    assert!(status.contains("PCRs          sha256:0,7"), "{status}");
    t.server.restart();
    assert_eq!(t.server.json(&["volume", "show", "v1"])["state"], "ready");
    // Every move is in the audit log.
    let audit = t.server.ok(&["audit"]);
    assert_eq!(audit.matches("server.keys-resealed").count(), 2, "{audit}");
    t.server.stop();

    // Onto another TPM (the machine's TPM is replaced, both present).
    let new_tpm = Swtpm::start();
    ok(&[
        "reseal",
        "--data-dir",
        d(&data),
        "--tpm-tcti",
        &new_tpm.tcti(),
        "--tpm-authority-key",
        d(&t.authority),
    ]);
    drop(std::mem::replace(&mut t.tpm, new_tpm));
    t.server.restart();
    assert_eq!(t.server.json(&["volume", "show", "v1"])["state"], "ready");
}

#[test]
fn a_reseal_that_stopped_between_its_renames_is_finished_at_start_up() {
    let mut t = TpmServer::start();
    t.server.stop();
    let data = t.data().to_owned();
    // As reseal leaves it after its first rename: the old keys in tpm.old,
    // the complete new ones in tpm.new.
    let copy = data.join("tpm.new");
    let st = Command::new("cp")
        .args(["-a", d(&data.join("tpm")), d(&copy)])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::rename(data.join("tpm"), data.join("tpm.old")).unwrap();
    t.server.restart();
    t.server.ok(&["host", "list"]);
    assert!(data.join("tpm").exists());
    assert!(!data.join("tpm.old").exists() && !data.join("tpm.new").exists());
}

#[test]
fn without_a_tpm_volume_keys_come_from_the_os_generator_and_that_is_logged_once() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-1");
    a.serve();
    for name in ["v1", "v2"] {
        let v = s.json(&[
            "volume", "create", "--host", "kvm-1", "--pool", "p", "--name", name, "--size", "1M",
        ]);
        assert_eq!(v["state"], "ready", "{v}");
    }
    let log = s.log();
    assert_eq!(
        log.matches("keys are made from the OS random generator alone: no TPM is configured")
            .count(),
        1,
        "{log}"
    );
}
