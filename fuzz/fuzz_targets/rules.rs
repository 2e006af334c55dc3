#![no_main]
// What this target checks: edgehose::fuzz::rules.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::rules(data));
