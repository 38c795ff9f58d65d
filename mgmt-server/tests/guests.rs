//! `guestkeyctl guest ...` end to end against the real server binaries,
//! with `common::TestAgent` (a test implementation of the host-agent API)
//! as the host: these are the server's own checks, fast and without
//! libvirt. The same flows against the real guestkeyd and libvirtd are in
//! `tests/tests/`.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn domain(name: &str, disks: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  <devices>\n{disks}  </devices>\n</domain>\n"
    )
}

fn volume_disk(pool: &str, volume: &str, dev: &str) -> String {
    format!(
        "    <disk type='volume' device='disk'>\n      <source pool='{pool}' volume='{volume}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n"
    )
}

fn file_disk(path: &str, dev: &str, device: &str) -> String {
    format!(
        "    <disk type='file' device='{device}'>\n      <source file='{path}'/>\n      <target dev='{dev}' bus='virtio'/>\n      <encryption format='luks'><secret type='passphrase' uuid='00000000-0000-0000-0000-000000000000'/></encryption>\n    </disk>\n"
    )
}

fn ready_volume(s: &TestServer, host: &str, name: &str) -> serde_json::Value {
    s.ok(&[
        "volume", "create", "--host", host, "--pool", "default", "--name", name, "--size", "16M",
    ]);
    s.wait_for(20, "volume ready", || {
        s.json(&["volume", "show", name])["state"] == "ready"
    });
    s.json(&["volume", "show", name])
}

/// Defines guest g1 on kvm-a with volume a-disk, waits until the host has
/// it, and returns the XML file's path.
fn define_g1(s: &TestServer) -> String {
    let ok = write_xml(
        s,
        "ok",
        &domain("g1", &volume_disk("default", "a-disk", "vda")),
    );
    s.ok(&["guest", "define", "--host", "kvm-a", "--xml", &ok]);
    s.wait_for(20, "defined", || {
        s.json(&["guest", "show", "g1"])["pending"] == ""
    });
    ok
}

