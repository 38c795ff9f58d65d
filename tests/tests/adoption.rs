//! `guestkeyctl guest adopt`: guests made without guestkey (by
//! `virt-install --import`, Debian's virtinst, and by plain `virsh define`)
//! come under guestkey on the real libvirtd/KVM, server, guestkeyd and
//! hook: their cleartext disks are encrypted (online while the guest runs,
//! offline when it is stopped) with their data kept, and they start with
//! plain `virsh start` afterwards. Every refusal changes nothing.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use guestkey_tests::image::pattern_intact_fmt;
use guestkey_tests::stack::Stack;
use guestkey_tests::{Cleanup, run, virsh};

/// A cleartext volume made by libvirt in the test pool, `byte` written over
/// its first MiB.
fn plain_volume(s: &Stack, name: &str, format: &str, byte: u8) -> PathBuf {
    virsh(&["vol-create-as", &s.pool, name, "16M", "--format", format]).unwrap();
    let path = s.dir.join("pool").join(name);
    run(
        "qemu-io",
        &[
            "-f",
            format,
            "-c",
            &format!("write -P {byte:#x} 0 1M"),
            path.to_str().unwrap(),
        ],
    )
    .unwrap();
    path
}

fn encrypted(path: &Path) -> bool {
    run("qemu-img", &["info", "-U", path.to_str().unwrap()])
        .unwrap()
        .contains("encrypted: yes")
}

