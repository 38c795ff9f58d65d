//! Volumes, guests and the hook's secrets.

use std::collections::BTreeSet;

use super::*;
use crate::model::Format;
use crate::ops::OpsError;
use crate::ops::{DiskLookup, KnownDisk};
use virt_plugin::protocol::{Disk, Source};

#[test]
fn a_volume_is_created_once_and_a_repeat_returns_the_first_outcome() {
    let bed = bed();
    let (v, secret, pass, path) = create(&bed, "disk");
    assert_eq!(path, "/pools/p/disk");
    assert!(bed.w.lock().unwrap().images[&path].keys == vec![pass]);
    let list = std::fs::read_to_string(bed.dir.join("managed-secrets")).unwrap();
    assert_eq!(list, format!("{secret}\n"));
    // The same operation again (the server retries): nothing new made.
    let creates = bed.w.lock().unwrap().count("create ");
    let (key, _) = packet(&bed, v, 1, "kvm-test");
    let again = bed
        .d
        .create_volume(request(v, "disk", secret, key))
        .unwrap();
    assert_eq!(again.0, path);
    assert_eq!(bed.w.lock().unwrap().count("create "), creates);
}

#[test]
fn a_creation_stopped_before_the_registry_is_finished_by_its_repeat() {
    let bed = bed();
    let v = vid();
    let (key, pass) = packet(&bed, v, 1, "kvm-test");
    // The image was made, then guestkeyd stopped before its registry.
    bed.d
        .images
        .create("/pools/p/disk", Format::Qcow2, 1 << 20, &pass)
        .unwrap();
    let secret = uuid::Uuid::new_v4();
    let (path, _) = bed
        .d
        .create_volume(request(v, "disk", secret, key))
        .unwrap();
    assert_eq!(path, "/pools/p/disk");
    assert_eq!(bed.w.lock().unwrap().count("create "), 1, "made once");
    assert_eq!(
        bed.w.lock().unwrap().count("settle /pools/p/disk"),
        1,
        "given its owner and synced"
    );
    assert!(registry(&bed).contains(&v.to_string()));
    let list = std::fs::read_to_string(bed.dir.join("managed-secrets")).unwrap();
    assert_eq!(list, format!("{secret}\n"));
}

#[test]
fn creations_at_once_are_each_made_and_registered() {
    let bed = bed();
    let made: Vec<(VolumeId, uuid::Uuid, Vec<u8>, String)> = std::thread::scope(|scope| {
        let b = &bed;
        let threads: Vec<_> = (0..24)
            .map(|i| scope.spawn(move || create(b, &format!("disk-{i}"))))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let vols = bed.d.store.volumes().unwrap();
    let list = std::fs::read_to_string(bed.dir.join("managed-secrets")).unwrap();
    assert_eq!(vols.len(), 24);
    assert_eq!(list.lines().count(), 24);
    for (v, secret, pass, path) in &made {
        assert_eq!(vols[&v.to_string()].path, *path);
        assert!(list.contains(&secret.to_string()));
        assert_eq!(bed.w.lock().unwrap().images[path].keys, vec![pass.clone()]);
    }
}

#[test]
fn bad_packets_and_taken_names_change_nothing() {
    let bed = bed();
    let (_, _, _, path) = create(&bed, "taken");
    let before = (registry(&bed), bed.w.lock().unwrap().images.clone());
    let try_create = |name: &str, to: &str, generation: u64| {
        let v = vid();
        let (key, _) = packet(&bed, v, generation, to);
        let key = SealedKey {
            generation: 1,
            ..key
        };
        bed.d
            .create_volume(request(v, name, uuid::Uuid::new_v4(), key))
    };
    // Sealed for another host, and for another generation: refused.
    for (to, generation) in [("kvm-other", 1), ("kvm-test", 2)] {
        let e = try_create("new", to, generation).unwrap_err();
        assert!(matches!(e, OpsError::Packet(_)), "{e}");
    }
    // A name that is taken: refused, naming it.
    let e = try_create("taken", "kvm-test", 1).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("already exists in pool pool ({path})")),
        "{e}"
    );
    assert_eq!(
        (registry(&bed), bed.w.lock().unwrap().images.clone()),
        before
    );
}

