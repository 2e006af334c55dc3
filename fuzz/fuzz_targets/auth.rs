#![no_main]
// What this target checks: edgehose::fuzz::auth.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::auth(data));
