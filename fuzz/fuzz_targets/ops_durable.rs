#![no_main]

#[path = "../harness/durable.rs"]
mod durable;
#[path = "../harness/ops.rs"]
mod ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| durable::ops_durable(data));
