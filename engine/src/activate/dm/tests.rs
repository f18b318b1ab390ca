//! The DM ioctl buffers, encoded and decoded without a kernel.

use std::mem::{offset_of, size_of};

use proptest::prelude::*;

use super::*;

// Mirrors of the structs in include/uapi/linux/dm-ioctl.h, laid out by the compiler with the
// C rules, so the hand-written offsets above are checked against what a C compiler makes of
// the header rather than against a second copy of the same numbers.
#[allow(dead_code)]
#[repr(C)]
struct CDmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; 128],
    uuid: [u8; 129],
    data: [u8; 7],
}

#[allow(dead_code)]
#[repr(C)]
struct CDmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; 16],
}

#[allow(dead_code)]
#[repr(C)]
struct CDmNameList {
    dev: u64,
    next: u32,
    name: [u8; 0],
}

#[allow(dead_code)]
#[repr(C)]
struct CDmTargetVersions {
    next: u32,
    version: [u32; 3],
    name: [u8; 0],
}

#[allow(dead_code)]
#[repr(C)]
struct CDmTargetMsg {
    sector: u64,
    message: [u8; 0],
}

#[test]
fn struct_sizes_match_the_uapi_header() {
    assert_eq!(size_of::<CDmIoctl>(), DM_IOCTL_SIZE);
    assert_eq!(DM_IOCTL_SIZE, 312);
    assert_eq!(size_of::<CDmTargetSpec>(), DM_TARGET_SPEC_SIZE);
    assert_eq!(DM_TARGET_SPEC_SIZE, 40);
    assert_eq!(size_of::<CDmNameList>(), 16);
    assert_eq!(offset_of!(CDmNameList, name), DM_NAME_LIST_NAME_OFFSET);
    assert_eq!(size_of::<CDmTargetVersions>(), DM_TARGET_VERSIONS_SIZE);
    assert_eq!(offset_of!(CDmTargetVersions, name), DM_TARGET_VERSIONS_SIZE);
    assert_eq!(size_of::<CDmTargetMsg>(), DM_TARGET_MSG_SIZE);
}

#[test]
fn header_field_offsets_match_the_uapi_header() {
    assert_eq!(offset_of!(CDmIoctl, version), OFF_VERSION);
    assert_eq!(offset_of!(CDmIoctl, data_size), OFF_DATA_SIZE);
    assert_eq!(offset_of!(CDmIoctl, data_start), OFF_DATA_START);
    assert_eq!(offset_of!(CDmIoctl, target_count), OFF_TARGET_COUNT);
    assert_eq!(offset_of!(CDmIoctl, open_count), OFF_OPEN_COUNT);
    assert_eq!(offset_of!(CDmIoctl, flags), OFF_FLAGS);
    assert_eq!(offset_of!(CDmIoctl, event_nr), OFF_EVENT_NR);
    assert_eq!(offset_of!(CDmIoctl, dev), OFF_DEV);
    assert_eq!(offset_of!(CDmIoctl, name), OFF_NAME);
    assert_eq!(offset_of!(CDmIoctl, uuid), OFF_UUID);
    assert_eq!(offset_of!(CDmIoctl, data), OFF_DATA);
    assert_eq!(offset_of!(CDmTargetSpec, next), 20);
    assert_eq!(offset_of!(CDmTargetSpec, target_type), 24);
}

