//! Fuzz target: the enrollment request (token, CSR, sealing key) as the
//! server reads it. The check lives in `mgmt_server::fuzzing`.
//!
//! Run: `cd mgmt-server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run enroll corpus/enroll seeds/enroll`
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mgmt_server::fuzzing::enrollment_request(data);
});
