//! thin_dump XML from arbitrary bytes through restore (`fixtures::fuzzing::restore_xml`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fixtures::fuzzing::restore_xml(data));
