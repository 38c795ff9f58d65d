//! Rekeys and migrations.

use super::*;
use crate::model::{DomainState, Name, Placement, RekeyKind, VolumeId, copy_path};
use crate::ops::OpsError;
use crate::ops::fakes::Domain;

fn rekey_req(
    bed: &Bed,
    v: VolumeId,
    old: &[u8],
    kind: RekeyKind,
    placement: Placement,
) -> (Rekey, Vec<u8>) {
    let (new_key, new_pass) = packet(bed, v, 2, "kvm-test");
    (
        Rekey {
            volume: v,
            from_generation: 1,
            kind,
            old_key: seal_pass(bed, v, 1, old),
            new_key,
            placement,
            bandwidth: 0,
        },
        new_pass,
    )
}

fn clone_req(r: &Rekey) -> Rekey {
    let k = |k: &SealedKey| SealedKey {
        volume: k.volume,
        generation: k.generation,
        sealed: k.sealed.clone(),
    };
    Rekey {
        old_key: k(&r.old_key),
        new_key: k(&r.new_key),
        ..*r
    }
}

#[test]
fn shallow_and_deep_rekeys_move_the_guests_to_the_new_key_and_repeat_harmlessly() {
    for kind in [RekeyKind::Shallow, RekeyKind::Deep] {
        let bed = bed();
        let (v, _, pass, path, uuid) = guest(&bed);
        let data_key = bed.w.lock().unwrap().images[&path].data_key;
        let (r, new_pass) = rekey_req(&bed, v, &pass, kind, Placement::Any);
        assert_eq!(bed.d.rekey(clone_req(&r)).unwrap(), 2);
        let img = bed.w.lock().unwrap().images[&path].clone();
        assert_eq!(img.keys, vec![new_pass.clone()]);
        assert_eq!(img.data_key != data_key, kind == RekeyKind::Deep);
        let rec = bed.d.store.load(&uuid).unwrap().unwrap();
        assert_eq!(
            (rec.keys[0].generation, &*rec.keys[0].sealed),
            (2, &r.new_key.sealed[..])
        );
        // A repeat after a crash (the server did not hear back): recognised.
        let work = bed.w.lock().unwrap().calls.len();
        assert_eq!(bed.d.rekey(clone_req(&r)).unwrap(), 2);
        let calls = bed.w.lock().unwrap().calls.clone();
        assert!(
            !calls[work..]
                .iter()
                .any(|c| c.starts_with("replace_passphrase") || c.starts_with("deep_rekey")),
            "{calls:?}"
        );
    }
}

#[test]
fn a_running_guest_is_rekeyed_online_through_its_own_secret() {
    let bed = bed();
    let (v, secret, pass, path, uuid) = guest(&bed);
    {
        let mut w = bed.w.lock().unwrap();
        let d = w.domains.get_mut(&uuid).unwrap();
        d.state = DomainState::Running;
        d.disks = vec![path.clone()];
        w.images.get_mut(&path).unwrap().data = 42;
    }
    let (r, new_pass) = rekey_req(&bed, v, &pass, RekeyKind::Shallow, Placement::Any);
    bed.d.rekey(r).unwrap();
    let w = bed.w.lock().unwrap();
    let img = &w.images[&path];
    assert_eq!(
        (img.keys.clone(), img.data),
        (vec![new_pass], 42),
        "data copied under the new key"
    );
    assert!(
        !w.images.contains_key(&copy_path(&path, 2)),
        "the copy took the image's place"
    );
    assert!(w.secrets.is_empty(), "the copy's secret is gone");
    assert!(w.count(&format!("set_secret {secret}")) == 1);
    assert!(w.count(&format!("fix_definition {uuid} {}", copy_path(&path, 2))) >= 1);
}

