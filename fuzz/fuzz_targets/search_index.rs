#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caption::fuzzing::search_index(data));