#[test]
fn request_header_carries_version_sizes_name_and_uuid() {
    let payload = [0xAB; 10];
    let buf = encode_request(1024, "pool", Some("uuid-1"), FLAG_SUSPEND, 2, &payload);
    assert_eq!(buf.len(), 1024);
    assert_eq!(get_u32(&buf, 0), Some(4));
    assert_eq!(get_u32(&buf, OFF_DATA_SIZE), Some(1024));
    assert_eq!(get_u32(&buf, OFF_DATA_START), Some(312));
    assert_eq!(get_u32(&buf, OFF_TARGET_COUNT), Some(2));
    assert_eq!(get_u32(&buf, OFF_FLAGS), Some(FLAG_SUSPEND));
    assert_eq!(&buf[OFF_NAME..OFF_NAME + 5], b"pool\0");
    assert_eq!(&buf[OFF_UUID..OFF_UUID + 7], b"uuid-1\0");
    assert_eq!(&buf[312..322], &payload);
    // A payload larger than the asked size grows the buffer.
    let big = encode_request(0, "x", None, 0, 0, &[1; 100]);
    assert_eq!(big.len(), 412);
    assert_eq!(get_u32(&big, OFF_DATA_SIZE), Some(412));
}

#[test]
fn names_at_the_limit_pass_and_longer_ones_are_refused_clearly() {
    validate_name(&"n".repeat(127)).unwrap();
    let e = validate_name(&"n".repeat(128)).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("128 bytes") && text.contains("127"), "{text}");
    for bad in ["", "a/b", "control", ".", "..", "a\0b"] {
        assert!(
            matches!(validate_name(bad), Err(DmError::InvalidArgument { .. })),
            "{bad:?} must be refused"
        );
    }
    validate_uuid(&"u".repeat(128)).unwrap();
    let e = validate_uuid(&"u".repeat(129)).unwrap_err().to_string();
    assert!(e.contains("uuid") && e.contains("128"), "{e}");
    assert!(validate_uuid("").is_err());
}

#[test]
fn target_types_and_params_are_checked() {
    let spec = |ty: &str, params: &str| TargetSpec {
        start_sector: 0,
        length_sectors: 8,
        target_type: ty.into(),
        params: params.into(),
    };
    validate_target(&spec("thin-pool", "253:0 253:1 128 0 0")).unwrap();
    validate_target(&spec(&"t".repeat(15), "")).unwrap();
    assert!(validate_target(&spec(&"t".repeat(16), "")).is_err());
    assert!(validate_target(&spec("", "")).is_err());
    assert!(validate_target(&spec("thin pool", "")).is_err());
    assert!(validate_target(&spec("thin", "1\u{0}2")).is_err());
}

#[test]
fn table_payload_has_relative_aligned_next_and_terminated_params() {
    let targets = [
        TargetSpec {
            start_sector: 0,
            length_sectors: 1000,
            target_type: "linear".into(),
            params: "8:0 0".into(),
        },
        TargetSpec {
            start_sector: 1000,
            length_sectors: 24,
            target_type: "zero".into(),
            params: String::new(),
        },
    ];
    let p = encode_table(&targets);
    // 40 + "8:0 0\0" = 46 -> 48; 40 + "\0" = 41 -> 48.
    assert_eq!(p.len(), 96);
    assert_eq!(get_u64(&p, 0), Some(0));
    assert_eq!(get_u64(&p, 8), Some(1000));
    assert_eq!(get_u32(&p, 20), Some(48));
    assert_eq!(&p[24..31], b"linear\0");
    assert_eq!(&p[40..46], b"8:0 0\0");
    assert_eq!(get_u64(&p, 48), Some(1000));
    assert_eq!(get_u64(&p, 56), Some(24));
    assert_eq!(&p[72..77], b"zero\0");
    assert_eq!(p[88], 0);
}

#[test]
fn message_payload_is_sector_then_terminated_text() {
    let p = encode_message(7, "create_thin 3");
    assert_eq!(get_u64(&p, 0), Some(7));
    assert_eq!(&p[8..], b"create_thin 3\0");
}

