#![no_main]
// What this target checks: edgehose::fuzz::tls_records.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehose::fuzz::tls_records(data));
