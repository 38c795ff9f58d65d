//! Benchmark: what attestation adds, as ratios to the same work without it
//! in the same run (the machine is shared and noisy). The host's TPM is a
//! simulator (swtpm); a hardware TPM signs a quote in tens of milliseconds.
//!
//! 1. One attestation (fresh nonce, TPM quote, verification, recorded):
//!    `guestkeyctl host attest` against `guestkeyctl host show` (the same
//!    CLI and one admin call).
//! 2. `virsh start` of a 64 MiB KVM guest whose disk is `attested` (the
//!    hook asks the server, which attests the host and releases the key)
//!    against the same guest on a plain qcow2 file and on an `auto` disk.
//! 3. A host restarting with N autostart guests: guestkeyd starts, its
//!    catch-up starts every guest (each asking for its key when
//!    `attested`); time until all run, `attested` against `auto`.
//!
//! `cargo build --workspace --bins && cargo bench -p guestkey-tests --bench attested`
//! (`-- --quick` for fewer rounds and guests; `-- --guests N`, default 200).
//! Needs root and scripts/setup.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use guestkey_tests::stack::Stack;
use guestkey_tests::{Cleanup, virsh};

/// A guest with nothing to boot: SeaBIOS is told not to retry
/// (`rebootTimeout='-1'`), so a running guest idles instead of spinning a
/// vCPU, and 200 of them fit a small machine.
fn domain(name: &str, source: &str) -> String {
    let kind = if source.contains("pool=") {
        "volume"
    } else {
        "file"
    };
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type><bios rebootTimeout='-1'/></os><devices><disk type='{kind}' device='disk'><driver name='qemu' type='qcow2'/>{source}<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
}

fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    t[t.len() / 2]
}

fn timed(rounds: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..rounds)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed()
            })
            .collect(),
    )
}

