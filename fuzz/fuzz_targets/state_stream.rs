//! `cargo fuzz run state_stream`: see `reliability_tests::state_stream::stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reliability_tests::state_stream::stream(data));
