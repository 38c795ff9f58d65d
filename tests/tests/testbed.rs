//! The test bed itself: what `scripts/setup` promises the other end-to-end
//! tests, checked against the real libvirtd, QEMU/KVM and qemu-img.
//!
//! This is the building block guestkey is made of (design.md, "Verified
//! building blocks"): a LUKS qcow2 volume created through libvirt's storage
//! API with an ephemeral, private volume secret whose value is a key in
//! guestkey's format (256 random bits as base64url text), and a KVM guest
//! that starts with it, and does not start with a wrong key.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use guestkey_tests::{
    Cleanup, minimal_domain_xml, require_libvirt, run, scratch_dir, unique_name, virsh,
};
use xdr_wipe::packet::generate_passphrase;

/// Sets a libvirt secret's value from a passphrase, through a 0600 file in
/// /dev/shm that is removed right after.
fn set_secret_value(uuid: &str, passphrase: &[u8]) {
    let path = std::path::PathBuf::from(format!("/dev/shm/{}", unique_name("secret")));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    f.write_all(passphrase).unwrap();
    drop(f);
    let result = virsh(&[
        "secret-set-value",
        uuid,
        "--file",
        path.to_str().unwrap(),
        "--plain",
    ]);
    std::fs::remove_file(&path).unwrap();
    result.unwrap();
}

#[test]
fn kvm_guest_starts_from_a_luks_volume_with_an_ephemeral_private_secret() {
    require_libvirt();
    let mut cleanup = Cleanup::default();

    // A directory storage pool.
    let pool = unique_name("pool");
    let dir = scratch_dir(&mut cleanup, &pool);
    let pool_xml = format!(
        "<pool type='dir'><name>{pool}</name><target><path>{}</path></target></pool>",
        dir.display()
    );
    let pool_file = dir.join("pool.xml");
    std::fs::write(&pool_file, pool_xml).unwrap();
    virsh(&["pool-create", pool_file.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["pool-destroy", &pool]);

    // An ephemeral, private secret of usage type volume.
    let secret_uuid = uuid::Uuid::new_v4().to_string();
    let volume = unique_name("disk.qcow2");
    let vol_path = dir.join(&volume);
    let secret_xml = format!(
        "<secret ephemeral='yes' private='yes'><uuid>{secret_uuid}</uuid>\
         <usage type='volume'><volume>{}</volume></usage></secret>",
        vol_path.display()
    );
    let secret_file = dir.join("secret.xml");
    std::fs::write(&secret_file, secret_xml).unwrap();
    virsh(&["secret-define", secret_file.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["secret-undefine", &secret_uuid]);
    let key = generate_passphrase().unwrap();
    set_secret_value(&secret_uuid, key.expose_secret());

    // The secret's value cannot be read back.
    let err = virsh(&["secret-get-value", &secret_uuid]).unwrap_err();
    assert!(err.0.contains("private"), "{err}");
    let dumped = virsh(&["secret-dumpxml", &secret_uuid]).unwrap();
    assert!(
        dumped.contains("ephemeral='yes'") && dumped.contains("private='yes'"),
        "{dumped}"
    );

    // A qcow2 volume with LUKS encryption, created by libvirt (qemu-img).
    let encryption = format!(
        "<encryption format='luks'><secret type='passphrase' uuid='{secret_uuid}'/></encryption>"
    );
    let vol_xml = format!(
        "<volume><name>{volume}</name><capacity unit='MiB'>16</capacity>\
         <target><format type='qcow2'/>{encryption}</target></volume>"
    );
    let vol_file = dir.join("vol.xml");
    std::fs::write(&vol_file, vol_xml).unwrap();
    // libvirt runs qemu-img, whose PBKDF calibration often fails.
    guestkey_tests::retry_calibration(|| virsh(&["vol-create", &pool, vol_file.to_str().unwrap()]))
        .unwrap();
    let info = run("qemu-img", &["info", vol_path.to_str().unwrap()]).unwrap();
    assert!(
        info.contains("encrypted: yes") && info.contains("format: luks"),
        "{info}"
    );

    // A KVM guest with that disk starts: QEMU opened the LUKS volume with the key.
    let domain = unique_name("guest");
    let dom_file = dir.join("domain.xml");
    std::fs::write(
        &dom_file,
        minimal_domain_xml(&domain, &vol_path, "qcow2", &encryption),
    )
    .unwrap();
    virsh(&["define", dom_file.to_str().unwrap()]).unwrap();
    cleanup.virsh(&["undefine", &domain]);
    virsh(&["start", &domain]).unwrap();
    cleanup.virsh(&["destroy", &domain]);
    assert_eq!(virsh(&["domstate", &domain]).unwrap().trim(), "running");
    virsh(&["destroy", &domain]).unwrap();

    // With another key in the secret, the guest does not start.
    let wrong = generate_passphrase().unwrap();
    set_secret_value(&secret_uuid, wrong.expose_secret());
    let err = virsh(&["start", &domain]).unwrap_err();
    assert!(err.0.contains("Invalid password"), "{err}");
    assert_eq!(virsh(&["domstate", &domain]).unwrap().trim(), "shut off");
}