#[test]
fn a_guest_is_defined_with_keys_that_open_and_undone_when_libvirt_refuses() {
    let bed = bed();
    let (v, secret, pass, path, uuid) = guest(&bed);
    let rec = bed.d.store.load(&uuid).unwrap().unwrap();
    assert_eq!(rec.keys.len(), 1);
    assert_eq!(rec.keys[0].path.as_str(), path);
    assert!(bed.w.lock().unwrap().domains.contains_key(&uuid));
    // libvirt refuses the next one: no record stays.
    bed.w.lock().unwrap().failing.insert("define_domain");
    let other = uuid::Uuid::new_v4().to_string();
    let e = bed
        .d
        .define_guest(DefineGuest {
            domain_xml: guest_xml(&other, &secret, &path),
            keys: vec![seal_pass(&bed, v, 1, &pass)],
        })
        .unwrap_err();
    assert!(e.to_string().contains("refused the domain XML"), "{e}");
    assert!(bed.d.store.load(&other).unwrap().is_none());
    // A key of a volume this host does not have, two keys of one volume,
    // and XML without a UUID: refused before anything is stored.
    bed.w.lock().unwrap().failing.clear();
    let stray = vid();
    for (xml, keys, want) in [
        (
            guest_xml(&other, &secret, &path),
            vec![seal_pass(&bed, stray, 1, &pass)],
            "was not created on this host",
        ),
        (
            guest_xml(&other, &secret, &path),
            vec![seal_pass(&bed, v, 1, &pass), seal_pass(&bed, v, 1, &pass)],
            "two keys for volume",
        ),
        (
            "<domain><name>x</name></domain>".to_owned(),
            vec![],
            "has no <uuid>",
        ),
        (
            format!(
                "<domain><name>x</name><uuid>{}</uuid></domain>",
                other.to_uppercase()
            ),
            vec![],
            "canonical form",
        ),
        (
            format!("<domain><name>x</name><uuid>{other}</uuid><uuid>{uuid}</uuid></domain>"),
            vec![],
            "a second <uuid>",
        ),
    ] {
        let e = bed
            .d
            .define_guest(DefineGuest {
                domain_xml: xml,
                keys,
            })
            .unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert!(bed.d.store.load(&other).unwrap().is_none());
    }
}

#[test]
fn the_hook_gets_secrets_for_the_start_and_none_stay_after_a_failure() {
    let bed = bed();
    let (_, secret, pass, path, uuid) = guest(&bed);
    let wanted: BTreeSet<String> = [secret.to_string()].into();
    let disks = [disk(&secret.to_string(), &path)];
    bed.d.prepare_secrets(&uuid, &disks).unwrap();
    assert_eq!(
        bed.w.lock().unwrap().secrets[&secret.to_string()],
        (path.clone(), pass.clone())
    );
    bed.d.release_secrets(&uuid, &wanted).unwrap();
    assert!(bed.w.lock().unwrap().secrets.is_empty());
    // Another domain naming our volume's secret holds no key for it.
    let e = bed
        .d
        .prepare_secrets(&uuid::Uuid::new_v4().to_string(), &disks)
        .unwrap_err();
    assert!(e.to_string().contains("holds no key of volume disk"), "{e}");
    // A failed define of the secret leaves none behind.
    bed.w.lock().unwrap().failing.insert("set_secret");
    assert!(bed.d.prepare_secrets(&uuid, &disks).is_err());
    assert!(bed.w.lock().unwrap().secrets.is_empty());
}

#[test]
fn a_secret_that_cannot_be_removed_is_retried_until_it_is_gone() {
    let bed = bed();
    let (_, secret, _, path, uuid) = guest(&bed);
    let wanted: BTreeSet<String> = [secret.to_string()].into();
    bed.d
        .prepare_secrets(&uuid, &[disk(&secret.to_string(), &path)])
        .unwrap();
    bed.w.lock().unwrap().failing.insert("remove_secret");
    let e = bed.d.release_secrets(&uuid, &wanted).unwrap_err();
    assert!(e.to_string().contains("keeps trying"), "{e}");
    assert_eq!(
        bed.d.sweep_secrets(),
        1,
        "still there while libvirt refuses"
    );
    assert!(
        bed.w.lock().unwrap().count("remove_secret") > 3,
        "tried more than once"
    );
    bed.w.lock().unwrap().failing.clear();
    assert_eq!(bed.d.sweep_secrets(), 0);
    assert!(bed.w.lock().unwrap().secrets.is_empty());
}

