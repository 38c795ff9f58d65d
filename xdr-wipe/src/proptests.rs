//! Property tests: decode(encode(v)) == v for every value, and
//! encode(decode(b)) == b for every input that decodes.

use proptest::prelude::*;
use proptest::strategy::ValueTree;

use crate::SecretOpaque;
use crate::codec::{Codec, FixedArray, decode, encode};
use crate::fuzzing::{AllTypes, SampleEnum, SampleUnion, roundtrip};
use crate::packet::{
    CipherParams, KeyPacket, Mechanism, PacketSecret, PacketVersion, Recovery, VolumeFormat,
    VolumeId,
};
use crate::types::{BoundedVec, Opaque, XdrString};

fn xdr_string<const MAX: u32>() -> impl Strategy<Value = XdrString<MAX>> {
    proptest::string::string_regex(&format!("\\PC{{0,{MAX}}}"))
        .expect("valid regex")
        .prop_filter_map("too many bytes", |s| XdrString::new(s).ok())
}

fn sample_union() -> impl Strategy<Value = SampleUnion> {
    prop_oneof![
        Just(SampleUnion::Empty),
        any::<u32>().prop_map(SampleUnion::Word),
        xdr_string::<8>().prop_map(SampleUnion::Name),
    ]
}

prop_compose! {
    fn all_types()(
        int in any::<i32>(), uint in any::<u32>(), hyper in any::<i64>(), uhyper in any::<u64>(),
        flag in any::<bool>(), kind in prop::sample::select(SampleEnum::ALL),
        fixed in any::<[u8; 5]>(), var in prop::collection::vec(any::<u8>(), 0..=16),
        text in xdr_string::<12>(), maybe in any::<Option<u32>>(), pair in any::<[u32; 2]>(),
        names in prop::collection::vec(xdr_string::<4>(), 0..=3), choice in sample_union(),
    ) -> AllTypes {
        AllTypes {
            int, uint, hyper, uhyper, flag, kind, fixed,
            var: Opaque::new(var).unwrap(), text, maybe, pair: FixedArray(pair),
            names: BoundedVec::new(names).unwrap(), choice,
        }
    }
}

prop_compose! {
    fn key_packet()(
        id in any::<[u8; 16]>(), generation in any::<u64>(),
        passphrase in "[A-Za-z0-9_-]{1,64}", volume_key in any::<bool>(),
        key in prop::collection::vec(any::<u8>(), 64), recovery in 0u8..3,
        backup in prop::collection::vec(any::<u8>(), 1..200), qcow2 in any::<bool>(),
    ) -> KeyPacket {
        let (mechanism, secret) = if volume_key {
            (Mechanism::LuksVolumeKey, PacketSecret::copy_from_secret_slice(&key[..32]).unwrap())
        } else {
            (Mechanism::QemuLuksPassphrase, PacketSecret::copy_from_secret_slice(passphrase.as_bytes()).unwrap())
        };
        KeyPacket {
            version: PacketVersion::V1,
            volume_id: VolumeId(uuid::Uuid::from_bytes(id)),
            generation,
            mechanism,
            params: CipherParams::aes_xts(if qcow2 { VolumeFormat::Qcow2 } else { VolumeFormat::Raw }),
            secret,
            recovery: match recovery {
                0 => Recovery::None,
                1 => Recovery::DataKey(SecretOpaque::copy_from_secret_slice(&key).unwrap()),
                _ => Recovery::HeaderBackup(SecretOpaque::copy_from_secret_slice(&backup).unwrap()),
            },
        }
    }
}

fn roundtrips<T: Codec + PartialEq + std::fmt::Debug>(v: &T) -> Result<(), TestCaseError> {
    let bytes = encode(v);
    prop_assert_eq!(bytes.len(), v.encoded_len());
    let back: T = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, v);
    prop_assert_eq!(&encode(&back)[..], &bytes[..]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn all_types_roundtrip(v in all_types()) {
        roundtrips(&v)?;
    }

    #[test]
    fn key_packet_roundtrip(p in key_packet()) {
        // KeyPacket holds secrets and has no PartialEq: compare encodings and
        // the secret in constant time.
        let bytes = encode(&p);
        prop_assert_eq!(bytes.len(), p.encoded_len());
        let back: KeyPacket = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(back.secret.ct_eq(p.secret.expose_secret()));
        prop_assert_eq!(back.volume_id, p.volume_id);
        prop_assert_eq!(back.generation, p.generation);
        prop_assert_eq!(&back.params, &p.params);
        prop_assert_eq!(&encode(&back)[..], &bytes[..]);
    }

    /// Valid encodings, truncated or with one byte changed, either are refused
    /// or decode to something that re-encodes to exactly the same bytes.
    #[test]
    fn mutated_encodings_roundtrip_or_fail(v in all_types(), cut in any::<prop::sample::Index>(),
                                           flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let bytes = encode(&v);
        let mut input = vec![0u8];
        input.extend_from_slice(&bytes);
        let mut flipped = input.clone();
        let i = 1 + flip.index(bytes.len());
        flipped[i] ^= 1 << bit;
        roundtrip(&flipped);
        input.truncate(1 + cut.index(bytes.len()));
        prop_assert!(!roundtrip(&input), "a truncated encoding decoded");
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        roundtrip(&data);
    }
}

/// The committed seed corpus of the fuzz target passes the same check.
#[test]
fn fuzz_seed_corpus_roundtrips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/roundtrip");
    let mut decoded = 0;
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        seen += 1;
        if roundtrip(&data) {
            decoded += 1;
        }
    }
    assert!(seen >= 3, "seed corpus missing in {}", dir.display());
    assert_eq!(decoded, seen, "every seed is a valid encoding");
}

/// Writes the seed corpus (`cargo test -p xdr-wipe --lib
/// write_seed_corpus -- --ignored`). Seeds hold test keys only.
#[test]
#[ignore = "writes files; run by hand to refresh the seed corpus"]
fn write_seed_corpus() {
    use crate::seal::{HostSealingKey, seal};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/roundtrip");
    std::fs::create_dir_all(&dir).unwrap();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let write = |name: String, selector: u8, bytes: &[u8]| {
        let mut data = vec![selector];
        data.extend_from_slice(bytes);
        std::fs::write(dir.join(name), data).unwrap();
    };
    for i in 0..4 {
        let v = all_types().new_tree(&mut runner).unwrap().current();
        write(format!("all-types-{i}"), 0, &encode(&v));
        let p = key_packet().new_tree(&mut runner).unwrap().current();
        write(format!("key-packet-{i}"), 1, &encode(&p));
        let key = HostSealingKey::generate();
        let host = XdrString::new(format!("host-{i}.example")).unwrap();
        let sealed = seal(&p, &host, &key.public_key()).unwrap();
        write(format!("sealed-packet-{i}"), 2, &sealed.to_bytes());
    }
}
