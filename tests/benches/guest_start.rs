//! Benchmark: guest start time with guestkey-encrypted disks, as ratios to
//! the same guest with plain disks, measured in one run (hook and
//! guestkeyd included: `virsh start` end to end). Next to it the anchor: a
//! LUKS volume made by libvirt's own `vol-create` with default settings,
//! whose key stretching QEMU pays at every start. Also: time to create one
//! encrypted volume through guestkey.
//!
//! `cargo build --workspace --bins && cargo bench -p guestkey-tests --bench guest_start`
//! (`-- --quick` for fewer rounds; `-- --tpm` on a host whose keys are sealed
//! to a TPM simulator). Needs root and scripts/setup.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use guestkey_tests::stack::Stack;
use guestkey_tests::{Cleanup, virsh};

fn disk(i: usize, source: &str, fmt: &str, encryption: &str) -> String {
    let dev = (b'a' + i as u8) as char;
    format!(
        "<disk type='{}' device='disk'><driver name='qemu' type='{fmt}'/>{source}<target dev='vd{dev}' bus='virtio'/>{encryption}</disk>",
        if source.contains("pool=") {
            "volume"
        } else {
            "file"
        }
    )
}

fn domain(name: &str, disks: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>"
    )
}

fn define(s: &Stack, cleanup: &mut Cleanup, name: &str, xml: String, via_guestkey: bool) {
    let f = s.dir.join(format!("{name}.xml"));
    std::fs::write(&f, xml).unwrap();
    if via_guestkey {
        s.json(&[
            "guest",
            "define",
            "--host",
            &s.host,
            "--xml",
            f.to_str().unwrap(),
        ]);
        s.wait_for(60, "defined", || {
            s.json(&["guest", "show", name])["pending"] == ""
        });
    } else {
        virsh(&["define", f.to_str().unwrap()]).unwrap();
    }
    cleanup.virsh(&["undefine", name]);
    cleanup.virsh(&["destroy", name]);
}

/// One `virsh start` of `name`, timed, then destroy.
fn start_once(name: &str) -> Duration {
    let s = Instant::now();
    virsh(&["start", name]).unwrap();
    let e = s.elapsed();
    virsh(&["destroy", name]).unwrap();
    e
}

