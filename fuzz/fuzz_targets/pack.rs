#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caption::fuzzing::pack(data));
