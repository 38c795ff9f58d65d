//! Benchmark: guestkeyd's sealed store with 1,000 guests. Measures the
//! start-up work (listing the store) and, as a worst case, unsealing every
//! record and opening every key packet, against reading the same files
//! from disk without decrypting (baseline measured in the same run).
//!
//! `cargo bench -p host-daemon --bench unseal` (`-- --quick`: 100 guests).

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use guestkey_testkit::cleanup::Made;
use host_daemon::protect::{HostKeys, HostProtectors};
use host_daemon::state::{StateDir, write_atomic};
use host_daemon::store::{GuestRecord, Store, StoredKey};
use xdr_wipe::packet::{CipherParams, KeyPacket, VolumeFormat, VolumeId, generate_passphrase};
use xdr_wipe::seal::{HostSealingKey, seal};
use xdr_wipe::{BoundedVec, Opaque, XdrString};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 100 } else { 1000 };
    let dir = std::env::temp_dir().join(format!("gk-unseal-{}", std::process::id()));
    // Removed at the end, on a panic, and on Ctrl-C (SIGINT/SIGTERM/SIGHUP).
    let _made = Made::dir(&dir);
    let state = StateDir::new(&dir);
    host_daemon::state::private_dir(&dir).unwrap();
    let sealing = HostSealingKey::generate();
    write_atomic(&state.file("host"), b"kvm-bench").unwrap();
    let protectors = HostProtectors::files(&state);
    HostKeys::protect_new(&sealing, &*protectors.sealing).unwrap();
    let keys = HostKeys::load(&state, &*protectors.sealing).unwrap();
    let store = Store::open(&state, &*protectors.store).unwrap();
    let host = XdrString::new("kvm-bench").unwrap();
    for _ in 0..n {
        let vid = VolumeId(uuid::Uuid::new_v4());
        let packet = KeyPacket::passphrase(
            vid,
            1,
            CipherParams::aes_xts(VolumeFormat::Qcow2),
            generate_passphrase().unwrap(),
        );
        let sealed = seal(&packet, &host, &sealing.public_key())
            .unwrap()
            .to_bytes();
        let uuid = uuid::Uuid::new_v4().to_string();
        let xml = format!(
            "<domain type='kvm'><name>g-{uuid}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory></domain>"
        );
        store
            .save(&GuestRecord {
                uuid: XdrString::new(uuid.clone()).unwrap(),
                name: XdrString::new(format!("g-{uuid}")).unwrap(),
                domain_xml: XdrString::new(xml).unwrap(),
                keys: BoundedVec::new(vec![StoredKey {
                    volume_id: vid,
                    generation: 1,
                    secret_uuid: XdrString::new(uuid::Uuid::new_v4().to_string()).unwrap(),
                    path: XdrString::new(format!("/var/lib/libvirt/images/{uuid}.qcow2")).unwrap(),
                    sealed: Opaque::new(sealed).unwrap(),
                }])
                .unwrap(),
            })
            .unwrap();
    }

    // Baseline: read every file.
    let t = Instant::now();
    let mut bytes = 0;
    for e in std::fs::read_dir(state.guests()).unwrap() {
        bytes += std::fs::read(e.unwrap().path()).unwrap().len();
    }
    let read = t.elapsed();

    // Start-up: open the store and list it (what guestkeyd does before serving).
    let t = Instant::now();
    let store2 = Store::open(&state, &*protectors.store).unwrap();
    let listed = store2.guests().unwrap().len();
    let ready = t.elapsed();

    // Worst case: unseal every record and open every key.
    let t = Instant::now();
    let mut opened = 0;
    for uuid in store2.guests().unwrap() {
        let rec = store2.load(&uuid).unwrap().unwrap();
        for k in rec.keys.iter() {
            drop(keys.open(&k.sealed, k.volume_id, k.generation).unwrap());
            opened += 1;
        }
    }
    let unseal = t.elapsed();
    assert_eq!((listed, opened), (n, n));
    println!("{n} sealed guests ({bytes} bytes)");
    println!(
        "  read all files (baseline):      {:>8.1} ms",
        read.as_secs_f64() * 1e3
    );
    println!(
        "  open store + list (ready):      {:>8.1} ms  ({:.2}x the baseline)",
        ready.as_secs_f64() * 1e3,
        ready.as_secs_f64() / read.as_secs_f64()
    );
    println!(
        "  unseal all + open every key:    {:>8.1} ms  ({:.2}x the baseline)",
        unseal.as_secs_f64() * 1e3,
        unseal.as_secs_f64() / read.as_secs_f64()
    );
}