fn write_xml(s: &TestServer, name: &str, xml: &str) -> String {
    let p = s.dir.join(format!("../{name}.xml"));
    std::fs::write(&p, xml).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn a_guest_gets_encryption_elements_and_exactly_its_keys() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    let root = ready_volume(&s, "kvm-a", "web-root");
    let data = ready_volume(&s, "kvm-a", "web-data");
    let _other = ready_volume(&s, "kvm-a", "unrelated");
    let data_path = format!("/srv/test-agent/default/{}", data["id"].as_str().unwrap());

    let xml = domain(
        "web",
        &(volume_disk("default", "web-root", "vda")
            + &file_disk(&data_path, "vdb", "disk")
            + &file_disk("/isos/d.iso", "sda", "cdrom")),
    );
    let file = write_xml(&s, "web", &xml);
    let g = s.json(&["guest", "define", "--host", "kvm-a", "--xml", &file]);
    assert_eq!(g["state"], "pending-define");
    s.wait_for(20, "guest defined", || {
        s.json(&["guest", "show", "web"])["state"] == "shut off"
    });

    let defines: Vec<_> = a
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            Received::Define { xml, keys, .. } => Some((xml.clone(), keys.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(defines.len(), 1);
    let (sent_xml, keys) = &defines[0];
    let mut ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    let mut want = vec![root["id"].as_str().unwrap(), data["id"].as_str().unwrap()];
    want.sort();
    assert_eq!(ids, want, "exactly the keys of the guest's volumes");
    for v in [&root, &data] {
        let elem = format!(
            "<encryption format='luks'><secret type='passphrase' uuid='{}'/></encryption>",
            v["secret_uuid"].as_str().unwrap()
        );
        assert_eq!(sent_xml.matches(&elem).count(), 1, "{sent_xml}");
    }
    // The cdrom keeps what the operator wrote; the wrong secret of vdb is gone.
    assert_eq!(
        sent_xml
            .matches("00000000-0000-0000-0000-000000000000")
            .count(),
        1,
        "{sent_xml}"
    );
    assert!(
        sent_xml.contains("<uuid>"),
        "a UUID was assigned: {sent_xml}"
    );

    // Lifecycle.
    s.ok(&["guest", "start", "web"]);
    s.wait_for(20, "running", || {
        s.json(&["guest", "show", "web"])["state"] == "running"
    });
    s.ok(&["guest", "stop", "web"]);
    s.wait_for(20, "stopped", || {
        s.json(&["guest", "show", "web"])["state"] == "shut off"
    });
    let uuid = s.json(&["guest", "show", "web"])["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    s.ok(&["guest", "undefine", "web"]);
    s.wait_for(20, "undefined", || {
        s.json(&["guest", "show", &uuid])["state"] == "undefined"
    });
    assert!(s.json(&["guest", "list"]).as_array().unwrap().is_empty());
}

#[test]
fn bad_guest_definitions_are_refused_clearly_and_change_nothing() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-a");
    let mut b = TestAgent::enroll(&s, "kvm-b");
    a.serve();
    b.serve();
    ready_volume(&s, "kvm-a", "a-disk");
    let b_vol = ready_volume(&s, "kvm-b", "b-disk");
    let b_path = format!("/srv/test-agent/default/{}", b_vol["id"].as_str().unwrap());
    let ok = define_g1(&s);
    let before = s.state_snapshot();
    let guests_before = s.ok(&["--json", "guest", "list"]);

    let huge = s.dir.join("../huge.xml");
    std::fs::write(
        &huge,
        format!("<domain><name>x</name>{}</domain>", " ".repeat(2 << 20)),
    )
    .unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            domain("g2", &volume_disk("default", "b-disk", "vda")),
            "its volume is on host kvm-b, not on kvm-a",
        ),
        (
            domain("g2", &file_disk(&b_path, "vda", "disk")),
            "its volume is on host kvm-b",
        ),
        (
            domain("g2", &volume_disk("default", "nope", "vda")),
            "volume nope in pool default is not managed by guestkey",
        ),
        (
            domain("g2", &volume_disk("other", "a-disk", "vda")),
            "volume a-disk is in pool default, not other",
        ),
        (
            domain("g1", &volume_disk("default", "a-disk", "vda")),
            "already defined",
        ),
        ("<domain><name>x</name><devices>".into(), "not well-formed"),
        (
            "<!DOCTYPE x [<!ENTITY l 'lol'>]><domain><name>&l;</name></domain>".into(),
            "DOCTYPE",
        ),
        ("<vm/>".into(), "root element must be <domain>"),
    ];
    for (xml, want) in cases {
        let f = write_xml(&s, "bad", &xml);
        let e = s.fails(&["guest", "define", "--host", "kvm-a", "--xml", &f]);
        assert!(e.contains(want), "expected {want:?} in {e:?}");
    }
    let e = s.fails(&[
        "guest",
        "define",
        "--host",
        "kvm-a",
        "--xml",
        huge.to_str().unwrap(),
    ]);
    assert!(e.contains("limited to 1 MiB"), "{e}");
    let e = s.fails(&["guest", "define", "--host", "kvm-zz", "--xml", &ok]);
    assert!(e.contains("no host named \"kvm-zz\""), "{e}");
    assert_eq!(s.state_snapshot(), before);
    assert_eq!(s.ok(&["--json", "guest", "list"]), guests_before);
    // Host B never received anything but its own volume's key.
    let b_keys: Vec<String> = b
        .creates()
        .iter()
        .map(|r| match r {
            Received::Create { volume_id, .. } => volume_id.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(b_keys, vec![b_vol["id"].as_str().unwrap().to_owned()]);
    assert!(
        !b.received
            .lock()
            .unwrap()
            .iter()
            .any(|r| matches!(r, Received::Define { .. }))
    );
}

/// Issue 5's commands (rekey, policy, migrate, encrypt, decrypt) refuse bad
/// requests with a message naming what to fix, and change nothing.
#[test]
fn bad_rekey_policy_migration_and_conversion_requests_are_refused_clearly_and_change_nothing() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    // kvm-b is enrolled but not serving; kvm-c is added but never enrolled.
    let _b = TestAgent::enroll(&s, "kvm-b");
    s.ok(&["host", "add", "kvm-c", "--address", "127.0.0.1:9"]);
    ready_volume(&s, "kvm-a", "a-disk");
    ready_volume(&s, "kvm-a", "loose-disk");
    define_g1(&s);
    let before = s.state_snapshot();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        // volume rekey
        (
            vec!["volume", "rekey", "nope", "--deep"],
            "no volume named or with id \"nope\"",
        ),
        (
            vec!["volume", "rekey", "a-disk", "--shallow", "--deep"],
            "cannot be used with",
        ),
        (
            vec!["volume", "rekey", "a-disk", "--online", "--offline"],
            "cannot be used with",
        ),
        (
            vec!["volume", "rekey", "a-disk", "--deep", "--bandwidth", "fast"],
            "invalid size \"fast\"",
        ),
        // policy set / remove
        (
            vec![
                "policy",
                "set",
                "--volume",
                "nope",
                "--max-key-age",
                "90d",
                "--mode",
                "deep",
            ],
            "no volume named or with id \"nope\"",
        ),
        (
            vec![
                "policy",
                "set",
                "--volume",
                "a-disk",
                "--max-key-age",
                "90y",
                "--mode",
                "deep",
            ],
            "90y",
        ),
        (
            vec![
                "policy",
                "set",
                "--volume",
                "a-disk",
                "--max-key-age",
                "0s",
                "--mode",
                "deep",
            ],
            "0s",
        ),
        (
            vec![
                "policy",
                "set",
                "--volume",
                "a-disk",
                "--max-key-age",
                "90d",
                "--mode",
                "medium",
            ],
            "medium",
        ),
        (
            vec![
                "policy",
                "set",
                "--volume",
                "a-disk",
                "--max-key-age",
                "90d",
                "--mode",
                "deep",
                "--after-migration",
                "soon",
            ],
            "soon",
        ),
        (
            vec![
                "policy",
                "set",
                "--pool",
                "../p",
                "--max-key-age",
                "90d",
                "--mode",
                "deep",
            ],
            "invalid pool name",
        ),
        (
            vec![
                "policy",
                "set",
                "--pool",
                "default",
                "--volume",
                "a-disk",
                "--max-key-age",
                "90d",
                "--mode",
                "deep",
            ],
            "cannot be used with",
        ),
        (
            vec!["policy", "remove", "--pool", "default"],
            "no pool policy for default",
        ),
        // guest migrate
        (
            vec!["guest", "migrate", "nope", "--to", "kvm-b"],
            "no guest named or with UUID \"nope\"",
        ),
        (
            vec!["guest", "migrate", "g1", "--to", "kvm-zz"],
            "no host named \"kvm-zz\"",
        ),
        (
            vec!["guest", "migrate", "g1", "--to", "kvm-a"],
            "already on host kvm-a",
        ),
        (
            vec!["guest", "migrate", "g1", "--to", "kvm-c"],
            "host kvm-c has not enrolled yet",
        ),
        // volume encrypt / decrypt
        (
            vec![
                "volume", "encrypt", "--host", "kvm-zz", "--pool", "default", "--name", "plain",
            ],
            "no host named \"kvm-zz\"",
        ),
        (
            vec![
                "volume", "encrypt", "--host", "kvm-a", "--pool", "default", "--name", "a-disk",
            ],
            "a volume named a-disk already exists",
        ),
        (
            vec![
                "volume", "encrypt", "--host", "kvm-a", "--pool", "default", "--name", "p",
                "--format", "vmdk",
            ],
            "invalid format \"vmdk\"",
        ),
        (
            vec![
                "volume", "encrypt", "--host", "kvm-a", "--pool", "../x", "--name", "p",
            ],
            "invalid pool name",
        ),
        (vec!["volume", "decrypt", "loose-disk"], "--yes-i-know"),
        (vec!["volume", "decrypt", "a-disk", "--yes-i-know"], "g1"),
        (
            vec!["volume", "decrypt", "nope", "--yes-i-know"],
            "no volume named or with id \"nope\"",
        ),
    ];
    let mut wrong = vec![];
    for (args, want) in cases {
        let e = s.fails(&args);
        if !e.contains(want) {
            wrong.push(format!("{}: expected {want:?} in {e:?}", args.join(" ")));
        }
        assert_eq!(
            s.state_snapshot(),
            before,
            "{} changed state",
            args.join(" ")
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // An unreachable destination is found before the guest moves: the
    // migration is undone (volumes ready, no journal row, guest on kvm-a),
    // and the guest shows why.
    let e = s.fails(&["guest", "migrate", "g1", "--to", "kvm-b"]);
    assert!(e.contains("host kvm-b") && e.contains("unreachable"), "{e}");
    let g = s.json(&["guest", "show", "g1"]);
    assert_eq!(g["host"], "kvm-a");
    assert_eq!(g["migrating_to"], "");
    assert!(g["last_error"].as_str().unwrap().contains("kvm-b"), "{g}");
    assert_eq!(s.json(&["volume", "show", "a-disk"])["state"], "ready");
    assert_eq!(s.scalar("SELECT COUNT(*) FROM guest_migrations"), "0");
}
