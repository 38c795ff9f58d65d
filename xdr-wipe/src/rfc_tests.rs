//! RFC 4506 encodings written out as byte tables, and the strict-decoding
//! rules: each refusal names its field and offset.

#![allow(unreachable_pub)] // The macros give test-only types public methods.

use crate::codec::{Codec, FixedArray, decode, encode};
use crate::error::ErrorKind;
use crate::fuzzing::{AllTypes, SampleEnum, SampleUnion};
use crate::types::{BoundedVec, Opaque, XdrString};

fn check<T: Codec + PartialEq + std::fmt::Debug>(value: T, bytes: &[u8]) {
    assert_eq!(&encode(&value)[..], bytes, "encoding of {value:?}");
    assert_eq!(value.encoded_len(), bytes.len(), "encoded_len of {value:?}");
    assert_eq!(
        decode::<T>(bytes).unwrap(),
        value,
        "decoding of {bytes:02x?}"
    );
}

#[test]
fn integers() {
    check(0i32, &[0, 0, 0, 0]);
    check(1i32, &[0, 0, 0, 1]);
    check(-1i32, &[0xff, 0xff, 0xff, 0xff]);
    check(i32::MIN, &[0x80, 0, 0, 0]);
    check(0x0102_0304u32, &[1, 2, 3, 4]);
    check(u32::MAX, &[0xff; 4]);
    check(-2i64, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
    check(0x0102_0304_0506_0708u64, &[1, 2, 3, 4, 5, 6, 7, 8]);
    check(true, &[0, 0, 0, 1]);
    check(false, &[0, 0, 0, 0]);
}

#[test]
fn opaque_string_and_padding() {
    check(*b"abcde", b"abcde\0\0\0");
    check(*b"abcd", b"abcd");
    check([0u8; 0], b"");
    check(
        Opaque::<16>::new(vec![1, 2, 3]).unwrap(),
        &[0, 0, 0, 3, 1, 2, 3, 0],
    );
    check(Opaque::<16>::new(vec![]).unwrap(), &[0, 0, 0, 0]);
    check(
        XdrString::<12>::new("sillyprog").unwrap(),
        b"\0\0\0\x09sillyprog\0\0\0",
    );
}

#[test]
fn optional_arrays_enum_union() {
    check(None::<u32>, &[0, 0, 0, 0]);
    check(Some(5u32), &[0, 0, 0, 1, 0, 0, 0, 5]);
    check(FixedArray([1u32, 2]), &[0, 0, 0, 1, 0, 0, 0, 2]);
    check(
        BoundedVec::<u32, 3>::new(vec![9, 8]).unwrap(),
        &[0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 8],
    );
    check(SampleEnum::Low, &[0xff; 4]);
    check(SampleEnum::Three, &[0, 0, 0, 3]);
    check(SampleUnion::Empty, &[0, 0, 0, 0]);
    check(SampleUnion::Word(7), &[0, 0, 0, 1, 0, 0, 0, 7]);
    check(
        SampleUnion::Name(XdrString::new("ab").unwrap()),
        &[0, 0, 0, 7, 0, 0, 0, 2, b'a', b'b', 0, 0],
    );
}

crate::xdr_union! {
    #[derive(Debug, PartialEq)]
    enum FileType {
        void { Text = 0 }
        arms { Data(XdrString<255>) = 1, Exec(XdrString<255>) = 2 }
    }
}

crate::xdr_struct! {
    #[derive(Debug, PartialEq)]
    struct File {
        filename: XdrString<255>,
        kind: FileType,
        owner: XdrString<8>,
        data: Opaque<1024>,
    }
}

/// The example of RFC 4506 section 7, byte for byte.
#[test]
fn rfc4506_section7_file() {
    let file = File {
        filename: XdrString::new("sillyprog").unwrap(),
        kind: FileType::Exec(XdrString::new("lisp").unwrap()),
        owner: XdrString::new("john").unwrap(),
        data: Opaque::new(b"(quit)".to_vec()).unwrap(),
    };
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x00, 0x00, 0x09, // length of filename = 9
        0x73, 0x69, 0x6c, 0x6c, // "sill"
        0x79, 0x70, 0x72, 0x6f, // "ypro"
        0x67, 0x00, 0x00, 0x00, // "g" and 3 bytes of fill
        0x00, 0x00, 0x00, 0x02, // filekind is EXEC = 2
        0x00, 0x00, 0x00, 0x04, // length of interpretor = 4
        0x6c, 0x69, 0x73, 0x70, // "lisp"
        0x00, 0x00, 0x00, 0x04, // length of owner = 4
        0x6a, 0x6f, 0x68, 0x6e, // "john"
        0x00, 0x00, 0x00, 0x06, // length of file data = 6
        0x28, 0x71, 0x75, 0x69, // "(qui"
        0x74, 0x29, 0x00, 0x00, // "t)" and 2 bytes of fill
    ];
    check(file, &bytes);
}

