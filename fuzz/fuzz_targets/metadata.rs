//! Whole damaged metadata images through open, IO, commit, check and dump
//! (`fixtures::fuzzing::metadata_records`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fixtures::fuzzing::metadata_records(data));
