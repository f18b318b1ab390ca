//! thin_dump XML from arbitrary bytes: restore must turn any input into an error (naming a
//! line) or a pool, never panic, hang or allocate without bound; a pool it writes must check
//! clean and dump back to the same devices and mappings it restores from.
#![no_main]

use std::sync::Arc;

use engine::io::{BlockDevice, MemDevice};
use engine::tools::check::{check, CheckOptions};
use engine::tools::dump::{dump, DumpOptions};
use engine::tools::restore::{restore_bytes, RestoreError};
use libfuzzer_sys::fuzz_target;

/// 256 KiB: the smallest metadata device format accepts, so size limits bite early.
const META_SIZE: u64 = 64 * 4096;

fuzz_target!(|data: &[u8]| {
    let meta = Arc::new(MemDevice::new(META_SIZE));
    let dev: Arc<dyn BlockDevice> = meta.clone();
    match restore_bytes(data, dev) {
        Ok(_) => {
            let report = check(&*meta, &CheckOptions::default());
            assert!(
                report.errors().next().is_none(),
                "restore wrote damaged metadata: {:?}",
                report.findings
            );
            // Our own dump must restore to the same dump.
            let mut first = Vec::new();
            dump(&*meta, &DumpOptions::default(), &mut first).expect("dump of a restore");
            let again = Arc::new(MemDevice::new(META_SIZE));
            restore_bytes(&first, again.clone()).expect("restore of our own dump");
            let mut second = Vec::new();
            dump(&*again, &DumpOptions::default(), &mut second).expect("dump");
            assert_eq!(first, second);
        }
        Err(e @ RestoreError::Input { .. }) => assert!(e.line().is_some_and(|l| l >= 1)),
        // Running out of metadata space while writing is an error, not damage.
        Err(RestoreError::Metadata(_)) => {}
        Err(RestoreError::Read(e)) => panic!("no reader here: {e}"),
    }
});
