#![no_main]
// What this target checks: edgehose::fuzz::kpl.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::kpl(data));
