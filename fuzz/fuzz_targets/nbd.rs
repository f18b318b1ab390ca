//! One NBD connection from arbitrary client bytes (`fixtures::fuzzing::nbd_session`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fixtures::fuzzing::nbd_session(data);
});
