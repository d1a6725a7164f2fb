#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dirty_bitmap::fuzzing::repair(data));
