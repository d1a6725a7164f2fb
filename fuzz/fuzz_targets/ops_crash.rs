#![no_main]

#[path = "../harness/ops.rs"]
mod ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ops::ops_crash(data));