/// Still cleartext with its pattern (read-only, shared).
fn cleartext_intact(path: &Path, format: &str, byte: u8) -> bool {
    !encrypted(path)
        && run(
            "qemu-io",
            &[
                "-r",
                "-U",
                "-f",
                format,
                "-c",
                &format!("read -P {byte:#x} 0 1M"),
                path.to_str().unwrap(),
            ],
        )
        .is_ok_and(|out| !out.contains("Pattern verification failed"))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pid_of(guest: &str) -> String {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{guest}.pid")).unwrap()
}

/// `virt-install --import` of a guest on `disks` (path, format, extra
/// options), started (and left running) as virt-install does.
fn virt_install(cleanup: &mut Cleanup, name: &str, disks: &[(&Path, &str, &str)]) {
    let mut args: Vec<String> = [
        "--connect",
        "qemu:///system",
        "--name",
        name,
        "--memory",
        "128",
        "--vcpus",
        "1",
        // virt-install's default, host-passthrough, sets MSRs that this
        // nested KVM refuses (so do host-model and the named models): no
        // <cpu> element, libvirt's own default.
        "--cpu",
        "clear",
        "--import",
        "--osinfo",
        "detect=off,require=off",
        "--network",
        "none",
        "--graphics",
        "none",
        "--noautoconsole",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (path, format, extra) in disks {
        args.push("--disk".into());
        args.push(format!(
            "path={},format={format},bus=virtio{extra}",
            path.display()
        ));
    }
    cleanup.virsh(&["undefine", name]);
    cleanup.virsh(&["destroy", name]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("virt-install", &refs).unwrap();
}

#[test]
fn a_running_guest_made_by_virt_install_is_adopted_online_and_starts_with_virsh() {
    let s = Stack::start();
    let a = plain_volume(&s, "adopt-a.qcow2", "qcow2", 0x5a);
    let b = plain_volume(&s, "adopt-b.raw", "raw", 0x6b);
    let ro = plain_volume(&s, "adopt-ro.qcow2", "qcow2", 0x7c);
    let guest = format!("gk-test-{}-adopt", std::process::id());
    let mut cleanup = Cleanup::default();
    virt_install(
        &mut cleanup,
        &guest,
        &[
            (&a, "qcow2", ""),
            (&b, "raw", ""),
            (&ro, "qcow2", ",readonly=on"),
        ],
    );
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    let pid = pid_of(&guest);
    let unchanged = |why: &str| {
        assert!(cleartext_intact(&a, "qcow2", 0x5a), "{why}: vda changed");
        assert!(cleartext_intact(&b, "raw", 0x6b), "{why}: vdb changed");
        assert!(
            !s.ctl(&["volume", "show", "adopt-a.qcow2"]).status.success(),
            "{why}: a volume record was made"
        );
        assert!(
            !s.ctl(&["guest", "show", &guest]).status.success(),
            "{why}: a guest record was made"
        );
        let inactive = virsh(&["dumpxml", "--inactive", &guest]).unwrap();
        assert!(!inactive.contains("<encryption"), "{why}: {inactive}");
    };

    // Bad requests: an error naming what to fix, and nothing changed.
    let adopt = |args: &[&str]| {
        let mut all = vec!["guest", "adopt"];
        all.extend_from_slice(args);
        s.ctl(&all)
    };
    let e = stderr(&adopt(&["--host", &s.host, &guest, "--skip", "vdz"]));
    assert!(
        e.contains("has no disk vdz") && e.contains("vda, vdb, vdc"),
        "{e}"
    );
    let e = stderr(&adopt(&["--host", &s.host, "no-such-guest"]));
    assert!(
        e.contains("no domain named or with UUID \"no-such-guest\""),
        "{e}"
    );
    let e = stderr(&adopt(&["--host", "no-such-host", &guest]));
    assert!(e.contains("no-such-host"), "{e}");
    let e = stderr(&adopt(&["--host", &s.host, "bad\u{7}name"]));
    assert!(e.contains("control characters"), "{e}");
    unchanged("after the refusals");

    // Adopted while it runs: both writable disks move into LUKS images
    // under the same QEMU process; the read-only one stays as it is.
    let out = adopt(&["--host", &s.host, &guest]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = s.json(&["guest", "show", &guest]);
    assert_eq!(r["pending"], "", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    let mut vols: Vec<String> = r["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    vols.sort();
    assert_eq!(vols, ["adopt-a.qcow2", "adopt-b.raw"]);
    assert_eq!(pid_of(&guest), pid, "the same QEMU process runs the guest");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("vdc (read-only)"), "{text}");
    let va = s.json(&["volume", "show", "adopt-a.qcow2"]);
    let vb = s.json(&["volume", "show", "adopt-b.raw"]);
    assert_eq!(
        (va["state"].as_str(), vb["state"].as_str()),
        (Some("ready"), Some("ready"))
    );
    assert_eq!(vb["format"], "raw");
    let inactive = virsh(&["dumpxml", "--inactive", &guest]).unwrap();
    for v in [&va, &vb] {
        assert!(
            inactive.contains(v["secret_uuid"].as_str().unwrap()),
            "{inactive}"
        );
    }
    assert!(inactive.contains(a.to_str().unwrap()) && inactive.contains(b.to_str().unwrap()));

    // Stopped and started with plain virsh: the hook hands the keys over.
    virsh(&["destroy", &guest]).unwrap();
    assert!(encrypted(&a) && encrypted(&b));
    let ka = s.server_key(va["id"].as_str().unwrap());
    let kb = s.server_key(vb["id"].as_str().unwrap());
    pattern_intact_fmt(&s.dir, &a, "qcow2", ka.expose_secret(), 0x5a, "1M").unwrap();
    pattern_intact_fmt(&s.dir, &b, "raw", kb.expose_secret(), 0x6b, "1M").unwrap();
    assert!(
        cleartext_intact(&ro, "qcow2", 0x7c),
        "the read-only disk is untouched"
    );
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");

    // Twice is refused; the audit log says who adopted what.
    let e = stderr(&adopt(&["--host", &s.host, &guest]));
    assert!(e.contains("already under guestkey"), "{e}");
    let adopted = s.audit("guest.adopted");
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    let detail = adopted[0].to_string();
    assert!(
        detail.contains("adopt-a.qcow2") && detail.contains("vdc (read-only)"),
        "{detail}"
    );
    drop(cleanup);
}

/// A guest of the operator's own on `disks` (path, format), defined with
/// plain `virsh define`; `graphics` goes into its devices.
fn define_plain(
    s: &Stack,
    cleanup: &mut Cleanup,
    name: &str,
    disks: &[(&Path, &str)],
    graphics: &str,
) {
    let devs: String = disks
        .iter()
        .zip(["vda", "vdb", "vdc"])
        .map(|((p, f), t)| {
            format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{f}'/>\n      <source file='{}'/>\n      <target dev='{t}' bus='virtio'/>\n    </disk>\n",
                p.display()
            )
        })
        .collect();
    let xml = format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <memory unit='MiB'>128</memory>\n  <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <devices>\n{devs}    {graphics}\n  </devices>\n</domain>\n"
    );
    let file = s.dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", file.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["undefine", name]);
    cleanup.virsh(&["destroy", name]);
}

#[test]
fn a_stopped_guest_is_adopted_offline_and_disks_it_cannot_take_are_refused_first() {
    let s = Stack::start();
    let a = plain_volume(&s, "offline-a.qcow2", "qcow2", 0x21);
    // An image outside every libvirt pool.
    let outside = s.dir.join("outside.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            outside.to_str().unwrap(),
            "16M",
        ],
    )
    .unwrap();
    let guest = format!("gk-test-{}-adopt-off", std::process::id());
    let mut cleanup = Cleanup::default();
    define_plain(
        &s,
        &mut cleanup,
        &guest,
        &[(&a, "qcow2"), (&outside, "qcow2")],
        "",
    );
    let e = stderr(&s.ctl(&["guest", "adopt", "--host", &s.host, &guest]));
    assert!(
        e.contains("disk vdb") && e.contains("virsh pool-define-as") && e.contains("--skip vdb"),
        "{e}"
    );
    assert!(cleartext_intact(&a, "qcow2", 0x21), "vda changed");
    assert!(
        !s.ctl(&["volume", "show", "offline-a.qcow2"])
            .status
            .success()
    );

    // A VNC password would be lost by a definition rewritten without it.
    let pw = format!("{guest}-pw");
    define_plain(
        &s,
        &mut cleanup,
        &pw,
        &[(&a, "qcow2")],
        "<graphics type='vnc' listen='127.0.0.1' autoport='yes' passwd='notshown'/>",
    );
    let e = stderr(&s.ctl(&["guest", "adopt", "--host", &s.host, &pw]));
    assert!(e.contains("--security-info"), "{e}");
    assert!(cleartext_intact(&a, "qcow2", 0x21), "vda changed");
    virsh(&["undefine", &pw]).unwrap();

    // With the outside disk left cleartext: encrypted offline, and starts.
    let out = s.ctl(&["guest", "adopt", "--host", &s.host, &guest, "--skip", "vdb"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let g = s.json(&["guest", "show", &guest]);
    assert_eq!(g["pending"], "", "{g}");
    assert_eq!(g["volumes"][0], "offline-a.qcow2", "{g}");
    let v = s.json(&["volume", "show", "offline-a.qcow2"]);
    assert!(encrypted(&a) && !encrypted(&outside));
    let key = s.server_key(v["id"].as_str().unwrap());
    pattern_intact_fmt(&s.dir, &a, "qcow2", key.expose_secret(), 0x21, "1M").unwrap();
    let inactive = virsh(&["dumpxml", "--inactive", &guest]).unwrap();
    assert!(
        inactive.contains(v["secret_uuid"].as_str().unwrap()),
        "{inactive}"
    );
    virsh(&["start", &guest]).unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    drop(cleanup);
}

/// `qemu-img create` of `name` in the test pool with extra arguments.
fn pool_image(s: &Stack, name: &str, args: &[&str]) -> PathBuf {
    let path = s.dir.join("pool").join(name);
    let mut all = vec!["create", "-q"];
    all.extend_from_slice(args);
    all.push(path.to_str().unwrap());
    all.push("16M");
    // An encrypted image makes qemu-img calibrate its PBKDF, which fails
    // now and then on this machine: retried as guestkeyd retries it.
    guestkey_tests::retry_calibration(|| run("qemu-img", &all)).unwrap();
    path
}

/// The entry of volume `name` in `pool show --json`.
fn shown(view: &serde_json::Value, name: &str) -> serde_json::Value {
    view["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not shown: {view}"))
        .clone()
}

#[test]
fn a_managed_pool_offers_its_cleartext_volumes_and_encrypts_them() {
    let s = Stack::start();
    let clear = plain_volume(&s, "mp-clear.qcow2", "qcow2", 0x31);
    let under = plain_volume(&s, "mp-under.raw", "raw", 0x32);
    pool_image(
        &s,
        "mp-foreign.qcow2",
        &[
            "--object",
            "secret,id=s0,data=not-ours",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
    );
    // mp-child.qcow2 is built on mp-base.qcow2; mp-datafile.qcow2 keeps its
    // data in a file outside the pool.
    let base = pool_image(&s, "mp-base.qcow2", &["-f", "qcow2"]);
    pool_image(
        &s,
        "mp-child.qcow2",
        &["-f", "qcow2", "-F", "qcow2", "-b", base.to_str().unwrap()],
    );
    let outside = s.dir.join("outside-data.raw");
    pool_image(
        &s,
        "mp-datafile.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", outside.display()),
        ],
    );
    let made = s.json(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "mp-managed",
        "--size",
        "16M",
    ]);
    assert_eq!(made["state"], "ready", "{made}");
    // A guest of the operator's own on mp-under.raw.
    let guest = format!("gk-test-{}-pool", std::process::id());
    let mut cleanup = Cleanup::default();
    define_plain(&s, &mut cleanup, &guest, &[(&under, "raw")], "");

    // Any pool can be shown; cleartext volumes are offered only once the
    // pool is managed.
    let view = s.json(&["pool", "show", "--host", &s.host, &s.pool]);
    assert!(view["managed"].is_null(), "{view}");
    assert_eq!(shown(&view, "mp-managed")["state"], "managed");
    assert_eq!(shown(&view, "mp-managed")["volume_id"], made["id"]);
    let c = shown(&view, "mp-clear.qcow2");
    assert_eq!(
        (c["state"].as_str(), c["format"].as_str()),
        (Some("cleartext"), Some("qcow2")),
        "{c}"
    );
    assert_eq!(c["capacity_bytes"], 16 << 20, "{c}");
    let u = shown(&view, "mp-under.raw");
    assert_eq!(u["used_by"][0], guest, "{u}");
    assert_eq!(u["adopt_domain"], guest, "{u}");
    let why = |name: &str| shown(&view, name)["detail"].as_str().unwrap().to_owned();
    assert!(why("mp-foreign.qcow2").contains("encrypted by something other"));
    assert!(why("mp-child.qcow2").contains("backing file"));
    assert!(why("mp-datafile.qcow2").contains("external data file"));
    assert!(
        why("mp-base.qcow2").contains("backing file of mp-child.qcow2"),
        "{view}"
    );
    let text =
        String::from_utf8_lossy(&s.ctl(&["pool", "show", "--host", &s.host, &s.pool]).stdout)
            .into_owned();
    assert!(
        text.contains("not managed")
            && text.contains(&format!(
                "guestkeyctl guest adopt --host {} {guest}",
                s.host
            )),
        "{text}"
    );

    // Bad requests: an error naming what to fix, nothing changed.
    let fails = |args: &[&str]| {
        let o = s.ctl(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        stderr(&o)
    };
    let e = fails(&["pool", "encrypt", "--host", &s.host, &s.pool, "--all"]);
    assert!(
        e.contains("is not managed") && e.contains("pool manage"),
        "{e}"
    );
    let e = fails(&["pool", "manage", "--host", &s.host, "no-such-pool"]);
    assert!(e.contains("no storage pool named no-such-pool"), "{e}");
    let e = fails(&["pool", "manage", "--host", "no-such-host", &s.pool]);
    assert!(e.contains("no-such-host"), "{e}");
    let e = fails(&["pool", "show", "--host", &s.host, "a/b"]);
    assert!(e.contains("pool name"), "{e}");
    let e = fails(&["pool", "encrypt", "--host", &s.host, &s.pool]);
    assert!(e.contains("--all"), "{e}");
    assert!(s.json(&["pool", "list"]).as_array().unwrap().is_empty());
    let o = s.ctl(&["pool", "offers"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("No managed pools"),
        "{o:?}"
    );

    let m = s.json(&["pool", "manage", "--host", &s.host, &s.pool]);
    assert_eq!(m[0]["pool"], s.pool.as_str(), "{m}");
    assert_eq!(s.json(&["pool", "list"]), m);
    let offers = s.json(&["pool", "offers"]);
    let mut offered: Vec<&str> = offers["offered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    offered.sort_unstable();
    assert_eq!(offered, ["mp-clear.qcow2", "mp-under.raw"], "{offers}");

    // Only offered volumes, each checked before the first encryption.
    let e = fails(&[
        "pool",
        "encrypt",
        "--host",
        &s.host,
        &s.pool,
        "mp-clear.qcow2",
        "mp-foreign.qcow2",
    ]);
    assert!(
        e.contains("mp-foreign.qcow2 is not offered") && e.contains("nothing was encrypted"),
        "{e}"
    );
    assert!(cleartext_intact(&clear, "qcow2", 0x31), "mp-clear changed");

    // --all: the free volume is encrypted, the guest's one left for
    // `guest adopt`.
    let done = s.json(&["pool", "encrypt", "--host", &s.host, &s.pool, "--all"]);
    let result = |name: &str| {
        done.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {done}"))["result"]
            .clone()
    };
    assert_eq!(result("mp-clear.qcow2"), "encrypted", "{done}");
    assert_eq!(result("mp-under.raw"), "left", "{done}");
    let v = s.json(&["volume", "show", "mp-clear.qcow2"]);
    assert_eq!(v["state"], "ready", "{v}");
    assert!(encrypted(&clear));
    let key = s.server_key(v["id"].as_str().unwrap());
    pattern_intact_fmt(&s.dir, &clear, "qcow2", key.expose_secret(), 0x31, "1M").unwrap();
    assert!(cleartext_intact(&under, "raw", 0x32), "mp-under changed");
    let view = s.json(&["pool", "show", "--host", &s.host, &s.pool]);
    assert_eq!(shown(&view, "mp-clear.qcow2")["state"], "managed", "{view}");
    assert_eq!(shown(&view, "mp-under.raw")["state"], "offered", "{view}");

    assert_eq!(s.audit("pool.managed").len(), 1);
    s.json(&["pool", "unmanage", "--host", &s.host, &s.pool]);
    assert_eq!(s.audit("pool.unmanaged").len(), 1);
    assert!(s.json(&["pool", "list"]).as_array().unwrap().is_empty());
    drop(cleanup);
}
