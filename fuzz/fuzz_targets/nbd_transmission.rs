//! `cargo fuzz run nbd_transmission`: see `reliability_tests::nbd_server::transmission`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reliability_tests::nbd_server::transmission(data));
