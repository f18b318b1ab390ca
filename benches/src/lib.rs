//! Benchmark harness.
#![forbid(unsafe_code)]
