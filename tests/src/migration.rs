//! The migration bed: two libvirt hosts on this machine (the session
//! libvirtds of users gkh1 and gkh2 that scripts/setup makes, each with its
//! own guestkeyd), a pool folder both can use, and a guest on a volume in
//! it. Used by `tests/migration.rs` and `tests/replicas.rs`.

use std::path::PathBuf;

use crate::stack::{SessionHost, Stack};
use crate::{Cleanup, run, unique_name, volume_domain_xml};

/// A directory both session users can use (group kvm), as a transient dir
/// pool named `pool` on `hosts`.
pub fn shared_pool(cleanup: &mut Cleanup, pool: &str) -> PathBuf {
    let dir = PathBuf::from("/srv/guestkey-shared").join(pool);
    std::fs::create_dir_all(&dir).expect("migration bed");
    run("chgrp", &["kvm", dir.to_str().expect("migration bed")]).expect("migration bed");
    run("chmod", &["2770", dir.to_str().expect("migration bed")]).expect("migration bed");
    let d = dir.clone();
    cleanup.push(move || {
        let _ = std::fs::remove_dir_all(d);
    });
    dir
}

/// `pool` on `host`: a transient dir pool over `dir`, destroyed by
/// `cleanup`.
pub fn create_pool(cleanup: &mut Cleanup, host: &SessionHost, pool: &str, dir: &std::path::Path) {
    host.virsh(&[
        "pool-create-as",
        pool,
        "dir",
        "--target",
        dir.to_str().expect("migration bed"),
    ])
    .expect("migration bed");
    let uri = host.uri.clone();
    let pool = pool.to_owned();
    cleanup.push(move || {
        let _ = run("virsh", &["-c", &uri, "pool-destroy", &pool]);
    });
}

/// `virsh domstate` of `guest` on `host` (None: no such guest there).
pub fn state_of(host: &SessionHost, guest: &str) -> Option<String> {
    host.virsh(&["domstate", guest])
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The server, the two session hosts, and a shared pool known to host 1.
pub struct Bed {
    /// The server, its host and pool.
    pub s: Stack,
    /// Host 1 (user gkh1).
    pub h1: SessionHost,
    /// Host 2 (user gkh2).
    pub h2: SessionHost,
    /// The shared pool's name.
    pub pool: String,
    /// The shared pool's folder.
    pub dir: PathBuf,
    /// Undo steps.
    pub cleanup: Cleanup,
}

/// A new stack with both session hosts and the shared pool on host 1.
pub fn two_hosts() -> Bed {
    two_hosts_on(Stack::start())
}

/// As [`two_hosts`], on a stack started otherwise (its server on
/// PostgreSQL, say).
pub fn two_hosts_on(s: Stack) -> Bed {
    let h1 = s.session_host("gkh1");
    let h2 = s.session_host("gkh2");
    let mut cleanup = Cleanup::default();
    let pool = unique_name("mig-pool");
    let dir = shared_pool(&mut cleanup, &pool);
    create_pool(&mut cleanup, &h1, &pool, &dir);
    Bed {
        s,
        h1,
        h2,
        pool,
        dir,
        cleanup,
    }
}

/// A 16 MiB volume made by host 1's guestkeyd in the shared pool, and a
/// guest on it defined through guestkey on host 1 (removed from both hosts
/// by the bed's cleanup). Returns the volume id and the guest's name and
/// UUID.
pub fn shared_guest(b: &mut Bed, volume: &str) -> (String, String, String) {
    let s = &b.s;
    s.json(&[
        "volume", "create", "--host", &b.h1.name, "--pool", &b.pool, "--name", volume, "--size",
        "16M",
    ]);
    s.wait_for(60, "volume ready", || {
        s.json(&["volume", "show", volume])["state"] == "ready"
    });
    let id = s.json(&["volume", "show", volume])["id"]
        .as_str()
        .expect("migration bed")
        .to_owned();
    let guest = unique_name(volume);
    let xml = volume_domain_xml(&guest, &b.pool, volume, "qcow2");
    let uuid = s.define_guest_on(&b.h1.name, &guest, &xml);
    for h in [&b.h1, &b.h2] {
        let (uri, g) = (h.uri.clone(), guest.clone());
        b.cleanup.push(move || {
            let _ = run("virsh", &["-c", &uri, "destroy", &g]);
            let _ = run("virsh", &["-c", &uri, "undefine", &g]);
        });
    }
    (id, guest, uuid)
}

/// After a migration settled (`g`: the guest as the server shows it, `v`:
/// its volume): the guest runs on exactly the host the server records, only
/// that host keeps its keys, and the volume is ready there. `what` names
/// the trial in the messages.
pub fn assert_settled(
    h1: &SessionHost,
    h2: &SessionHost,
    guest: &str,
    uuid: &str,
    g: &serde_json::Value,
    v: &serde_json::Value,
    what: &str,
) {
    let (here, there) = if g["host"] == h1.name.as_str() {
        (h1, h2)
    } else {
        (h2, h1)
    };
    assert_eq!(
        state_of(here, guest).as_deref(),
        Some("running"),
        "{what}: {g}"
    );
    assert_eq!(state_of(there, guest), None, "{what}");
    assert!(
        here.state.join(format!("guests/{uuid}.sealed")).exists(),
        "{what}"
    );
    assert!(
        !there.state.join(format!("guests/{uuid}.sealed")).exists(),
        "{what}"
    );
    assert_eq!(v["state"], "ready", "{what}: {v}");
    assert_eq!(v["host"], g["host"], "{what}");
}