/// The median of `rounds` starts of each guest of `names`, the guests
/// taken in turn in every round (so that a slow minute of this shared
/// machine falls on all of them alike, not on one guest's rounds).
fn start_times(names: &[String], rounds: usize) -> Vec<Duration> {
    let mut t: Vec<Vec<Duration>> = vec![vec![]; names.len()];
    for _ in 0..rounds {
        for (i, n) in names.iter().enumerate() {
            t[i].push(start_once(n));
        }
    }
    t.into_iter()
        .map(|mut v| {
            v.sort();
            v[rounds / 2]
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 7 };
    // `--tpm`: the host's keys sealed to a TPM (swtpm); a start unseals
    // nothing from the TPM (guestkeyd did at its own start), so the figures
    // should match a file-sealed host's.
    let tpm = std::env::args()
        .any(|a| a == "--tpm")
        .then(guestkey_testkit::Swtpm::start);
    let authority_dir = guestkey_testkit::temp_dir("bench-authority");
    // Removed at the end, on a panic, and on Ctrl-C (SIGINT/SIGTERM/SIGHUP).
    let _made = guestkey_testkit::cleanup::Made::dir(&authority_dir);
    let authority = authority_dir.join("authority.pk8");
    let s = match &tpm {
        Some(t) => Stack::start_with(&[
            "--tpm".into(),
            "--tpm-tcti".into(),
            t.tcti(),
            "--tpm-authority-key".into(),
            authority.to_str().unwrap().into(),
        ]),
        None => Stack::start(),
    };
    if tpm.is_some() {
        assert!(s.state_dir().join("tpm/store.key.tpm").exists());
        println!("host keys sealed to the TPM (swtpm)");
    }
    let pid = std::process::id();
    let mut cleanup = Cleanup::default();
    let pool_dir = s.dir.join("pool");

    // Plain qcow2 disks.
    let plain: Vec<String> = (0..4)
        .map(|i| {
            let p = pool_dir.join(format!("plain-{i}.qcow2"));
            guestkey_tests::run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"],
            )
            .unwrap();
            p.to_str().unwrap().to_owned()
        })
        .collect();
    // guestkey volumes: the time of each `guestkeyctl volume create`, the
    // admin command that returns once the host made the volume (ready).
    let created = |name: &str, format: &str| {
        let t = Instant::now();
        let v = s.json(&[
            "volume", "create", "--host", &s.host, "--pool", &s.pool, "--name", name, "--size",
            "16M", "--format", format,
        ]);
        let took = t.elapsed();
        assert_eq!(v["state"], "ready", "{v}");
        took
    };
    let mut create: Vec<Duration> = (0..4)
        .map(|i| created(&format!("bench-{i}"), "qcow2"))
        .collect();
    create.sort();
    let mut create_raw: Vec<Duration> = (0..4)
        .map(|i| created(&format!("bench-raw-{i}"), "raw"))
        .collect();
    create_raw.sort();

    let names: Vec<String> = ["plain1", "plain4", "gk1", "gk4", "libvirt1"]
        .iter()
        .map(|n| format!("gk-test-{pid}-{n}"))
        .collect();
    let plain_disks = |n: usize| {
        (0..n)
            .map(|i| disk(i, &format!("<source file='{}'/>", plain[i]), "qcow2", ""))
            .collect::<String>()
    };
    let gk_disks = |n: usize| {
        (0..n)
            .map(|i| {
                disk(
                    i,
                    &format!("<source pool='{}' volume='bench-{i}'/>", s.pool),
                    "qcow2",
                    "",
                )
            })
            .collect::<String>()
    };
    define(
        &s,
        &mut cleanup,
        &names[0],
        domain(&names[0], &plain_disks(1)),
        false,
    );
    define(
        &s,
        &mut cleanup,
        &names[1],
        domain(&names[1], &plain_disks(4)),
        false,
    );
    define(
        &s,
        &mut cleanup,
        &names[2],
        domain(&names[2], &gk_disks(1)),
        true,
    );
    define(
        &s,
        &mut cleanup,
        &names[3],
        domain(&names[3], &gk_disks(4)),
        true,
    );

    // Anchor: libvirt's own vol-create (default LUKS settings) with a
    // persistent private secret set by hand.
    let secret = uuid::Uuid::new_v4().to_string();
    let vol = pool_dir.join("libvirt-default.qcow2");
    let sx = s.dir.join("secret.xml");
    std::fs::write(&sx, format!("<secret ephemeral='no' private='yes'><uuid>{secret}</uuid><usage type='volume'><volume>{}</volume></usage></secret>", vol.display())).unwrap();
    virsh(&["secret-define", sx.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["secret-undefine", &secret]);
    let pass = s.dir.join("pass");
    std::fs::write(&pass, "anchor-passphrase-0123456789abcdef").unwrap();
    virsh(&[
        "secret-set-value",
        &secret,
        "--file",
        pass.to_str().unwrap(),
        "--plain",
    ])
    .unwrap();
    let enc = format!(
        "<encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption>"
    );
    let vx = s.dir.join("vol.xml");
    std::fs::write(&vx, format!("<volume><name>libvirt-default.qcow2</name><capacity unit='MiB'>16</capacity><target><format type='qcow2'/>{enc}</target></volume>")).unwrap();
    let t = Instant::now();
    virsh(&["vol-create", &s.pool, vx.to_str().unwrap()]).unwrap();
    let libvirt_create = t.elapsed();
    define(
        &s,
        &mut cleanup,
        &names[4],
        domain(
            &names[4],
            &disk(
                0,
                &format!("<source file='{}'/>", vol.display()),
                "qcow2",
                &enc,
            ),
        ),
        false,
    );

    let times = start_times(&names, rounds);
    let r = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "guest start, median of {rounds} rounds, the guests in turn (virsh start, 64 MiB KVM guest, hook included):"
    );
    println!(
        "  plain, 1 disk:                 {:>7.3} s",
        times[0].as_secs_f64()
    );
    println!(
        "  guestkey, 1 disk:              {:>7.3} s   ratio {:.2} (goal <= 1.15)",
        times[2].as_secs_f64(),
        r(times[2], times[0])
    );
    println!(
        "  plain, 4 disks:                {:>7.3} s",
        times[1].as_secs_f64()
    );
    println!(
        "  guestkey, 4 disks:             {:>7.3} s   ratio {:.2} (goal <= 1.15)",
        times[3].as_secs_f64(),
        r(times[3], times[1])
    );
    println!(
        "  libvirt vol-create default, 1: {:>7.3} s   ratio {:.2} (anchor)",
        times[4].as_secs_f64(),
        r(times[4], times[0])
    );
    println!(
        "encrypted volume creation, `guestkeyctl volume create` until ready (median of 4; goal <= 0.3 s): qcow2 {:.3} s, raw LUKS {:.3} s; libvirt vol-create {:.3} s",
        create[create.len() / 2].as_secs_f64(),
        create_raw[create_raw.len() / 2].as_secs_f64(),
        libvirt_create.as_secs_f64()
    );
    drop(cleanup);
}
