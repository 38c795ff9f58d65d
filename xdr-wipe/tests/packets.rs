//! Sealing and opening key packets: the happy path, and every kind of bad
//! packet refused with an error that says what is wrong.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use xdr_wipe::packet::{
    CipherParams, DataKeySize, KeyPacket, Mechanism, PacketSecret, PacketVersion, Recovery,
    VolumeFormat, VolumeId, generate_data_key, generate_passphrase,
};
use xdr_wipe::seal::{HostId, HostSealingKey, OpenError, SealError, SealedPacket, open, seal};
use xdr_wipe::{ErrorKind, SecretOpaque, XdrString};

fn host(name: &str) -> HostId {
    XdrString::new(name).unwrap()
}

fn volume(n: u8) -> VolumeId {
    VolumeId(uuid::Uuid::from_bytes([n; 16]))
}

fn passphrase_packet(vol: VolumeId, generation: u64) -> KeyPacket {
    KeyPacket::passphrase(
        vol,
        generation,
        CipherParams::aes_xts(VolumeFormat::Qcow2),
        generate_passphrase().unwrap(),
    )
}

struct Fixture {
    key: HostSealingKey,
    host: HostId,
    packet: KeyPacket,
    bytes: Vec<u8>,
}

fn fixture() -> Fixture {
    let key = HostSealingKey::generate();
    let host = host("kvm-01.example");
    let packet = passphrase_packet(volume(1), 7);
    let bytes = seal(&packet, &host, &key.public_key()).unwrap().to_bytes();
    Fixture {
        key,
        host,
        packet,
        bytes,
    }
}

#[test]
fn generated_passphrase_is_43_base64url_characters() {
    let a = generate_passphrase().unwrap();
    let b = generate_passphrase().unwrap();
    assert_eq!(a.len(), 43);
    assert!(
        a.expose_secret()
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    );
    assert!(!a.ct_eq(b.expose_secret()), "two passphrases are equal");
}

#[test]
fn seal_then_open_every_mechanism_and_recovery() {
    let key = HostSealingKey::generate();
    let h = host("kvm-02");
    let cases: Vec<(Mechanism, PacketSecret, Recovery)> = vec![
        (
            Mechanism::QemuLuksPassphrase,
            generate_passphrase().unwrap(),
            Recovery::None,
        ),
        (
            Mechanism::QemuLuksPassphrase,
            generate_passphrase().unwrap(),
            Recovery::DataKey(generate_data_key(DataKeySize::Bits512).unwrap()),
        ),
        (
            Mechanism::LuksVolumeKey,
            SecretOpaque::copy_from_secret_slice(&[9u8; 64]).unwrap(),
            Recovery::HeaderBackup(
                SecretOpaque::copy_from_secret_slice(&vec![3u8; 1 << 20]).unwrap(),
            ),
        ),
    ];
    for (i, (mechanism, secret, recovery)) in cases.into_iter().enumerate() {
        let expected_secret = secret.expose_secret().to_vec();
        let packet = KeyPacket {
            version: PacketVersion::V1,
            volume_id: volume(i as u8),
            generation: i as u64,
            mechanism,
            params: CipherParams::aes_xts(VolumeFormat::Raw),
            secret,
            recovery,
        };
        let bytes = seal(&packet, &h, &key.public_key()).unwrap().to_bytes();
        let opened = open(&bytes, &key, &h, volume(i as u8), i as u64).unwrap();
        assert!(opened.secret.ct_eq(&expected_secret));
        assert_eq!(opened.mechanism, mechanism);
        assert_eq!(opened.params, packet.params);
        assert_eq!(
            opened.recovery.discriminant(),
            packet.recovery.discriminant()
        );
    }
}

#[test]
fn every_truncation_is_refused_as_malformed() {
    let f = fixture();
    for len in 0..f.bytes.len() {
        match open(&f.bytes[..len], &f.key, &f.host, volume(1), 7) {
            Err(OpenError::Malformed(e)) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Truncated { .. }),
                    "len {len}: {e}"
                );
                assert!(e.offset() <= len, "len {len}: {e}");
            }
            other => panic!("truncated to {len}: {other:?}"),
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let f = fixture();
    let mut bytes = f.bytes.clone();
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    let err = open(&bytes, &f.key, &f.host, volume(1), 7).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("at byte {}: 4 trailing bytes", f.bytes.len())),
        "{err}"
    );
}

#[test]
fn oversized_ciphertext_length_is_refused_by_name() {
    let f = fixture();
    let sealed = SealedPacket::from_bytes(&f.bytes).unwrap();
    // The ciphertext length word sits right before the ciphertext.
    let ct_len = sealed.ciphertext.len();
    let at = f.bytes.len() - ct_len - 4;
    let mut bytes = f.bytes.clone();
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = open(&bytes, &f.key, &f.host, volume(1), 7).unwrap_err();
    let OpenError::Malformed(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.field(), "ciphertext");
    assert_eq!(e.offset(), at);
    assert!(matches!(e.kind(), ErrorKind::TooLong { .. }), "{err}");
}

