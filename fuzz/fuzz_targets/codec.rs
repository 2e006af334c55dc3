#![no_main]
// What this target checks: edgehose::fuzz::codec.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::codec(data));
