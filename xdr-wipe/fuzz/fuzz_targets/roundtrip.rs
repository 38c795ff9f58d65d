//! Fuzz target: decode arbitrary bytes as an XDR structure of every type,
//! a key packet or a sealed packet; whatever decodes must re-encode to the
//! same bytes. The check lives in `xdr_wipe::fuzzing::roundtrip`.
//!
//! Run: `cd xdr-wipe/fuzz && cargo fuzz run roundtrip corpus/roundtrip seeds/roundtrip`
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    xdr_wipe::fuzzing::roundtrip(data);
});
