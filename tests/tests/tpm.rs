//! A host enrolled with `guestkeyd enroll --tpm`, end to end: the real
//! libvirtd with KVM guests, the real server, guestkeyd and hook, and a
//! TPM simulator (`swtpm`, the only stand-in: a test cannot extend, clear
//! or copy a real TPM).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guestkey_testkit::cleanup::Made;
use guestkey_testkit::{Proc, Swtpm};
use guestkey_tests::stack::{Stack, bin};
use guestkey_tests::{virsh, volume_domain_xml};

fn d(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn guestkeyd(args: &[&str]) -> std::process::Output {
    Command::new(bin("guestkeyd"))
        .args(args)
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap()
}

/// Whether `guestkeyctl host show` of the stack's host shows `want`.
fn shown(s: &Stack, want: &str) -> bool {
    let out = s.ctl(&["host", "show", &s.host]);
    String::from_utf8_lossy(&out.stdout).contains(want)
}

/// A simulated TPM, the scratch directory of the PCR authority key
/// (`authority.pk8`), and a stack whose host enrolled with `--tpm`.
fn tpm_stack() -> (Swtpm, std::path::PathBuf, Stack) {
    let tpm = Swtpm::start();
    let dir = guestkey_testkit::temp_dir("tpm-authority");
    let s = Stack::start_with(&[
        "--tpm".into(),
        "--tpm-tcti".into(),
        tpm.tcti(),
        "--tpm-authority-key".into(),
        d(&dir.join("authority.pk8")).into(),
    ]);
    (tpm, dir, s)
}

#[test]
fn a_tpm_sealed_host_starts_autostarts_and_after_an_update_waits_for_an_approval() {
    let (tpm, authority_dir, mut s) = tpm_stack();
    let _gone = Made::dir(&authority_dir);
    let authority = authority_dir.join("authority.pk8");
    let state = s.state_dir();
    // Both keys are sealed; neither is a file.
    for plain in ["sealing.key", "store.key"] {
        assert!(!state.join(plain).exists(), "{plain} is a plain file");
    }
    for sealed in ["sealing.key", "store.key"] {
        assert!(state.join(format!("tpm/{sealed}.tpm")).exists(), "{sealed}");
    }
    let status = guestkeyd(&["tpm", "status", "--state-dir", d(&state)]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("PCRs          sha256:7"), "{text}");
    assert!(text.contains("unseals now   yes"), "{text}");

    s.volume("tpm-disk", "16M");
    let guest = format!("gk-test-{}-tpm", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "tpm-disk", "qcow2"),
    );
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();

    // Autostart with the server down: guestkeyd unseals its keys from the
    // TPM alone.
    virsh(&["autostart", &guest]).unwrap();
    s.server.stop();
    s.daemon.take().unwrap().stop();
    s.run_daemon();
    s.wait_for(60, "guest autostarted by guestkeyd", || {
        virsh(&["domstate", &guest]).unwrap().trim() == "running"
    });
    virsh(&["destroy", &guest]).unwrap();
    virsh(&["autostart", "--disable", &guest]).unwrap();
    s.run_server();
    s.wait_for(30, "the host's TPM status at the server", || {
        shown(&s, "unseals             yes") && shown(&s, "PCR policy          sha256:7")
    });

    // An update changes PCR 7: guestkeyd cannot unseal, and the hook
    // refuses the guest naming why and what to run.
    s.daemon.take().unwrap().stop();
    tpm.extend(7, b"a new Secure Boot db entry");
    let mut cmd = Command::new(bin("guestkeyd"));
    cmd.args(["run", "--state-dir", d(&state), "--listen", "127.0.0.1:0"])
        .env("TSS2_LOG", "all+none");
    // Its first stdout line comes once the keys are unsealed.
    let starting = std::thread::spawn(move || Proc::start(cmd, "listening on https://"));
    let end = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        match virsh(&["start", &guest]) {
            Err(e) if e.0.contains("cannot unseal its keys") => break e.0,
            Err(e) => assert!(Instant::now() < end, "not refused for the TPM: {}", e.0),
            Ok(_) => panic!("the guest started with unapproved PCR values"),
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(refused.contains("PCR 7 is "), "{refused}");
    assert!(
        refused.contains(&format!(
            "guestkeyd tpm approve --state-dir {} --authority-key {} --current",
            state.display(),
            authority.display()
        )),
        "{refused}"
    );
    assert!(!starting.is_finished());
    // The server shows the locked host too.
    s.wait_for(30, "the locked host's TPM status at the server", || {
        shown(&s, "unseals             no")
    });

    // The operator approves this boot's values: guestkeyd unlocks by itself.
    let out = guestkeyd(&[
        "tpm",
        "approve",
        "--state-dir",
        d(&state),
        "--authority-key",
        d(&authority),
        "--current",
        "--note",
        "db update",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.daemon = Some(starting.join().unwrap());
    virsh(&["start", &guest]).unwrap();
    virsh(&["destroy", &guest]).unwrap();
}

#[test]
fn a_copy_of_a_tpm_sealed_state_directory_opens_nothing_on_another_tpm() {
    let (_tpm, authority_dir, mut s) = tpm_stack();
    let _gone = Made::dir(&authority_dir);
    let authority = authority_dir.join("authority.pk8");
    s.daemon.take().unwrap().stop();
    let copy = s.dir.join("copied-state");
    let st = Command::new("cp")
        .args(["-a", d(&s.state_dir()), d(&copy)])
        .status()
        .unwrap();
    assert!(st.success());
    // The second machine, with a TPM of its own and the same PCR values.
    let other = Swtpm::start();
    let mut child = Command::new(bin("guestkeyd"))
        .args(["run", "--state-dir", d(&copy), "--listen", "127.0.0.1:0"])
        .args(["--hook-socket", d(&s.dir.join("copy-hook.sock"))])
        .args(["--managed-list", d(&s.dir.join("copy-managed"))])
        .env("GUESTKEY_TPM_TCTI", other.tcti())
        .env("TSS2_LOG", "all+none")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.stdout.is_empty(),
        "the copy served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("sealed by another TPM, or this TPM was cleared"),
        "{log}"
    );

    // An enrollment with --tpm whose TPM does not answer fails before the
    // token is presented: the same token still enrolls the host.
    let v = s.json(&["host", "add", "kvm-notpm", "--address", "127.0.0.1:9"]);
    let token = v["enrollment_token"].as_str().unwrap().to_owned();
    let token_file = s.dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let state = s.dir.join("notpm-state");
    let port = guestkey_testkit::free_ports(2);
    let enroll = |extra: &[&str]| {
        let mut a = vec![
            "enroll",
            "--server",
            s.server_url(),
            "--token-file",
            d(&token_file),
            "--ca-file",
        ];
        let ca = s.dir.join("ca.pem");
        let ca = d(&ca).to_owned();
        let st = d(&state).to_owned();
        a.push(&ca);
        a.extend(["--state-dir", &st]);
        a.extend(extra);
        guestkeyd(&a)
    };
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let out = enroll(&[
        "--tpm",
        "--tpm-tcti",
        &tcti,
        "--tpm-authority-key",
        d(&authority),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--tpm: cannot open the TPM at TCTI"), "{e}");
    assert!(!state.join("tpm").exists() && !state.join("tpm.new").exists());
    let out = enroll(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_host_moves_its_keys_to_the_tpm_to_other_pcrs_and_back_keeping_its_guests() {
    let mut s = Stack::start();
    let state = s.state_dir();
    s.volume("reseal-disk", "16M");
    let guest = format!("gk-test-{}-reseal", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "reseal-disk", "qcow2"),
    );
    let starts = || {
        virsh(&["start", &guest]).unwrap();
        virsh(&["destroy", &guest]).unwrap();
    };
    starts();
    let ok = |args: &[&str]| {
        let o = guestkeyd(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let tpm = Swtpm::start();
    let authority = s.dir.join("authority.pk8");
    let to_tpm = [
        "reseal",
        "--state-dir",
        d(&state),
        "--tpm-tcti",
        &tpm.tcti(),
        "--tpm-authority-key",
        d(&authority),
    ];
    // Not while guestkeyd runs.
    let o = guestkeyd(&to_tpm);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("serves state directory"), "{e}");
    assert!(state.join("store.key").exists() && !state.join("tpm").exists());

    // Files to the TPM.
    s.daemon.take().unwrap().stop();
    let out = ok(&to_tpm);
    assert!(
        out.contains("resealed sealing.key, store.key: from files to TPM"),
        "{out}"
    );
    assert!(!state.join("store.key").exists() && !state.join("sealing.key").exists());
    s.run_daemon();
    starts();

    // Other PCRs.
    s.daemon.take().unwrap().stop();
    let mut other_pcrs = to_tpm.to_vec();
    other_pcrs.extend(["--tpm-pcrs", "0,7"]);
    ok(&other_pcrs);
    let status = ok(&["tpm", "status", "--state-dir", d(&state)]);
    assert!(status.contains("PCRs          sha256:0,7"), "{status}");
    s.run_daemon();
    starts();

    // Back to files.
    s.daemon.take().unwrap().stop();
    let out = ok(&["reseal", "--state-dir", d(&state), "--to-files"]);
    assert!(out.contains("to files"), "{out}");
    assert!(state.join("store.key").exists() && !state.join("tpm").exists());
    s.run_daemon();
    starts();
}
