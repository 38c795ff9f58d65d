//! "A length above its declared maximum is refused before anything is
//! allocated": a counting allocator records the largest allocation made
//! while decoding hostile length prefixes.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use xdr_wipe::packet::KeyPacket;
use xdr_wipe::seal::SealedPacket;
use xdr_wipe::{BoundedVec, ErrorKind, Opaque, SecretOpaque, decode};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Only the measuring thread counts: other test threads allocate too.
    static MEASURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: forwards every call unchanged to the system allocator; only
// records the size requested.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MEASURING.with(|m| m.get()) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Largest single allocation made by `f`.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    MEASURING.with(|m| m.set(true));
    f();
    MEASURING.with(|m| m.set(false));
    LARGEST.load(Ordering::Relaxed)
}

#[test]
fn hostile_lengths_allocate_nothing_large() {
    // (name, input, decoder): each input claims a huge length and stops.
    type Decoder = fn(&[u8]) -> Option<xdr_wipe::Error>;
    let cases: [(&str, Vec<u8>, Decoder); 5] = [
        (
            "opaque within max, input short",
            vec![0x01, 0, 0, 0, 1, 2],
            |b| decode::<Opaque<{ u32::MAX }>>(b).err(),
        ),
        ("secret over max", vec![0xff, 0xff, 0xff, 0xff], |b| {
            decode::<SecretOpaque<1024>>(b).err()
        }),
        (
            "array of a million hypers",
            vec![0x00, 0x0f, 0x42, 0x40, 0, 0, 0, 0],
            |b| decode::<BoundedVec<u64, 2_000_000>>(b).err(),
        ),
        (
            "sealed packet, 32 MiB ciphertext claimed",
            sealed_with_ct_len(32 << 20),
            |b| decode::<SealedPacket>(b).err(),
        ),
        (
            "key packet, header backup of 32 MiB claimed",
            key_packet_with_backup_len(32 << 20),
            |b| decode::<KeyPacket>(b).err(),
        ),
    ];
    for (name, input, decoder) in cases {
        let mut err = None;
        let largest = largest_allocation(|| err = decoder(&input));
        let err = err.unwrap_or_else(|| panic!("{name}: decoded"));
        assert!(
            matches!(
                err.kind(),
                ErrorKind::TooLong { .. } | ErrorKind::Truncated { .. }
            ),
            "{name}: {err}"
        );
        assert!(
            largest < 1024,
            "{name}: allocated {largest} bytes before refusing ({err})"
        );
    }
}

/// A sealed-packet header, an `enc`, and a ciphertext length prefix only.
fn sealed_with_ct_len(len: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, b'h', 0, 0, 0];
    b.extend_from_slice(&[0u8; 16 + 8 + 32]);
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A valid passphrase packet up to a HeaderBackup arm claiming `len` bytes.
fn key_packet_with_backup_len(len: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 1];
    b.extend_from_slice(&[0u8; 16 + 8]);
    b.extend_from_slice(&[0, 0, 0, 1]); // QEMU LUKS passphrase
    b.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1]); // qcow2, LUKS1
    let string = |b: &mut Vec<u8>, s: &[u8]| {
        b.extend_from_slice(&(s.len() as u32).to_be_bytes());
        b.extend_from_slice(s);
        b.resize(b.len().next_multiple_of(4), 0);
    };
    string(&mut b, b"aes");
    b.extend_from_slice(&256u32.to_be_bytes());
    for s in [&b"xts"[..], b"plain64", b"sha256"] {
        string(&mut b, s);
    }
    b.extend_from_slice(&1000u32.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 4, b'p', b'a', b's', b's']);
    b.extend_from_slice(&[0, 0, 0, 2]); // HeaderBackup
    b.extend_from_slice(&len.to_be_bytes());
    b
}

#[test]
fn the_hostile_key_packet_prefix_is_valid_up_to_the_backup() {
    // Guards the test above: the refusal must come from the backup length.
    let err = decode::<KeyPacket>(&key_packet_with_backup_len(32 << 20)).unwrap_err();
    assert_eq!(err.field(), "recovery.HeaderBackup", "{err}");
    let err = decode::<KeyPacket>(&key_packet_with_backup_len(u32::MAX)).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::TooLong { .. }), "{err}");
}
