//! Round-trip checks shared by the fuzz target (`xdr-wipe/fuzz`, built with
//! `--cfg fuzzing`) and the unit tests, which run them over the seed corpus.
//!
//! Every input that decodes must encode back to exactly the same bytes.

#![allow(missing_docs)] // Sample types for tests and fuzzing only.

use crate::codec::{Codec, FixedArray, decode, encode};
use crate::packet::KeyPacket;
use crate::seal::{HostSealingKey, SealedPacket, open};
use crate::types::{BoundedVec, Opaque, XdrString};

crate::xdr_enum! {
    /// An enum with a gap and a negative value.
    pub enum SampleEnum { Low = -1, One = 1, Three = 3 }
}

crate::xdr_union! {
    /// A union with a void arm and two value arms.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum SampleUnion {
        void { Empty = 0 }
        arms { Word(u32) = 1, Name(XdrString<8>) = 7 }
    }
}

crate::xdr_struct! {
    /// One field of every XDR type the crate supports.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct AllTypes {
        /// int
        pub int: i32,
        /// unsigned int
        pub uint: u32,
        /// hyper
        pub hyper: i64,
        /// unsigned hyper
        pub uhyper: u64,
        /// bool
        pub flag: bool,
        /// enum
        pub kind: SampleEnum,
        /// opaque[5]
        pub fixed: [u8; 5],
        /// opaque<16>
        pub var: Opaque<16>,
        /// string<12>
        pub text: XdrString<12>,
        /// unsigned int *
        pub maybe: Option<u32>,
        /// unsigned int[2]
        pub pair: FixedArray<u32, 2>,
        /// string<4> names<3>
        pub names: BoundedVec<XdrString<4>, 3>,
        /// union
        pub choice: SampleUnion,
    }
}

/// Which type the first input byte selects.
fn roundtrip_as<T: Codec>(data: &[u8]) -> bool {
    match decode::<T>(data) {
        Ok(value) => {
            assert_eq!(value.encoded_len(), data.len(), "encoded_len disagrees");
            assert_eq!(&encode(&value)[..], data, "encode(decode(x)) != x");
            true
        }
        Err(e) => {
            // Errors always point inside the input.
            assert!(e.offset() <= data.len(), "error offset past the end: {e}");
            false
        }
    }
}

/// Decodes `data` as the type its first byte selects; whatever decodes must
/// re-encode to the same bytes. Returns whether it decoded. Panics on a
/// round-trip mismatch (the fuzzer reports that as a crash).
pub fn roundtrip(data: &[u8]) -> bool {
    let Some((&selector, rest)) = data.split_first() else {
        return false;
    };
    match selector % 3 {
        0 => roundtrip_as::<AllTypes>(rest),
        1 => roundtrip_as::<KeyPacket>(rest),
        _ => {
            let ok = roundtrip_as::<SealedPacket>(rest);
            if ok {
                // Opening with an unrelated key must fail cleanly, never panic.
                let key = HostSealingKey::from_secret_bytes(&[7u8; 32]).expect("32 bytes");
                if let Ok(p) = SealedPacket::from_bytes(rest) {
                    let h = p.header;
                    assert!(open(rest, &key, &h.host, h.volume_id, h.generation).is_err());
                }
            }
            ok
        }
    }
}
