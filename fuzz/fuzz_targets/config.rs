#![no_main]
// What this target checks: edgehose::fuzz::config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::config(data));
