//! Migration between two libvirt hosts on this machine: the session
//! libvirtds of users gkh1 and gkh2 (scripts/setup), each with its own host
//! UUID and its own real guestkeyd, images on a directory both can use.
//! A running encrypted KVM guest moves from one to the other; its keys are
//! erased at the source, and its volume is re-encrypted at the destination.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::fs::MetadataExt;

use guestkey_tests::image::{opens_with, pattern_intact, qemu_io};
use guestkey_tests::migration::{
    Bed, assert_settled, create_pool, shared_guest, state_of, two_hosts,
};
use guestkey_tests::run;

/// The pid of the QEMU process running `guest` (on whichever host).
fn qemu_pid(guest: &str) -> String {
    run("pgrep", &["-f", &format!("guest={guest},")])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn a_running_guest_migrates_with_its_keys_erased_at_the_source_and_is_rekeyed_at_the_destination() {
    let mut b = two_hosts();
    // A volume on host 1: made by guestkeyd (root) but usable by both
    // session users, because the pool directory is group-writable. The
    // guest, defined through guestkey, is started with plain virsh on host
    // 1 (its hook runs as gkh1 and reaches host 1's guestkeyd).
    let (id, guest, uuid) = shared_guest(&mut b, "mig-disk");
    let Bed {
        s,
        h1,
        h2,
        pool,
        dir,
        mut cleanup,
    } = b;
    let secret = s.json(&["volume", "show", "mig-disk"])["secret_uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = dir.join("mig-disk");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "group-writable pool: mode 0660");
    let old = s.server_key(&id);
    qemu_io(&s.dir, &path, old.expose_secret(), "write -P 0x5c 0 2M").unwrap();
    h1.virsh(&["start", &guest]).unwrap();
    assert_eq!(state_of(&h1, &guest).as_deref(), Some("running"));
    assert!(h1.state.join(format!("guests/{uuid}.sealed")).exists());

    // Bad requests change nothing.
    let bad = s.ctl(&["guest", "migrate", &guest, "--to", "no-such-host"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no host named"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let same = s.ctl(&["guest", "migrate", &guest, "--to", &h1.name]);
    assert!(String::from_utf8_lossy(&same.stderr).contains("already on host"));
    // Pre-flight: host 2 does not see the storage yet.
    let no_storage = s.ctl(&[
        "guest", "migrate", &guest, "--to", &h2.name, "--live", "--unsafe",
    ]);
    assert!(!no_storage.status.success());
    let msg = String::from_utf8_lossy(&no_storage.stderr);
    assert!(
        msg.contains("sees no volume mig-disk") && msg.contains(&h2.name),
        "{msg}"
    );
    let g = s.json(&["guest", "show", &guest]);
    assert_eq!(g["host"], h1.name.as_str());
    assert_eq!(g["migrating_to"], "");
    assert_eq!(s.json(&["volume", "show", "mig-disk"])["state"], "ready");
    assert_eq!(state_of(&h1, &guest).as_deref(), Some("running"));
    assert!(!h2.state.join(format!("guests/{uuid}.sealed")).exists());

    // The real migration, live.
    create_pool(&mut cleanup, &h2, &pool, &dir);
    let pid_before = qemu_pid(&guest);
    assert!(!pid_before.is_empty());
    let g = s.json(&[
        "guest", "migrate", &guest, "--to", &h2.name, "--live", "--unsafe",
    ]);
    assert_eq!(g["host"], h2.name.as_str(), "{g}");
    assert_eq!(g["state"], "running", "{g}");
    assert_eq!(state_of(&h2, &guest).as_deref(), Some("running"));
    assert_eq!(state_of(&h1, &guest), None, "undefined at the source");

    // The source erased the keys: no sealed record, no volume entry, no
    // libvirt secret, and the key's bytes are not in its memory.
    assert!(!h1.state.join(format!("guests/{uuid}.sealed")).exists());
    let vols = std::fs::read_to_string(h1.state.join("volumes.json")).unwrap_or_default();
    assert!(!vols.contains(&id), "{vols}");
    assert!(
        !h1.virsh(&["secret-list"]).unwrap().contains(&secret),
        "no secret left at the source"
    );
    assert!(
        !h2.virsh(&["secret-list"]).unwrap().contains(&secret),
        "the destination's hook removed the secret once QEMU had it"
    );
    let needles = guestkey_tests::memscan::Needles::of(old.expose_secret());
    let found = needles.find_in(h1.daemon.pid());
    assert!(
        found.is_empty(),
        "key bytes in the source guestkeyd: {found:?}"
    );

    // Re-encrypted at the destination (no policy: at once), online: the
    // guest keeps running in the same QEMU process there.
    let pid_at_dest = qemu_pid(&guest);
    s.wait_for(180, "deep rekey at the destination", || {
        let v = s.json(&["volume", "show", "mig-disk"]);
        v["state"] == "ready" && v["key_generation"] == 2
    });
    let v = s.json(&["volume", "show", "mig-disk"]);
    assert_eq!(v["host"], h2.name.as_str());
    assert_eq!(v["rekey_due_unix"], 0);
    assert_eq!(state_of(&h2, &guest).as_deref(), Some("running"));
    assert_eq!(qemu_pid(&guest), pid_at_dest);
    let audit = String::from_utf8_lossy(&s.ctl(&["--json", "audit"]).stdout).into_owned();
    for action in ["guest.migrated", "key.erased", "key.rotated"] {
        assert!(audit.contains(action), "{action} in the audit log");
    }
    h2.virsh(&["destroy", &guest]).unwrap();
    let new = s.server_key(&id);
    pattern_intact(&s.dir, &path, new.expose_secret(), 0x5c, "2M").unwrap();
    assert!(
        !opens_with(&s.dir, &path, "qcow2", old.expose_secret()),
        "the data key the source's QEMU held is gone"
    );
    // And it starts again on host 2 with plain virsh.
    h2.virsh(&["start", &guest]).unwrap();
    assert_eq!(state_of(&h2, &guest).as_deref(), Some("running"));
    h2.virsh(&["destroy", &guest]).unwrap();

    // Back to host 1 while stopped: the definition moves (offline
    // migration), the keys with it, and the volume is re-encrypted again.
    let g = s.json(&["guest", "migrate", &guest, "--to", &h1.name]);
    assert_eq!(g["host"], h1.name.as_str(), "{g}");
    assert_eq!(state_of(&h1, &guest).as_deref(), Some("shut off"));
    assert_eq!(state_of(&h2, &guest), None);
    assert!(!h2.state.join(format!("guests/{uuid}.sealed")).exists());
    s.wait_for(120, "deep rekey back on host 1", || {
        let v = s.json(&["volume", "show", "mig-disk"]);
        v["state"] == "ready" && v["key_generation"] == 3
    });
    h1.virsh(&["start", &guest]).unwrap();
    assert_eq!(state_of(&h1, &guest).as_deref(), Some("running"));
    h1.virsh(&["destroy", &guest]).unwrap();
    let newest = s.server_key(&id);
    pattern_intact(&s.dir, &path, newest.expose_secret(), 0x5c, "2M").unwrap();
    drop(cleanup);
}

/// SIGKILL of the server at a random instant of a live migration (bounded:
/// 3 trials, alternating directions): after its restart the server finishes
/// or abandons the migration by itself, the guest runs on exactly the host
/// the server records, only that host keeps its keys, and the data reads
/// with the server's key.
#[test]
fn a_migration_interrupted_by_a_server_crash_is_finished_after_the_restart() {
    let mut b = two_hosts();
    let (id, guest, uuid) = shared_guest(&mut b, "crash-disk");
    let Bed {
        mut s,
        h1,
        h2,
        pool,
        dir,
        mut cleanup,
    } = b;
    create_pool(&mut cleanup, &h2, &pool, &dir);
    // No re-encryption between the trials: it is tested above.
    s.json(&[
        "policy",
        "set",
        "--volume",
        "crash-disk",
        "--max-key-age",
        "3650d",
        "--mode",
        "deep",
        "--after-migration",
        "365d",
    ]);
    let path = dir.join("crash-disk");
    let key = s.server_key(&id);
    qemu_io(&s.dir, &path, key.expose_secret(), "write -P 0x3d 0 1M").unwrap();
    h1.virsh(&["start", &guest]).unwrap();

    let mut left_pending = 0;
    for trial in 0..3u64 {
        let to = if trial % 2 == 0 { &h2 } else { &h1 };
        let child = s
            .ctl_command(&[
                "guest", "migrate", &guest, "--to", &to.name, "--live", "--unsafe",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        // The first trial kills early, while the migration surely runs;
        // the others at any instant of the first 1.5 s.
        let delay = if trial == 0 {
            150 + nanos % 300
        } else {
            nanos % 1500
        };
        std::thread::sleep(std::time::Duration::from_millis(delay));
        s.server.kill9();
        let _ = child.wait_with_output();
        s.run_server();
        let pending = s.json(&["guest", "show", &guest])["migrating_to"] != "";
        left_pending += u32::from(pending);
        println!("trial {trial}: killed after {delay} ms, migration left pending: {pending}");
        s.wait_for(120, "the migration settled", || {
            s.json(&["guest", "show", &guest])["migrating_to"] == ""
        });
        let g = s.json(&["guest", "show", &guest]);
        let v = s.json(&["volume", "show", "crash-disk"]);
        assert_settled(&h1, &h2, &guest, &uuid, &g, &v, &format!("trial {trial}"));
        pattern_intact(&s.dir, &path, s.server_key(&id).expose_secret(), 0x3d, "1M").unwrap();
    }
    assert!(
        left_pending >= 1,
        "no kill landed while a migration was under way: the trials tested nothing"
    );
    drop(cleanup);
}