#[test]
fn secrets_left_by_an_earlier_guestkeyd_are_removed_and_a_start_under_way_keeps_its_own() {
    let bed = bed();
    let (_, secret, _, path, uuid) = guest(&bed);
    let s = secret.to_string();
    // Left by a guestkeyd killed between prepare and release: libvirt
    // still has it, this process never defined it.
    bed.w
        .lock()
        .unwrap()
        .secrets
        .insert(s.clone(), (path.clone(), vec![7; 43]));
    assert_eq!(bed.d.sweep_leftover_secrets(), 1);
    assert!(bed.w.lock().unwrap().secrets.is_empty());
    // A start under way (prepared, not released yet) keeps its secret.
    bed.d.prepare_secrets(&uuid, &[disk(&s, &path)]).unwrap();
    assert_eq!(bed.d.sweep_leftover_secrets(), 0);
    assert!(bed.w.lock().unwrap().secrets.contains_key(&s));
    bed.d.release_secrets(&uuid, &[s.clone()].into()).unwrap();
    assert!(bed.w.lock().unwrap().secrets.is_empty());
    // The operator's own secrets are not ours to remove.
    let other = uuid::Uuid::new_v4().to_string();
    bed.w
        .lock()
        .unwrap()
        .secrets
        .insert(other.clone(), ("/elsewhere".into(), vec![1]));
    assert_eq!(bed.d.sweep_leftover_secrets(), 0);
    assert!(bed.w.lock().unwrap().secrets.contains_key(&other));
}

fn disk(secret: &str, path: &str) -> Disk {
    Disk {
        secret: secret.to_owned(),
        target: "vda".into(),
        source: Source::Path(path.to_owned()),
    }
}

/// Stands for the server's `DescribeDisk` in these unit tests (the real
/// call is in tests/tests/host.rs).
struct Known(Option<KnownDisk>);

impl DiskLookup for Known {
    fn describe(&self, _source: &Source, _secret: &str) -> Option<KnownDisk> {
        self.0.clone()
    }
    fn release(&self, _uuid: &str) -> Result<Vec<crate::ops::requests::SealedKey>, String> {
        Err("this stand-in server releases nothing".into())
    }
}

#[test]
fn a_luks_disk_this_host_has_no_key_for_is_refused_before_libvirt_with_what_to_do() {
    let bed = bed();
    let stray = uuid::Uuid::new_v4().to_string();
    let dom = uuid::Uuid::new_v4().to_string();
    let d = [disk(&stray, "/images/other.qcow2")];
    // Not guestkey's, not defined in libvirt: refused, naming the disk.
    let e = bed.d.prepare_secrets(&dom, &d).unwrap_err().to_string();
    assert!(
        e.contains("disk vda (/images/other.qcow2)") && e.contains("not defined on this host"),
        "{e}"
    );
    assert!(e.contains("guestkeyctl volume encrypt"), "{e}");
    // The operator's own secret, defined in libvirt: left to libvirt.
    bed.w
        .lock()
        .unwrap()
        .secrets
        .insert(stray.clone(), ("/images/other.qcow2".into(), vec![1]));
    bed.d.prepare_secrets(&dom, &d).unwrap();
    bed.w.lock().unwrap().secrets.clear();
    // Known to the server on another host: that host, and the command.
    bed.d.set_lookup(Box::new(Known(Some(KnownDisk {
        volume: "web-root".into(),
        host: "kvm-other".into(),
        state: "ready".into(),
        same_secret: true,
    }))));
    let e = bed.d.prepare_secrets(&dom, &d).unwrap_err().to_string();
    assert!(
        e.contains("guestkey volume web-root (ready), whose key goes to host kvm-other only"),
        "{e}"
    );
    assert!(
        e.contains("guestkeyctl guest migrate GUEST --to kvm-test"),
        "{e}"
    );
    assert!(bed.w.lock().unwrap().secrets.is_empty(), "nothing defined");
}
