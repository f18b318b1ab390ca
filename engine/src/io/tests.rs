//! Conformance tests written once over `&dyn BlockDevice`, run for every implementation.

use super::*;

fn reads_back_writes_and_zeros(dev: &dyn BlockDevice) {
    let mut buf = vec![0xAA; 100_000];
    dev.read_at(&mut buf, 12_345).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "fresh device reads zeros");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    dev.write_at(&data, 70_000).unwrap();
    let mut back = vec![0; data.len()];
    dev.read_at(&mut back, 70_000).unwrap();
    assert_eq!(back, data);
    dev.sync().unwrap();
}

fn refuses_access_past_the_end(dev: &dyn BlockDevice) {
    let size = dev.size();
    let mut buf = [0u8; 10];
    assert!(dev.read_at(&mut buf, size - 5).is_err());
    assert!(dev.write_at(&buf, size).is_err());
    assert!(dev.read_at(&mut buf, u64::MAX - 2).is_err());
}

fn discard_reads_zeros(dev: &dyn BlockDevice) {
    let data = vec![7u8; 256 * 1024];
    dev.write_at(&data, 0).unwrap();
    dev.discard(64 * 1024, 128 * 1024).unwrap();
    let mut back = vec![1u8; 256 * 1024];
    dev.read_at(&mut back, 0).unwrap();
    assert!(back[..64 * 1024].iter().all(|&b| b == 7));
    assert!(back[64 * 1024..192 * 1024].iter().all(|&b| b == 0));
    assert!(back[192 * 1024..].iter().all(|&b| b == 7));
}

fn grows(dev: &dyn BlockDevice) {
    let old = dev.size();
    dev.grow(old + 1_000_000).unwrap();
    assert_eq!(dev.size(), old + 1_000_000);
    let mut buf = [9u8; 16];
    dev.read_at(&mut buf, old + 999_984).unwrap();
    assert_eq!(buf, [0; 16]);
}

fn all(dev: &dyn BlockDevice) {
    reads_back_writes_and_zeros(dev);
    refuses_access_past_the_end(dev);
    discard_reads_zeros(dev);
    grows(dev);
}

#[test]
fn mem_device_conforms() {
    all(&MemDevice::new(4 << 20));
}

#[test]
fn file_device_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    let dev = FileDevice::create(&path, 4 << 20).unwrap();
    all(&dev);
    drop(dev);
    let dev = FileDevice::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(dev.size(), (4 << 20) + 1_000_000);
}

#[test]
fn file_device_creation_is_sparse_and_discard_punches_holes() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    let dev = FileDevice::create(&path, 1 << 30).unwrap();
    assert!(
        std::fs::metadata(&path).unwrap().blocks() < 64,
        "a new device takes no space"
    );
    dev.write_at(&vec![1u8; 4 << 20], 0).unwrap();
    dev.sync().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    dev.discard(0, 4 << 20).unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(
        after + 8000 <= before,
        "discard gave the space back: {before} -> {after} sectors"
    );
}

#[test]
fn file_device_reads_leave_access_times_alone() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    drop(FileDevice::create(&path, 1 << 20).unwrap());
    // An access time two days old: under relatime (or strictatime) a plain read renews it.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_times(std::fs::FileTimes::new().set_accessed(old))
        .unwrap();
    let before = std::fs::metadata(&path).unwrap().atime();
    for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
        let dev = FileDevice::open(&path, mode).unwrap();
        dev.read_at(&mut [0u8; 4096], 0).unwrap();
    }
    assert_eq!(std::fs::metadata(&path).unwrap().atime(), before);
}
