//! Benchmark: key pushes end to end, with the real guestkeyd as the peer.
//! N encrypted volumes are asked for at once (`guestkeyctl volume create
//! --no-wait`, from a few threads); the server releases and pushes their
//! keys in its rounds, and guestkeyd makes each volume (LUKS header,
//! QEMU's open with the key, pool refresh, its store). The figure is the
//! time from the first request to the last volume `ready`.
//!
//! Then the push path alone, without the asking in front of it: N more
//! volumes are asked for while guestkeyd is stopped (the server keeps
//! them pending, retrying every 50-200 ms), and the time is taken from
//! guestkeyd's start to the last of them `ready`.
//!
//! Baseline in the same run: what a libvirt user does without guestkey,
//! `virsh vol-create-as` of a plain qcow2 volume of the same size, one
//! after the other (no key, no encryption).
//!
//! `cargo build --workspace --bins --release && GUESTKEY_PROFILE=release
//! cargo bench -p guestkey-tests --bench pushes` (`-- --volumes N`,
//! default 200). Needs root and scripts/setup. Prints guestkeyd's own
//! account of where its time went (its debug lines: the mean time a
//! volume spent opening its key, making its image and waiting for the
//! registry, and how many volumes a registry write took at once).

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use guestkey_tests::stack::Stack;
use guestkey_tests::virsh;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
        .unwrap_or(default)
}

/// The volumes of the stack's host in state `ready`.
fn ready(s: &Stack) -> usize {
    let v = s.json(&["volume", "list", "--host", &s.host]);
    v.as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "ready")
        .count()
}

fn main() {
    let n = arg("--volumes", 200);
    assert!(n > 0, "--volumes takes a number above 0");
    let threads = 4;
    let retry = "[retry]\ninitial_delay_ms = 50\nmax_delay_ms = 200\nmax_attempts = 10\n";
    let mut s = Stack::start_configured(&[], Some(retry));
    s.run_daemon_logging("info,host_daemon::ops=debug,host_daemon::image=debug");

    // Baseline: plain qcow2 volumes through libvirt, one after the other.
    let base_n = n.min(100);
    let t = Instant::now();
    for i in 0..base_n {
        virsh(&[
            "vol-create-as",
            &s.pool,
            &format!("plain-{i}"),
            "16M",
            "--format",
            "qcow2",
        ])
        .unwrap();
    }
    let base = t.elapsed();
    let base_rate = base_n as f64 / base.as_secs_f64();

    // guestkey: all asked for at once, from `threads` threads.
    let t = Instant::now();
    ask(&s, "bench", n, threads);
    let asked = t.elapsed();
    wait_ready(&s, n);
    let all = t.elapsed();
    let rate = n as f64 / all.as_secs_f64();
    let first_log = s.daemon_log();

    // The push path alone: asked for while guestkeyd is stopped.
    s.daemon.take().unwrap().stop();
    ask(&s, "drain", n, threads);
    let t = Instant::now();
    s.run_daemon_logging("info,host_daemon::ops=debug,host_daemon::image=debug");
    wait_ready(&s, 2 * n);
    let drain = t.elapsed();
    let drain_rate = n as f64 / drain.as_secs_f64();
    println!(
        "libvirt vol-create-as, plain qcow2, {base_n} one after the other: {:.2} s, {base_rate:.1} volumes/s ({:.1} ms each)",
        base.as_secs_f64(),
        1e3 / base_rate
    );
    println!(
        "guestkey, {n} encrypted qcow2 volumes asked for at once ({threads} threads, {:.2} s to ask): all ready after {:.2} s, {rate:.1} keys/s ({:.1} ms each), {:.2}x the baseline",
        asked.as_secs_f64(),
        all.as_secs_f64(),
        1e3 / rate,
        rate / base_rate
    );
    stages(&first_log);
    println!(
        "push path alone: {n} more asked for while guestkeyd was stopped, all ready {:.2} s after its start: {drain_rate:.1} keys/s ({:.1} ms each), {:.2}x the baseline",
        drain.as_secs_f64(),
        1e3 / drain_rate,
        drain_rate / base_rate
    );
    stages(&s.daemon_log());
}

/// Asks for `n` volumes `PREFIX-i` from `threads` threads, not waiting.
fn ask(s: &Stack, prefix: &str, n: usize, threads: usize) {
    std::thread::scope(|scope| {
        for k in 0..threads {
            scope.spawn(move || {
                for i in (k..n).step_by(threads) {
                    s.ask_volume(&format!("{prefix}-{i}"), "16M", "qcow2");
                }
            });
        }
    });
}

/// Waits (600 s at most) until `n` volumes of the stack's host are ready.
fn wait_ready(s: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done = ready(s);
    while done < n {
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} volumes ready after 600 s"
        );
        std::thread::sleep(Duration::from_millis(20));
        done = ready(s);
    }
}

/// The value of `field=` in a log line.
fn field(line: &str, field: &str) -> Option<f64> {
    let at = line.find(&format!(" {field}="))? + field.len() + 2;
    line[at..].split_whitespace().next()?.parse().ok()
}

/// guestkeyd's stage lines, summed up.
fn stages(log: &str) {
    let mean = |lines: &[&str], f: &str| {
        let v: Vec<f64> = lines.iter().filter_map(|l| field(l, f)).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let made: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("creation stages"))
        .collect();
    let groups: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("creations registered together"))
        .collect();
    let lines = |what: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(what)).collect() };
    let (made_img, synced) = (lines("image made"), lines("image synced"));
    println!(
        "  an image on average (in its slot): header {:.2} ms, QEMU's check {:.2} ms, sync {:.2} ms",
        mean(&made_img, "header_ms"),
        mean(&made_img, "check_ms"),
        mean(&synced, "sync_ms"),
    );
    println!(
        "guestkeyd, a volume on average: key {:.2} ms, image {:.2} ms, registry {:.2} ms (of {} volumes); {} registry writes of {:.1} volumes, {:.2} ms each",
        mean(&made, "key_ms"),
        mean(&made, "image_ms"),
        mean(&made, "commit_ms"),
        made.len(),
        groups.len(),
        mean(&groups, "volumes"),
        mean(&groups, "ms"),
    );
}
