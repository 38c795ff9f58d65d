//! Fuzz target: whatever domain XML `guestkey_domxml::parse` accepts, a
//! libvirt-like reading and a last-wins reading (over roxmltree) agree
//! with, and `rewrite` keeps. The check lives in
//! `guestkey_domxml::fuzzing::check`.
//!
//! Run: `cd domxml/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run read corpus/read seeds/read -- -dict=read.dict`
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guestkey_domxml::fuzzing::check(data);
});
