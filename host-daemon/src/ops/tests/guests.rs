//! Volumes, guests and the hook's secrets.

use std::collections::BTreeSet;

use super::*;
use crate::model::{Format, Name};
use crate::ops::OpsError;

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
        .create_volume(CreateVolume {
            op_id: format!("{v}:create:1"),
            volume: v,
            pool: Name::parse("pool", "pool").unwrap(),
            name: Name::parse("volume", "disk").unwrap(),
            capacity: 1 << 20,
            format: Format::Qcow2,
            secret,
            key,
            encrypt_existing: false,
        })
        .unwrap();
    assert_eq!(again.0, path);
    assert_eq!(bed.w.lock().unwrap().count("create "), creates);
}

#[test]
fn bad_packets_and_taken_names_change_nothing() {
    let bed = bed();
    let (_, _, _, path) = create(&bed, "taken");
    let before = (registry(&bed), bed.w.lock().unwrap().images.clone());
    let try_create = |name: &str, to: &str, generation: u64| {
        let v = vid();
        let (key, _) = packet(&bed, v, generation, to);
        bed.d.create_volume(CreateVolume {
            op_id: format!("{v}:create:1"),
            volume: v,
            pool: Name::parse("pool", "pool").unwrap(),
            name: Name::parse("volume", name).unwrap(),
            capacity: 1 << 20,
            format: Format::Qcow2,
            secret: uuid::Uuid::new_v4(),
            key: SealedKey {
                generation: 1,
                ..key
            },
            encrypt_existing: false,
        })
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
            "needs <name> and <uuid>",
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
            "two <uuid>",
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
    bed.d.prepare_secrets(&uuid, &wanted).unwrap();
    assert_eq!(
        bed.w.lock().unwrap().secrets[&secret.to_string()],
        (path.clone(), pass.clone())
    );
    bed.d.release_secrets(&uuid, &wanted).unwrap();
    assert!(bed.w.lock().unwrap().secrets.is_empty());
    // Another domain naming our volume's secret holds no key for it.
    let e = bed
        .d
        .prepare_secrets(&uuid::Uuid::new_v4().to_string(), &wanted)
        .unwrap_err();
    assert!(e.to_string().contains("holds no key of volume disk"), "{e}");
    // A failed define of the secret leaves none behind.
    bed.w.lock().unwrap().failing.insert("set_secret");
    assert!(bed.d.prepare_secrets(&uuid, &wanted).is_err());
    assert!(bed.w.lock().unwrap().secrets.is_empty());
}

#[test]
fn a_secret_that_cannot_be_removed_is_retried_until_it_is_gone() {
    let bed = bed();
    let (_, secret, _, _, uuid) = guest(&bed);
    let wanted: BTreeSet<String> = [secret.to_string()].into();
    bed.d.prepare_secrets(&uuid, &wanted).unwrap();
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
