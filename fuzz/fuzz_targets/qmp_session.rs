//! `cargo fuzz run qmp_session`: see `reliability_tests::qmp_session::session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reliability_tests::qmp_session::session(data));