#[test]
fn any_flipped_bit_in_enc_or_ciphertext_fails_authentication() {
    let f = fixture();
    let sealed = SealedPacket::from_bytes(&f.bytes).unwrap();
    let body = f.bytes.len() - sealed.ciphertext.len() - 4 - 32;
    for i in (body..f.bytes.len()).filter(|i| !(body + 32..body + 36).contains(i)) {
        let mut bytes = f.bytes.clone();
        bytes[i] ^= 0x01;
        match open(&bytes, &f.key, &f.host, volume(1), 7) {
            Err(OpenError::Decrypt) => {}
            other => panic!("byte {i} flipped: {other:?}"),
        }
    }
}

#[test]
fn replay_to_another_host_is_refused() {
    let f = fixture();
    let other_key = HostSealingKey::generate();
    let other = host("kvm-99.example");
    let err = open(&f.bytes, &other_key, &other, volume(1), 7).unwrap_err();
    assert!(matches!(err, OpenError::WrongHost { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "packet is sealed for host \"kvm-01.example\", not for this host (\"kvm-99.example\")"
    );

    // Rewriting the header to name the other host does not help: the header
    // is bound to the ciphertext, and the key is another host's.
    let mut sealed = SealedPacket::from_bytes(&f.bytes).unwrap();
    sealed.header.host = other.clone();
    let err = open(&sealed.to_bytes(), &other_key, &other, volume(1), 7).unwrap_err();
    assert!(matches!(err, OpenError::Decrypt), "{err:?}");

    // Nor does it with the right key: the header was bound as AEAD data.
    let err = open(&sealed.to_bytes(), &f.key, &other, volume(1), 7).unwrap_err();
    assert!(matches!(err, OpenError::Decrypt), "{err:?}");
}

#[test]
fn replay_for_another_volume_or_generation_is_refused() {
    let f = fixture();
    let err = open(&f.bytes, &f.key, &f.host, volume(2), 7).unwrap_err();
    assert!(matches!(err, OpenError::WrongVolume { .. }), "{err:?}");
    assert!(err.to_string().contains(&volume(2).to_string()));
    let err = open(&f.bytes, &f.key, &f.host, volume(1), 8).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "packet holds key generation 7 of volume {}, but the command expects generation 8",
            volume(1)
        )
    );

    // A header edited to claim another volume or generation does not decrypt.
    for edit in [
        |s: &mut SealedPacket| s.header.volume_id = volume(2),
        |s: &mut SealedPacket| s.header.generation = 8,
    ] {
        let mut sealed = SealedPacket::from_bytes(&f.bytes).unwrap();
        edit(&mut sealed);
        let h = sealed.header.clone();
        let err = open(
            &sealed.to_bytes(),
            &f.key,
            &f.host,
            h.volume_id,
            h.generation,
        )
        .unwrap_err();
        assert!(matches!(err, OpenError::Decrypt), "{err:?}");
    }
}

#[test]
fn a_packet_sealed_to_an_old_key_of_the_same_host_is_refused() {
    let f = fixture();
    let new_key = HostSealingKey::generate();
    let err = open(&f.bytes, &new_key, &f.host, volume(1), 7).unwrap_err();
    assert!(matches!(err, OpenError::Decrypt));
    assert!(err.to_string().contains("re-enrolled"), "{err}");
}

#[test]
fn invalid_packets_are_not_sealed() {
    let key = HostSealingKey::generate();
    let mut p = passphrase_packet(volume(1), 1);
    p.mechanism = Mechanism::LuksVolumeKey; // a 43-byte "volume key"
    let err = seal(&p, &host("h"), &key.public_key()).unwrap_err();
    assert!(
        matches!(
            err,
            SealError::InvalidPacket {
                field: "secret",
                ..
            }
        ),
        "{err:?}"
    );
    let mut p = passphrase_packet(volume(1), 1);
    p.secret = SecretOpaque::copy_from_secret_slice(&[0xff, 0xfe]).unwrap();
    let err = seal(&p, &host("h"), &key.public_key()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "key packet field `secret` is invalid: passphrase must be UTF-8 text"
    );
}

#[test]
fn no_secret_in_debug_or_error_output() {
    let f = fixture();
    let secret = String::from_utf8(f.packet.secret.expose_secret().to_vec()).unwrap();
    let opened = open(&f.bytes, &f.key, &f.host, volume(1), 7).unwrap();
    let mut texts = vec![
        format!("{:?}", f.packet),
        format!("{opened:?}"),
        format!("{:?}", f.key),
        format!("{:?}", SealedPacket::from_bytes(&f.bytes).unwrap()),
    ];
    for (v, g) in [(volume(2), 7), (volume(1), 8)] {
        let err = open(&f.bytes, &f.key, &f.host, v, g).unwrap_err();
        texts.push(err.to_string());
        texts.push(format!("{err:?}"));
    }
    for t in &texts {
        assert!(!t.contains(&secret), "secret printed in {t}");
    }
    assert!(texts[0].contains("[REDACTED]"), "{}", texts[0]);
}

