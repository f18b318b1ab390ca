//! Every input a fuzzer ever broke the engine with (`fuzz/regressions/<target>/`), replayed
//! through the same code the fuzz targets run.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}

/// Damaged trees whose shadowing freed a block the same insert still meant to write
/// (`tm::write` panicked), and damaged space maps that called a live index node free so it
/// was reused for a bitmap and then read as a node (a read past the block); both are now
/// reported as damage. And a pool left with only its metadata reserve, where reserving a
/// metadata snapshot deadlocked (it held the provisioning gate that running out takes).
#[test]
fn metadata_findings_stay_fixed() {
    replay("metadata", fixtures::fuzzing::metadata_records);
}