#[test]
fn device_numbers_round_trip_through_the_kernel_encoding() {
    for (major, minor) in [(253, 0), (254, 3), (7, 255), (259, 256), (4095, 1_048_575)] {
        let d = DevId { major, minor };
        assert_eq!(DevId::from_kernel(d.to_kernel()), d);
        assert_eq!(nix::sys::stat::major(d.dev_t()), u64::from(major));
        assert_eq!(nix::sys::stat::minor(d.dev_t()), u64::from(minor));
    }
    // new_encode_dev(MKDEV(253, 1)) as the kernel computes it.
    assert_eq!(
        DevId::from_kernel(0xfd01),
        DevId {
            major: 253,
            minor: 1
        }
    );
    assert_eq!(
        DevId {
            major: 253,
            minor: 1
        }
        .to_string(),
        "253:1"
    );
}

/// A reply as the kernel lays it out: header, then `payload` at 312.
fn reply(flags: u32, target_count: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = encode_request(4096, "dev", None, flags, target_count, &[]);
    put_u32(
        &mut buf,
        OFF_DATA_SIZE,
        (DM_IOCTL_SIZE + payload.len()) as u32,
    );
    buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
    buf
}

fn name_record(dev: u64, name: &str, last: bool) -> Vec<u8> {
    let name_end = DM_NAME_LIST_NAME_OFFSET + name.len() + 1;
    // Newer kernels put event_nr and flags after the name, 8-aligned.
    let len = align8(name_end) + 8;
    let mut r = vec![0u8; len];
    put_u64(&mut r, 0, dev);
    put_u32(&mut r, 8, if last { 0 } else { len as u32 });
    r[12..12 + name.len()].copy_from_slice(name.as_bytes());
    put_u32(&mut r, align8(name_end), 42);
    r
}

#[test]
fn device_list_is_parsed_from_chained_records() {
    let mut p = name_record(0xfd00, "thinbox-0123456789abcdef-pool", false);
    p.extend(name_record(0xfd01, "t1", true));
    let buf = reply(0, 0, &p);
    let r = decode_reply("DM_LIST_DEVICES", &buf).unwrap();
    let list = parse_name_list(r.payload).unwrap();
    assert_eq!(
        list,
        vec![
            (
                "thinbox-0123456789abcdef-pool".to_string(),
                DevId {
                    major: 253,
                    minor: 0
                }
            ),
            (
                "t1".to_string(),
                DevId {
                    major: 253,
                    minor: 1
                }
            ),
        ]
    );
}

#[test]
fn empty_device_list_is_a_zero_dev() {
    assert!(parse_name_list(&[0u8; 16]).unwrap().is_empty());
    assert!(parse_name_list(&[]).unwrap().is_empty());
}

#[test]
fn malformed_device_lists_are_errors() {
    let mut p = name_record(0xfd00, "a", false);
    // The next record is missing: `next` points past the end.
    assert!(matches!(parse_name_list(&p), Err(DmError::BadReply { .. })));
    // A name that runs to the end without a NUL.
    p = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'a', b'b'];
    assert!(parse_name_list(&p).is_err());
    // A record cut short.
    assert!(parse_name_list(&[1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    // `next` too small to make progress.
    let mut q = name_record(0xfd00, "a", false);
    put_u32(&mut q, 8, 4);
    q.extend(name_record(0xfd01, "b", true));
    assert!(parse_name_list(&q).is_err());
}

fn status_record(start: u64, len: u64, ty: &str, text: &str, next: Option<u32>) -> Vec<u8> {
    let n = align8(DM_TARGET_SPEC_SIZE + text.len() + 1);
    let mut r = vec![0u8; n];
    put_u64(&mut r, 0, start);
    put_u64(&mut r, 8, len);
    put_u32(&mut r, 20, next.unwrap_or(0));
    r[24..24 + ty.len()].copy_from_slice(ty.as_bytes());
    r[40..40 + text.len()].copy_from_slice(text.as_bytes());
    r
}

#[test]
fn status_targets_are_parsed_with_next_from_the_payload_start() {
    let line = "5 141/1024 60/1024 - rw discard_passdown queue_if_no_space - 1024";
    let kernel_line = format!("{line} ");
    let first = status_record(0, 131072, "thin-pool", &kernel_line, None);
    let second_at = first.len() as u32;
    let mut first = status_record(0, 131072, "thin-pool", &kernel_line, Some(second_at));
    let second = status_record(131072, 8, "error", "", Some(0));
    first.extend(&second);
    let buf = reply(FLAG_ACTIVE_PRESENT, 2, &first);
    let r = decode_reply("DM_TABLE_STATUS", &buf).unwrap();
    let targets = parse_targets(r.payload, r.target_count).unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0].target_type, "thin-pool");
    assert_eq!(targets[0].length_sectors, 131072);
    assert_eq!(targets[0].params, line);
    assert_eq!(targets[1].start_sector, 131072);
    assert_eq!(targets[1].target_type, "error");
    assert_eq!(targets[1].params, "");
}

