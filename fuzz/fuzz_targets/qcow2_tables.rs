//! `cargo fuzz run qcow2_tables`: see `reliability_tests::qcow2::tables`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reliability_tests::qcow2::tables(data));