#[test]
fn placements_that_cannot_be_honoured_are_aborted_and_change_nothing() {
    let bed = bed();
    let (v, _, pass, path, uuid) = guest(&bed);
    let (r, _) = rekey_req(&bed, v, &pass, RekeyKind::Deep, Placement::Online);
    let e = bed.d.rekey(r).unwrap_err();
    assert!(
        matches!(e, OpsError::Aborted(_)) && e.to_string().contains("leave out --online"),
        "{e}"
    );
    bed.w.lock().unwrap().domains.get_mut(&uuid).unwrap().state = DomainState::Running;
    let (r, _) = rekey_req(&bed, v, &pass, RekeyKind::Deep, Placement::Offline);
    let e = bed.d.rekey(r).unwrap_err();
    assert!(
        matches!(e, OpsError::Aborted(_)) && e.to_string().contains("stop it"),
        "{e}"
    );
    assert_eq!(bed.w.lock().unwrap().images[&path].keys, vec![pass.clone()]);
    assert_eq!(
        bed.d.store.load(&uuid).unwrap().unwrap().keys[0].generation,
        1
    );
    // Generations that do not follow, and keys that open nothing.
    let (mut r, _) = rekey_req(&bed, v, &pass, RekeyKind::Deep, Placement::Any);
    r.from_generation = 5;
    assert!(matches!(bed.d.rekey(r).unwrap_err(), OpsError::Invalid(_)));
    bed.w.lock().unwrap().domains.get_mut(&uuid).unwrap().state = DomainState::ShutOff;
    let (r, _) = rekey_req(&bed, v, b"not-the-key", RekeyKind::Deep, Placement::Any);
    let e = bed.d.rekey(r).unwrap_err();
    assert!(
        e.to_string()
            .contains("neither the current nor the new key"),
        "{e}"
    );
}

#[test]
fn a_guest_left_running_on_the_copy_by_a_crash_keeps_its_data() {
    let bed = bed();
    let (v, _, pass, path, uuid) = guest(&bed);
    let (r, new_pass) = rekey_req(&bed, v, &pass, RekeyKind::Deep, Placement::Any);
    {
        // As after a crash between the pivot and the swap: the guest runs on
        // the copy (new key, newest data), the image holds older data.
        let mut w = bed.w.lock().unwrap();
        let mut copy = w.images[&path].clone();
        copy.keys = vec![new_pass.clone()];
        copy.data = 7;
        w.images.insert(copy_path(&path, 2), copy);
        let d = w.domains.get_mut(&uuid).unwrap();
        d.state = DomainState::Running;
        d.disks = vec![copy_path(&path, 2)];
    }
    bed.d.rekey(r).unwrap();
    let w = bed.w.lock().unwrap();
    assert_eq!(
        (w.images[&path].keys.clone(), w.images[&path].data),
        (vec![new_pass], 7)
    );
    assert_eq!(
        w.count("copy_running_disk"),
        0,
        "nothing copied again from stale data"
    );
}

