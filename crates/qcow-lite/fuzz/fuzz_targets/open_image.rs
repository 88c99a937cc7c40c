//! Arbitrary bytes opened as a qcow2 image: every open, read, write, check and
//! repair must end in Ok or Err, never a panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qcow_lite::fuzzing::exercise(data);
});
