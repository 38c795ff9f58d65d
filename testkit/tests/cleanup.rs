//! A benchmark or test interrupted (SIGINT from Ctrl-C, SIGTERM from
//! `timeout` or `kill`, SIGHUP from a closed terminal) removes what it
//! registered with `cleanup::Made`, and says what it could not remove.
//! The interrupted process is this test binary itself, run again as a
//! child with `GK_CLEANUP_CHILD` set.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use guestkey_testkit::cleanup::Made;

/// The child: makes a directory and a file, registers both (one whose
/// removal fails), says so, and waits to be interrupted.
#[test]
fn child_that_waits_for_a_signal() {
    let Some(dir) = std::env::var_os("GK_CLEANUP_CHILD") else {
        return; // run as a child only
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(dir.join("inside")).unwrap();
    let _made = Made::dir(&dir);
    let _stuck = Made::new("a thing that cannot go (rm it by hand)", || {
        Err("it is stuck".into())
    });
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
    panic!("not interrupted");
}

#[test]
fn an_interrupted_process_removes_what_it_made_and_names_what_it_could_not() {
    for (signal, number) in [("INT", 2), ("TERM", 15), ("HUP", 1)] {
        let dir = guestkey_testkit::temp_dir("cleanup-signal");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_that_waits_for_a_signal", "--nocapture"])
            .env("GK_CLEANUP_CHILD", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("READY"));
        assert!(ready, "the child did not start");
        assert!(dir.join("inside").exists());
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + number), "SIG{signal}: {said}");
        assert!(
            !dir.exists(),
            "SIG{signal}: {} is still there",
            dir.display()
        );
        assert!(
            said.contains("could not remove a thing that cannot go (rm it by hand): it is stuck"),
            "SIG{signal}: {said}"
        );
    }
}