/// Creates `names` (all at once: the server pushes them together) with
/// `release`, and waits until every one is ready.
fn volumes(s: &Stack, names: &[String], release: &str) {
    for n in names {
        s.json(&[
            "volume",
            "create",
            "--host",
            &s.host,
            "--pool",
            &s.pool,
            "--name",
            n,
            "--size",
            "1M",
            "--release",
            release,
            "--no-wait",
        ]);
    }
    s.wait_for(3600, "volumes ready", || {
        s.json(&["volume", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| names.iter().any(|n| v["name"] == n.as_str()))
            .all(|v| v["state"] == "ready")
    });
}

/// Defines `guests[i]` on `disks[i]` through guestkey.
fn define(s: &Stack, cleanup: &mut Cleanup, guests: &[String], disks: &[String]) {
    for (g, d) in guests.iter().zip(disks) {
        let f = s.dir.join(format!("{g}.xml"));
        let src = format!("<source pool='{}' volume='{d}'/>", s.pool);
        std::fs::write(&f, domain(g, &src)).unwrap();
        s.json(&[
            "guest",
            "define",
            "--host",
            &s.host,
            "--xml",
            f.to_str().unwrap(),
        ]);
        cleanup.virsh(&["undefine", g]);
        cleanup.virsh(&["destroy", g]);
    }
    s.wait_for(3600, "guests defined", || {
        s.json(&["guest", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| guests.iter().any(|g| x["name"] == g.as_str()))
            .all(|x| x["pending"] == "")
    });
}

fn running(g: &str) -> bool {
    virsh(&["domstate", g])
        .map(|s| s.trim() == "running")
        .unwrap_or(false)
}

/// Autostart guests, all shut off, guestkeyd restarted: time until all
/// run again.
fn restart(s: &mut Stack, guests: &[String]) -> Duration {
    for g in guests {
        virsh(&["autostart", g]).unwrap();
        if running(g) {
            virsh(&["destroy", g]).unwrap();
        }
    }
    s.daemon.take().unwrap().stop();
    let t = Instant::now();
    s.run_daemon();
    s.wait_for(3600, "every guest autostarted", || {
        guests.iter().all(|g| running(g))
    });
    let e = t.elapsed();
    for g in guests {
        virsh(&["destroy", g]).unwrap();
        virsh(&["autostart", "--disable", g]).unwrap();
    }
    e
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 9 };
    let n: usize = args
        .iter()
        .position(|a| a == "--guests")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--guests N"))
        .unwrap_or(if quick { 10 } else { 200 });
    let tpm = guestkey_testkit::Swtpm::start();
    let authority_dir = guestkey_testkit::temp_dir("bench-authority");
    let _made = guestkey_testkit::cleanup::Made::dir(&authority_dir);
    let mut s = Stack::start_configured(
        &[
            "--tpm".into(),
            "--tpm-tcti".into(),
            tpm.tcti(),
            "--tpm-authority-key".into(),
            authority_dir.join("authority.pk8").to_str().unwrap().into(),
        ],
        Some(
            "[retry]\ninitial_delay_ms = 200\nmax_delay_ms = 1000\n[limits]\nkey_releases_per_minute = 100000\n",
        ),
    );
    s.json(&[
        "attestation",
        "allow",
        "--host",
        &s.host,
        "--learn",
        "--learn-pcrs",
        "0,7",
    ]);
    let pid = std::process::id();
    let mut cleanup = Cleanup::default();

    // 1. One attestation against one admin call.
    let show = timed(rounds, || {
        s.json(&["host", "show", &s.host]);
    });
    let attest = timed(rounds, || {
        s.json(&["host", "attest", &s.host]);
    });

    // 2. Guest start: plain file, auto disk, attested disk.
    let plain = s.dir.join("pool/plain.qcow2");
    guestkey_tests::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", plain.to_str().unwrap(), "1M"],
    )
    .unwrap();
    let one = |k: &str| format!("gk-test-{pid}-{k}");
    volumes(&s, &["b-auto".into()], "auto");
    volumes(&s, &["b-att".into()], "attested");
    let f = s.dir.join("plain.xml");
    std::fs::write(
        &f,
        domain(
            &one("plain"),
            &format!("<source file='{}'/>", plain.display()),
        ),
    )
    .unwrap();
    virsh(&["define", f.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["undefine", &one("plain")]);
    cleanup.virsh(&["destroy", &one("plain")]);
    define(
        &s,
        &mut cleanup,
        &[one("auto"), one("att")],
        &["b-auto".into(), "b-att".into()],
    );
    let start = |g: &str| {
        timed(rounds, || {
            virsh(&["start", g]).unwrap();
            virsh(&["destroy", g]).unwrap();
        })
    };
    let t_plain = start(&one("plain"));
    let t_auto = start(&one("auto"));
    let t_att = start(&one("att"));

    // 3. A restart with n guests of each kind.
    let names = |k: &str| {
        (0..n)
            .map(|i| format!("gk-test-{pid}-{k}{i}"))
            .collect::<Vec<_>>()
    };
    let (auto_v, att_v) = (names("va"), names("vt"));
    let t = Instant::now();
    volumes(&s, &auto_v, "auto");
    volumes(&s, &att_v, "attested");
    let made = t.elapsed();
    let (auto_g, att_g) = (names("ga"), names("gt"));
    define(&s, &mut cleanup, &auto_g, &auto_v);
    define(&s, &mut cleanup, &att_g, &att_v);
    let r_auto = restart(&mut s, &auto_g);
    let r_att = restart(&mut s, &att_g);

    let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("attestation (swtpm), medians of {rounds}:");
    println!("  guestkeyctl host show:    {:>7.3} s", show.as_secs_f64());
    println!(
        "  guestkeyctl host attest:  {:>7.3} s   ratio {:.2}, +{:.0} ms (nonce, quote, verification, record)",
        attest.as_secs_f64(),
        r(attest, show),
        (attest.as_secs_f64() - show.as_secs_f64()) * 1000.0
    );
    println!("guest start (virsh start, 64 MiB KVM guest, hook included):");
    println!(
        "  plain qcow2 file:         {:>7.3} s",
        t_plain.as_secs_f64()
    );
    println!(
        "  guestkey auto disk:       {:>7.3} s   ratio {:.2}",
        t_auto.as_secs_f64(),
        r(t_auto, t_plain)
    );
    println!(
        "  guestkey attested disk:   {:>7.3} s   ratio {:.2} to plain (goal <= 1.3), {:.2} to auto",
        t_att.as_secs_f64(),
        r(t_att, t_plain),
        r(t_att, t_auto)
    );
    println!("host restart, {n} autostart guests (guestkeyd start to all running):");
    println!(
        "  auto disks:               {:>7.1} s",
        r_auto.as_secs_f64()
    );
    println!(
        "  attested disks:           {:>7.1} s   ratio {:.2}",
        r_att.as_secs_f64(),
        r(r_att, r_auto)
    );
    println!("({} volumes made in {:.0} s)", 2 * n, made.as_secs_f64());
    drop(cleanup);
}
