//! Fuzz target: the hook socket's request reader. Any line is refused with
//! a message, or parses to a request whose own line parses back to it. The
//! check lives in `virt_plugin::protocol::fuzzing`.
//!
//! Run: `cd virt-plugin/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run request corpus/request seeds/request`
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    virt_plugin::protocol::fuzzing::request_roundtrip(data);
});
