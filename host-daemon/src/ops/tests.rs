//! The operations on fakes of libvirt and the images (see [`super::fakes`]):
//! every branch of create, define, the hook's secrets, rekeys (shallow,
//! deep, online, repeated after a crash, refused) and migration.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use xdr_wipe::packet::{CipherParams, KeyPacket, VolumeFormat, generate_passphrase};
use xdr_wipe::seal::{HostSealingKey, seal};

use super::fakes::{Domain, FakeHv, FakeImages, Shared, World};
use super::requests::*;
use super::{Daemon, OpsError};
use crate::model::{DomainState, Format, Name, Placement, RekeyKind, VolumeId, copy_path};
use crate::protect::{HostKeys, HostProtectors};
use crate::state::{StateDir, private_dir};
use crate::store::Store;

struct Bed {
    d: Daemon,
    w: Shared,
    sealing_pub: xdr_wipe::seal::HostPublicKey,
    dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bed() -> Bed {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    let dir = std::env::temp_dir().join(format!("gk-ops-{}", hex::encode(b)));
    private_dir(&dir).unwrap();
    let state = StateDir::new(&dir);
    let store = Store::open(&state, &*HostProtectors::files(&state).store).unwrap();
    let sealing = HostSealingKey::generate();
    let sealing_pub = sealing.public_key();
    let keys = HostKeys::for_tests("kvm-test", sealing);
    let w: Shared = Arc::new(Mutex::new(World::default()));
    w.lock()
        .unwrap()
        .pools
        .insert("pool".into(), "/pools/p".into());
    let d = Daemon::new(
        Box::new(FakeHv(w.clone())),
        Box::new(FakeImages(w.clone())),
        store,
        keys,
        dir.join("managed-secrets"),
        0,
    );
    Bed {
        d,
        w,
        sealing_pub,
        dir,
    }
}

/// A key packet sealed to the bed's host (`to`: another host's name to
/// seal for the wrong host), and its passphrase.
fn packet(bed: &Bed, v: VolumeId, generation: u64, to: &str) -> (SealedKey, Vec<u8>) {
    let secret = generate_passphrase().unwrap();
    let pass = secret.expose_secret().to_vec();
    let p = KeyPacket::passphrase(
        v,
        generation,
        CipherParams::aes_xts(VolumeFormat::Qcow2),
        secret,
    );
    let host = xdr_wipe::XdrString::new(to.to_owned()).unwrap();
    let sealed = seal(&p, &host, &bed.sealing_pub).unwrap().to_bytes();
    (
        SealedKey {
            volume: v,
            generation,
            sealed,
        },
        pass,
    )
}

fn vid() -> VolumeId {
    VolumeId(uuid::Uuid::new_v4())
}

fn create(bed: &Bed, name: &str) -> (VolumeId, uuid::Uuid, Vec<u8>, String) {
    let v = vid();
    let (key, pass) = packet(bed, v, 1, "kvm-test");
    let secret = uuid::Uuid::new_v4();
    let (path, size) = bed
        .d
        .create_volume(CreateVolume {
            op_id: format!("{v}:create:1"),
            volume: v,
            pool: Name::parse("pool", "pool").unwrap(),
            name: Name::parse("volume", name).unwrap(),
            capacity: 1 << 20,
            format: Format::Qcow2,
            secret,
            key,
            encrypt_existing: false,
        })
        .unwrap();
    assert_eq!(size, 1 << 20);
    (v, secret, pass, path)
}

fn guest_xml(uuid: &str, secret: &uuid::Uuid, path: &str) -> String {
    format!(
        "<domain type='kvm'><name>g-{uuid}</name><uuid>{uuid}</uuid><devices><disk type='file'><source file='{path}'/><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption><target dev='vda'/></disk></devices></domain>"
    )
}

/// Creates a volume and defines a guest on it; returns (volume, secret,
/// passphrase, path, guest uuid, sealed key of generation 1).
fn guest(bed: &Bed) -> (VolumeId, uuid::Uuid, Vec<u8>, String, String) {
    let (v, secret, _, path) = create(bed, "disk");
    // The guest gets its own packet of generation 1 (the same key as the
    // volume's: the fake image opens with the creation key only).
    let pass = bed.w.lock().unwrap().images[&path].keys[0].clone();
    let uuid = uuid::Uuid::new_v4().to_string();
    let key = seal_pass(bed, v, 1, &pass);
    bed.d
        .define_guest(DefineGuest {
            domain_xml: guest_xml(&uuid, &secret, &path),
            keys: vec![key],
        })
        .unwrap();
    (v, secret, pass, path, uuid)
}

/// A packet holding the passphrase `pass`.
fn seal_pass(bed: &Bed, v: VolumeId, generation: u64, pass: &[u8]) -> SealedKey {
    let secret = xdr_wipe::packet::PacketSecret::copy_from_secret_slice(pass).unwrap();
    let p = KeyPacket::passphrase(
        v,
        generation,
        CipherParams::aes_xts(VolumeFormat::Qcow2),
        secret,
    );
    let host = xdr_wipe::XdrString::new("kvm-test".to_owned()).unwrap();
    SealedKey {
        volume: v,
        generation,
        sealed: seal(&p, &host, &bed.sealing_pub).unwrap().to_bytes(),
    }
}

fn registry(bed: &Bed) -> String {
    format!("{:?}", bed.d.store.volumes().unwrap())
}

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
        !w.images.contains_key(&copy_path(&path)),
        "the copy took the image's place"
    );
    assert!(w.secrets.is_empty(), "the copy's secret is gone");
    assert!(w.count(&format!("set_secret {secret}")) == 1);
    assert!(w.count(&format!("fix_definition {uuid} {}", copy_path(&path))) >= 1);
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
        w.images.insert(copy_path(&path), copy);
        let d = w.domains.get_mut(&uuid).unwrap();
        d.state = DomainState::Running;
        d.disks = vec![copy_path(&path)];
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