#[test]
fn malformed_status_payloads_are_errors() {
    let one = status_record(0, 8, "thin", "0 -", Some(0));
    // More targets claimed than present.
    assert!(parse_targets(&one, 2).is_err());
    // Cut inside the spec, and inside the text.
    assert!(parse_targets(&one[..30], 1).is_err());
    assert!(parse_targets(&one[..42], 1).is_err());
    // A next that points backwards.
    let mut two = status_record(0, 8, "thin", "0 -", Some(0));
    two.extend(status_record(8, 8, "thin", "0 -", Some(0)));
    assert!(parse_targets(&two, 2).is_err());
}

#[test]
fn versions_are_parsed_from_chained_records() {
    let mut p = Vec::new();
    for (i, (name, v)) in [("thin-pool", [1, 23, 0]), ("linear", [1, 4, 0])]
        .iter()
        .enumerate()
    {
        let len = align8(DM_TARGET_VERSIONS_SIZE + name.len() + 1);
        let mut r = vec![0u8; len];
        put_u32(&mut r, 0, if i == 0 { len as u32 } else { 0 });
        for (j, x) in v.iter().enumerate() {
            put_u32(&mut r, 4 + 4 * j, *x);
        }
        r[16..16 + name.len()].copy_from_slice(name.as_bytes());
        p.extend(r);
    }
    let v = parse_versions(&p).unwrap();
    assert_eq!(v[0].name, "thin-pool");
    assert_eq!(v[0].version, [1, 23, 0]);
    assert_eq!(v[1].name, "linear");
    assert!(parse_versions(&p[..20]).is_err());
}

#[test]
fn reply_headers_with_impossible_sizes_are_errors() {
    let mut buf = reply(0, 0, &[]);
    assert!(decode_reply("x", &buf[..100]).is_err());
    put_u32(&mut buf, OFF_DATA_SIZE, 1_000_000);
    assert!(matches!(
        decode_reply("x", &buf),
        Err(DmError::BadReply { .. })
    ));
    put_u32(&mut buf, OFF_DATA_SIZE, 400);
    put_u32(&mut buf, OFF_DATA_START, 500);
    assert!(decode_reply("x", &buf).is_err());
    put_u32(&mut buf, OFF_DATA_START, 8);
    assert!(decode_reply("x", &buf).is_err());
    // No payload: data_size is offsetof(data).
    put_u32(&mut buf, OFF_DATA_SIZE, OFF_DATA as u32);
    assert!(decode_reply("x", &buf).unwrap().payload.is_empty());
}

#[test]
fn reply_header_decodes_device_info() {
    let mut buf = reply(
        FLAG_SUSPEND | FLAG_ACTIVE_PRESENT | FLAG_DEFERRED_REMOVE | FLAG_READONLY,
        1,
        &[],
    );
    put_u64(&mut buf, OFF_DEV, 0xfd02);
    put_u32(&mut buf, OFF_OPEN_COUNT, 3);
    put_u32(&mut buf, OFF_EVENT_NR, 9);
    let info = decode_reply("x", &buf).unwrap().info();
    assert_eq!(info.name, "dev");
    assert_eq!(info.uuid, None);
    assert_eq!(
        info.dev,
        DevId {
            major: 253,
            minor: 2
        }
    );
    assert_eq!(
        (info.open_count, info.event_nr, info.target_count),
        (3, 9, 1)
    );
    assert!(info.suspended && info.read_only && info.active_table && info.deferred_remove);
    assert!(!info.inactive_table);
}

