//! Escrow packets: only to the host's own recipients, only with the
//! volume's current key, and they open with a recipient's identity.

use super::*;
use crate::escrow::Packet;
use crate::ops::OpsError;
use secrecy::ExposeSecret;

fn req(v: VolumeId, key: SealedKey, recipients: Vec<String>) -> EscrowPacket {
    EscrowPacket {
        volume: v,
        key,
        recipients,
        packet_id: "es-00000000000a".into(),
        host_name: "kvm-test".into(),
        volume_name: "vol1".into(),
        requested_by: "alice".into(),
        approved_by: "bob".into(),
    }
}

#[test]
fn a_packet_is_sealed_only_to_the_hosts_own_recipients_and_holds_the_volumes_keys() {
    let bed = bed();
    let (v, _, pass, path) = create(&bed, "vol1");
    let custodian = age::x25519::Identity::generate();
    let stranger = age::x25519::Identity::generate();
    let mine = custodian.to_public().to_string();
    let theirs = stranger.to_public().to_string();
    // No --escrow-recipients: no packet.
    let e = bed
        .d
        .make_escrow_packet(req(v, seal_pass(&bed, v, 1, &pass), vec![mine.clone()]))
        .err()
        .unwrap();
    assert!(matches!(e, OpsError::Precondition(_)), "{e}");
    assert!(e.to_string().contains("--escrow-recipients"), "{e}");
    bed.d.set_escrow_recipients(vec![mine.clone()]);
    // The server cannot add a recipient of its own.
    let e = bed
        .d
        .make_escrow_packet(req(
            v,
            seal_pass(&bed, v, 1, &pass),
            vec![mine.clone(), theirs],
        ))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("is not in host kvm-test's --escrow-recipients file"),
        "{e}"
    );
    // A key that does not open the volume.
    let e = bed
        .d
        .make_escrow_packet(req(
            v,
            seal_pass(&bed, v, 1, b"not-the-key"),
            vec![mine.clone()],
        ))
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not open"), "{e}");
    let made = bed
        .d
        .make_escrow_packet(req(v, seal_pass(&bed, v, 1, &pass), vec![mine]))
        .unwrap();
    let ids: Vec<Box<dyn age::Identity + Send + Sync>> = vec![Box::new(custodian)];
    let p = Packet::open(&made.packet, &ids).unwrap();
    assert_eq!(p.passphrase.expose_secret().as_bytes(), &pass[..]);
    assert_eq!(p.meta.volume_id, v.to_string());
    assert_eq!(p.meta.path, path);
    assert_eq!((p.meta.generation, p.meta.format.as_str()), (1, "qcow2"));
    assert_eq!(
        (p.meta.requested_by.as_str(), p.meta.approved_by.as_str()),
        ("alice", "bob")
    );
    assert_eq!(p.meta.luks_uuid, made.luks_uuid);
    let ids: Vec<Box<dyn age::Identity + Send + Sync>> = vec![Box::new(stranger)];
    assert!(Packet::open(&made.packet, &ids).is_err());
}