#[test]
fn sealing_keys_survive_storage_as_bytes() {
    let key = HostSealingKey::generate();
    let restored = HostSealingKey::from_secret_bytes(&*key.expose_secret_bytes()).unwrap();
    assert_eq!(restored.public_key(), key.public_key());
    assert!(HostSealingKey::from_secret_bytes(&[1u8; 31]).is_err());
    assert!(xdr_wipe::seal::HostPublicKey::from_bytes(&[1u8; 33]).is_err());
}

/// Low-order X25519 points, in every encoding (the top bit is ignored by
/// X25519, and values from p up reduce mod p): sealing to one would give an
/// all-zero shared secret, so enrollment must refuse them.
#[test]
fn low_order_public_keys_are_refused() {
    use xdr_wipe::seal::{HostPublicKey, HostSealingKey};
    let hex32 = |s: &str| -> [u8; 32] {
        let v: Vec<u8> = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    };
    let mut low = vec![
        [0u8; 32],
        hex32("0100000000000000000000000000000000000000000000000000000000000000"),
        hex32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        hex32("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ];
    let high: Vec<[u8; 32]> = low
        .iter()
        .map(|k| {
            let mut k = *k;
            k[31] |= 0x80;
            k
        })
        .collect();
    low.extend(high);
    for k in &low {
        let e = HostPublicKey::from_bytes(k)
            .err()
            .unwrap_or_else(|| panic!("accepted {k:02x?}"));
        assert!(e.to_string().contains("low-order"), "{e}");
    }
    // Real keys still pass.
    for _ in 0..8 {
        let pk = HostSealingKey::generate().public_key();
        assert!(HostPublicKey::from_bytes(pk.as_bytes()).is_ok());
    }
}

fn half(vol: VolumeId, generation: u64, bytes: [u8; 32]) -> KeyPacket {
    let mut p = passphrase_packet(vol, generation);
    p.mechanism = Mechanism::QemuLuksPassphraseHalf;
    p.secret = PacketSecret::copy_from_secret_slice(&bytes).unwrap();
    p
}

#[test]
fn split_halves_combine_into_the_passphrase_of_their_xor_and_nothing_else() {
    use xdr_wipe::packet::{HalvesError, combine_halves, generate_half, passphrase_from_random};
    let (u, v) = ([0x5a; 32], [0xc3; 32]);
    let k = combine_halves(&half(volume(1), 3, u), &half(volume(1), 3, v)).unwrap();
    assert_eq!(k.mechanism, Mechanism::QemuLuksPassphrase);
    assert_eq!((k.volume_id, k.generation), (volume(1), 3));
    let expected = passphrase_from_random(&[0x5a ^ 0xc3; 32]);
    assert_eq!(k.secret.expose_secret(), expected.expose_secret());
    assert!(k.check().is_ok());
    // A half alone is not the passphrase, nor is either half's text.
    assert_ne!(
        k.secret.expose_secret(),
        passphrase_from_random(&u).expose_secret()
    );
    // Halves travel sealed like any packet.
    let f = fixture();
    let h = half(volume(2), 1, v);
    let sealed = seal(&h, &f.host, &f.key.public_key()).unwrap().to_bytes();
    let opened = open(&sealed, &f.key, &f.host, volume(2), 1).unwrap();
    assert_eq!(opened.mechanism, Mechanism::QemuLuksPassphraseHalf);
    assert_eq!(opened.secret.expose_secret(), &v);

    assert_eq!(
        combine_halves(&half(volume(1), 3, u), &half(volume(1), 4, v)).unwrap_err(),
        HalvesError::Mismatch
    );
    assert_eq!(
        combine_halves(&half(volume(1), 3, u), &half(volume(2), 3, v)).unwrap_err(),
        HalvesError::Mismatch
    );
    assert_eq!(
        combine_halves(&passphrase_packet(volume(1), 3), &half(volume(1), 3, v)).unwrap_err(),
        HalvesError::NotAHalf("first")
    );
    // A half is 32 bytes, checked when it is sealed or opened.
    let mut short = half(volume(1), 3, u);
    short.secret = PacketSecret::copy_from_secret_slice(&[1; 31]).unwrap();
    assert_eq!(short.check().unwrap_err().0, "secret");
    assert!(seal(&short, &f.host, &f.key.public_key()).is_err());
    assert_eq!(generate_half().unwrap().len(), 32);
}
