#![no_main]
// What this target checks: edgehose::fuzz::templates.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::templates(data));
