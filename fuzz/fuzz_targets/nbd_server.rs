//! `cargo fuzz run nbd_server`: see `reliability_tests::nbd_server::server`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reliability_tests::nbd_server::server(data));