#[test]
fn a_migration_is_prepared_abandoned_and_completed() {
    let bed = bed();
    let (v, secret, pass, path, uuid) = guest(&bed);
    let moving = |p: &str| MigratingVolume {
        volume: v,
        pool: Name::parse("pool", "pool").unwrap(),
        name: Name::parse("volume", "disk").unwrap(),
        path: p.to_owned(),
        secret,
    };
    let prep = |p: &str| PrepareMigration {
        domain_xml: guest_xml(&uuid, &secret, &path),
        keys: vec![seal_pass(&bed, v, 1, &pass)],
        volumes: vec![moving(p)],
    };
    let e = bed
        .d
        .prepare_migration(prep("/elsewhere/disk"))
        .unwrap_err();
    assert!(
        e.to_string().contains("must be shared at the same path"),
        "{e}"
    );
    // The destination side, as this host: prepared, then abandoned.
    bed.d.forget_guest(&uuid);
    bed.w.lock().unwrap().domains.remove(&uuid);
    bed.d.prepare_migration(prep(&path)).unwrap();
    assert!(bed.d.store.load(&uuid).unwrap().is_some());
    assert_eq!(bed.d.abort_migration(&uuid).unwrap(), None);
    assert!(bed.d.store.load(&uuid).unwrap().is_none());
    assert!(
        bed.d.store.volumes().unwrap().is_empty(),
        "its volume left with it"
    );
    // The source side: libvirt moves it, the keys go here.
    bed.d.prepare_migration(prep(&path)).unwrap();
    bed.w.lock().unwrap().domains.insert(
        uuid.clone(),
        Domain {
            xml: String::new(),
            state: DomainState::Running,
            autostart: false,
            disks: vec![path.clone()],
        },
    );
    let state = bed
        .d
        .migrate_guest(MigrateGuest {
            guest: uuid.parse().unwrap(),
            destination: "qemu+tls://h2/system".into(),
            migration_uri: None,
            live: true,
            unsafe_: false,
        })
        .unwrap();
    assert_eq!(state, DomainState::Running);
    assert!(bed.d.store.load(&uuid).unwrap().is_none());
    // Repeated (the answer was lost): counted as done.
    let again = bed
        .d
        .migrate_guest(MigrateGuest {
            guest: uuid.parse().unwrap(),
            destination: "qemu+tls://h2/system".into(),
            migration_uri: None,
            live: true,
            unsafe_: false,
        })
        .unwrap();
    assert_eq!(again, DomainState::Running);
    assert_eq!(bed.w.lock().unwrap().count("migrate_domain"), 1);
}

#[test]
fn decryption_waits_for_the_guests_and_the_inventory_names_ids_only() {
    let bed = bed();
    let (v, _, pass, path, uuid) = guest(&bed);
    let held = bed.d.inventory().unwrap();
    assert_eq!(
        held,
        vec![HeldKey {
            volume: v.to_string(),
            generation: 1,
            guest: uuid.clone()
        }]
    );
    let e = bed
        .d
        .decrypt_volume(DecryptVolume {
            volume: v,
            key: seal_pass(&bed, v, 1, &pass),
        })
        .unwrap_err();
    assert!(e.to_string().contains("undefine it first"), "{e}");
    bed.d.undefine_guest(&uuid).unwrap();
    bed.d
        .decrypt_volume(DecryptVolume {
            volume: v,
            key: seal_pass(&bed, v, 1, &pass),
        })
        .unwrap();
    assert!(bed.w.lock().unwrap().images[&path].keys.is_empty());
    assert!(bed.d.store.volumes().unwrap().is_empty());
    assert!(bed.d.inventory().unwrap().is_empty());
}

#[test]
fn a_guest_still_named_after_an_earlier_copy_is_rekeyed_online_again() {
    let bed = bed();
    let (v, _, pass, path, uuid) = guest(&bed);
    {
        // After an online rekey to generation 1 (long done): QEMU's disk
        // still carries that copy's name, and the copy was moved into place.
        let mut w = bed.w.lock().unwrap();
        let d = w.domains.get_mut(&uuid).unwrap();
        d.state = DomainState::Running;
        d.disks = vec![copy_path(&path, 1)];
        w.images.get_mut(&path).unwrap().data = 9;
    }
    let (r, new_pass) = rekey_req(&bed, v, &pass, RekeyKind::Deep, Placement::Any);
    let e = bed.d.rekey(clone_req(&r));
    // The fake's running disk is found by the volume's path only when the
    // guest runs on it; here it runs on the old copy name: offline work
    // must not happen while it runs, so the rekey is done online or refused,
    // never done to the image under the guest.
    match e {
        Ok(_) => {
            let w = bed.w.lock().unwrap();
            assert_eq!(w.images[&path].keys, vec![new_pass]);
            assert_eq!(w.count("swap_in_copy"), 1, "only the new copy was moved");
            assert_eq!(w.images[&path].data, 9, "the data came along");
        }
        Err(e) => panic!("{e}"),
    }
}
