#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kanaria::internals::fuzz::request_head(data));
