//! The operations on fakes of libvirt and the images (see [`super::fakes`]):
//! every branch of create, define, the hook's secrets, rekeys (shallow,
//! deep, online, repeated after a crash, refused) and migration.

use std::sync::{Arc, Mutex};

use xdr_wipe::packet::{CipherParams, KeyPacket, VolumeFormat, generate_passphrase};
use xdr_wipe::seal::{HostSealingKey, seal};

use super::Daemon;
use super::fakes::{FakeHv, FakeImages, Shared, World};
use super::requests::*;
use crate::model::{Format, Name, VolumeId};
use crate::protect::{HostKeys, HostProtectors};
use crate::state::{StateDir, private_dir};
use crate::store::Store;

pub(super) struct Bed {
    pub(super) d: Daemon,
    pub(super) w: Shared,
    pub(super) sealing_pub: xdr_wipe::seal::HostPublicKey,
    pub(super) dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn bed() -> Bed {
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
pub(super) fn packet(bed: &Bed, v: VolumeId, generation: u64, to: &str) -> (SealedKey, Vec<u8>) {
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

pub(super) fn vid() -> VolumeId {
    VolumeId(uuid::Uuid::new_v4())
}

/// A request for a new qcow2 volume `name` of 1 MiB with `key`.
pub(super) fn request(v: VolumeId, name: &str, secret: uuid::Uuid, key: SealedKey) -> CreateVolume {
    CreateVolume {
        op_id: format!("{v}:create:1"),
        volume: v,
        pool: Name::parse("pool", "pool").unwrap(),
        name: Name::parse("volume", name).unwrap(),
        capacity: 1 << 20,
        format: Format::Qcow2,
        secret,
        key,
        encrypt_existing: false,
    }
}

pub(super) fn create(bed: &Bed, name: &str) -> (VolumeId, uuid::Uuid, Vec<u8>, String) {
    let v = vid();
    let (key, pass) = packet(bed, v, 1, "kvm-test");
    let secret = uuid::Uuid::new_v4();
    let (path, size) = bed.d.create_volume(request(v, name, secret, key)).unwrap();
    assert_eq!(size, 1 << 20);
    (v, secret, pass, path)
}

pub(super) fn guest_xml(uuid: &str, secret: &uuid::Uuid, path: &str) -> String {
    format!(
        "<domain type='kvm'><name>g-{uuid}</name><uuid>{uuid}</uuid><devices><disk type='file'><source file='{path}'/><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption><target dev='vda'/></disk></devices></domain>"
    )
}

/// Creates a volume and defines a guest on it; returns (volume, secret,
/// passphrase, path, guest uuid, sealed key of generation 1).
pub(super) fn guest(bed: &Bed) -> (VolumeId, uuid::Uuid, Vec<u8>, String, String) {
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
pub(super) fn seal_pass(bed: &Bed, v: VolumeId, generation: u64, pass: &[u8]) -> SealedKey {
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

pub(super) fn registry(bed: &Bed) -> String {
    format!("{:?}", bed.d.store.volumes().unwrap())
}

mod escrow;
mod guests;
mod pools;
mod rekey;
