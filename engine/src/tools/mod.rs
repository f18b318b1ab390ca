//! Offline metadata tools: check and dump. They read metadata blocks straight from a device
//! and trust nothing they read.
