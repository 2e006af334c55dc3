#![no_main]
// What this target checks: edgehose::fuzz::block.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::block(data));