/// (input, field path, offset, kind) for inputs that must be refused.
#[test]
fn strict_decoding_table() {
    type S = XdrString<8>;
    struct Case {
        name: &'static str,
        result: Result<(), crate::Error>,
        field: &'static str,
        offset: usize,
        kind: ErrorKind,
    }
    fn case<T: Codec>(
        name: &'static str,
        input: &[u8],
        field: &'static str,
        offset: usize,
        kind: ErrorKind,
    ) -> Case {
        Case {
            name,
            result: decode::<T>(input).map(|_| ()),
            field,
            offset,
            kind,
        }
    }
    let cases = [
        case::<u32>(
            "short word",
            &[0, 0, 1],
            "",
            0,
            ErrorKind::Truncated {
                needed: 4,
                available: 3,
            },
        ),
        case::<u32>(
            "trailing",
            &[0, 0, 0, 1, 0],
            "",
            4,
            ErrorKind::TrailingBytes { count: 1 },
        ),
        case::<bool>("bool 2", &[0, 0, 0, 2], "", 0, ErrorKind::InvalidBool(2)),
        case::<Option<u32>>(
            "optional 3",
            &[0, 0, 0, 3],
            "",
            0,
            ErrorKind::InvalidOptional(3),
        ),
        case::<S>(
            "string over max",
            &[0, 0, 0, 9, b'a'],
            "",
            0,
            ErrorKind::TooLong { len: 9, max: 8 },
        ),
        case::<S>(
            "huge length",
            &[0xff, 0xff, 0xff, 0xff],
            "",
            0,
            ErrorKind::TooLong {
                len: u32::MAX.into(),
                max: 8,
            },
        ),
        case::<S>(
            "string short",
            &[0, 0, 0, 3, b'a'],
            "",
            4,
            ErrorKind::Truncated {
                needed: 3,
                available: 1,
            },
        ),
        case::<S>(
            "no padding",
            &[0, 0, 0, 3, b'a', b'b', b'c'],
            "",
            4,
            ErrorKind::Truncated {
                needed: 4,
                available: 3,
            },
        ),
        case::<S>(
            "bad padding",
            &[0, 0, 0, 3, b'a', b'b', b'c', 1],
            "",
            7,
            ErrorKind::NonZeroPadding,
        ),
        case::<S>(
            "not utf-8",
            &[0, 0, 0, 2, 0xc3, 0x28, 0, 0],
            "",
            4,
            ErrorKind::InvalidUtf8,
        ),
        case::<[u8; 2]>(
            "fixed padding",
            &[1, 2, 0, 9],
            "",
            2,
            ErrorKind::NonZeroPadding,
        ),
        case::<SampleEnum>(
            "enum gap",
            &[0, 0, 0, 2],
            "",
            0,
            ErrorKind::InvalidEnum {
                type_name: "SampleEnum",
                value: 2,
            },
        ),
        case::<SampleUnion>(
            "union arm",
            &[0, 0, 0, 5],
            "",
            0,
            ErrorKind::InvalidUnionArm {
                type_name: "SampleUnion",
                value: 5,
            },
        ),
        case::<SampleUnion>(
            "union body",
            &[0, 0, 0, 7, 0, 0, 0, 9],
            "Name",
            4,
            ErrorKind::TooLong { len: 9, max: 8 },
        ),
        case::<BoundedVec<u32, 3>>(
            "array over max",
            &[0, 0, 0, 4],
            "",
            0,
            ErrorKind::TooLong { len: 4, max: 3 },
        ),
        case::<BoundedVec<u64, 1000>>(
            "array longer than input",
            &[0, 0, 3, 0xe8, 0, 0, 0, 0],
            "",
            4,
            ErrorKind::Truncated {
                needed: 8000,
                available: 4,
            },
        ),
        case::<FixedArray<u32, 3>>(
            "fixed array short",
            &[0, 0, 0, 1],
            "",
            0,
            ErrorKind::Truncated {
                needed: 12,
                available: 4,
            },
        ),
        case::<File>(
            "nested field",
            b"\0\0\0\x01a\0\0\0\0\0\0\x02\0\0\0\x01",
            "kind.Exec",
            16,
            ErrorKind::Truncated {
                needed: 1,
                available: 0,
            },
        ),
        case::<File>(
            "owner over max",
            b"\0\0\0\0\0\0\0\0\0\0\0\x09",
            "owner",
            8,
            ErrorKind::TooLong { len: 9, max: 8 },
        ),
    ];
    for c in cases {
        let err = c.result.expect_err(c.name);
        assert_eq!(
            (err.field(), err.offset(), err.kind()),
            (c.field, c.offset, &c.kind),
            "{}: {err}",
            c.name
        );
        // The message names the offset, and the field when there is one.
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("at byte {}", c.offset)),
            "{}: {msg}",
            c.name
        );
        if !c.field.is_empty() {
            assert!(msg.contains(c.field), "{}: {msg}", c.name);
        }
    }
}

#[test]
fn all_types_example() {
    let v = AllTypes {
        int: -5,
        uint: 5,
        hyper: -6,
        uhyper: 6,
        flag: true,
        kind: SampleEnum::One,
        fixed: *b"12345",
        var: Opaque::new(vec![0xaa]).unwrap(),
        text: XdrString::new("hi").unwrap(),
        maybe: Some(1),
        pair: FixedArray([2, 3]),
        names: BoundedVec::new(vec![XdrString::new("x").unwrap()]).unwrap(),
        choice: SampleUnion::Word(4),
    };
    let bytes = encode(&v);
    assert_eq!(
        bytes.len(),
        4 + 4 + 8 + 8 + 4 + 4 + 8 + 8 + 8 + 8 + 8 + 12 + 8
    );
    assert_eq!(decode::<AllTypes>(&bytes).unwrap(), v);
}

#[test]
fn values_over_their_maximum_cannot_be_built() {
    assert!(XdrString::<2>::new("abc").is_err());
    assert!(Opaque::<1>::new(vec![1, 2]).is_err());
    assert!(BoundedVec::<u32, 1>::new(vec![1, 2]).is_err());
    assert!(crate::SecretOpaque::<2>::copy_from_secret_slice(b"abc").is_err());
}
