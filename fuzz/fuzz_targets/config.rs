#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kanaria::fuzz_targets::config(data));