#[test]
fn a_missing_control_node_is_a_clear_error() {
    let e = DmControl::open_at(Path::new("/nonexistent/mapper/control")).unwrap_err();
    assert!(matches!(e, DmError::NoControl { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/mapper/control"), "{e}");
}

#[test]
fn a_node_that_is_not_device_mapper_fails_dm_version() {
    let e = DmControl::open_at(Path::new("/dev/null")).unwrap_err();
    assert!(matches!(e, DmError::VersionFailed { .. }), "{e}");
    assert!(e.to_string().contains("DM_VERSION"), "{e}");
}

/// A fake kernel for DM_LIST_DEVICES whose reply needs `needed` payload bytes.
fn fake_list(
    needed: usize,
    calls: &mut Vec<usize>,
) -> impl FnMut(&mut [u8]) -> Result<(), Errno> + '_ {
    move |buf: &mut [u8]| {
        calls.push(buf.len());
        let flags = get_u32(buf, OFF_FLAGS).unwrap();
        if buf.len() - DM_IOCTL_SIZE < needed {
            put_u32(buf, OFF_FLAGS, flags | FLAG_BUFFER_FULL);
            put_u32(buf, OFF_DATA_SIZE, OFF_DATA as u32);
        } else {
            let record = name_record(0xfd00, "big", true);
            buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + record.len()].copy_from_slice(&record);
            put_u32(buf, OFF_DATA_SIZE, (DM_IOCTL_SIZE + needed) as u32);
        }
        Ok(())
    }
}

#[test]
fn a_full_buffer_is_retried_with_a_larger_one() {
    let mut calls = Vec::new();
    let buf = query_growing(DM_IOCTL_SIZE, "", 0, &[], fake_list(5000, &mut calls)).unwrap();
    assert_eq!(calls, vec![312, 624, 1248, 2496, 4992, 9984]);
    let r = decode_reply("DM_LIST_DEVICES", &buf).unwrap();
    assert_eq!(parse_name_list(r.payload).unwrap()[0].0, "big");
}

#[test]
fn a_reply_that_never_fits_stops_at_the_limit() {
    let mut calls = Vec::new();
    let e = query_growing(
        MAX_BUFFER / 4,
        "",
        0,
        &[],
        fake_list(usize::MAX / 2, &mut calls),
    );
    assert_eq!(e.unwrap_err(), Errno::E2BIG);
    assert_eq!(calls, vec![MAX_BUFFER / 4, MAX_BUFFER / 2, MAX_BUFFER]);
}

proptest! {
    #[test]
    fn parsers_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                      count in 0u32..8) {
        let _ = parse_name_list(&bytes);
        let _ = parse_versions(&bytes);
        let _ = parse_targets(&bytes, count);
        if let Ok(r) = decode_reply("x", &bytes) {
            let _ = r.info();
            let _ = parse_targets(r.payload, r.target_count.min(64));
        }
    }

    #[test]
    fn headers_with_random_sizes_never_panic(data_size in any::<u32>(), data_start in any::<u32>(),
                                             count in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = reply(FLAG_ACTIVE_PRESENT, 0, &tail);
        put_u32(&mut buf, OFF_DATA_SIZE, data_size);
        put_u32(&mut buf, OFF_DATA_START, data_start);
        put_u32(&mut buf, OFF_TARGET_COUNT, count);
        if let Ok(r) = decode_reply("x", &buf) {
            let _ = parse_targets(r.payload, r.target_count.min(1024));
            let _ = parse_name_list(r.payload);
        }
    }
}
