//! `cargo fuzz run qcow2_image`: see `reliability_tests::qcow2::image`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reliability_tests::qcow2::image(data));
