//! `dmtool serve`: the NBD server against the real clients (nbdinfo, nbdcopy from libnbd-bin;
//! qemu-img, qemu-io from qemu-utils) and a minimal raw-protocol client for what the real
//! clients refuse to send (writes to a read-only export, out-of-range requests).
//!
//! Tests whose tools are missing say so on stderr and pass.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const DMTOOL: &str = env!("CARGO_BIN_EXE_dmtool");

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dmtool(args: &[&str]) -> Output {
    run(Command::new(DMTOOL).args(args))
}

/// A pool in a temp dir with thin 1 (64 MiB, named "base") and thin 2 (32 MiB).
fn make_pool() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool").display().to_string();
    dmtool(&[
        "pool",
        "create",
        "--pool",
        &pool,
        "--data-size",
        "256M",
        "--metadata-size",
        "16M",
    ]);
    dmtool(&[
        "thin", "create", "--pool", &pool, "1", "--size", "64M", "--name", "base",
    ]);
    dmtool(&["thin", "create", "--pool", &pool, "2", "--size", "32M"]);
    (dir, pool)
}

/// The server process; killed on drop (a failed test leaves nothing running).
struct Server {
    child: Option<Child>,
    socket: PathBuf,
}

impl Server {
    fn start(pool: &str, socket: &Path, extra: &[&str]) -> Server {
        let listen = format!("unix:{}", socket.display());
        let child = Command::new(DMTOOL)
            .args(["serve", "--pool", pool, "--nbd", &listen])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn dmtool serve");
        let mut server = Server {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dmtool serve exited early: {status}");
            }
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM, then the exit status must be success and the socket gone.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "server exited with {status}");
        assert!(!self.socket.exists(), "socket left behind");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn used_data_blocks(pool: &str) -> u64 {
    let out = dmtool(&["pool", "status", "--pool", pool, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"]["used_data_blocks"].as_u64().unwrap()
}

fn sha(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

#[test]
fn list_shows_exports_by_id_and_name_with_sizes() {
    if !have("nbdinfo") {
        return;
    }
    let (dir, pool) = make_pool();
    let server = Server::start(&pool, &dir.path().join("s.sock"), &[]);
    let out = run(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "export=\"1\"",
        "export=\"base\"",
        "export=\"2\"",
        "67108864",
        "33554432",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    let out = run(Command::new("nbdinfo").args(["--size", &server.uri("2")]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "33554432");
    let out = run(Command::new("nbdinfo").arg(server.uri("base")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("can_trim: true") && text.contains("can_multi_conn: true"));
    server.stop();
}

#[test]
fn qemu_img_in_nbdcopy_out_round_trips() {
    if !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let (dir, pool) = make_pool();
    let server = Server::start(&pool, &dir.path().join("s.sock"), &[]);
    // 5 MiB and a bit of deterministic noise, then the rest of the 64 MiB thin as zeros.
    let mut image = vec![0u8; 64 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in image[..(5 << 20) + 4096].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let input = dir.path().join("in.img");
    std::fs::write(&input, &image).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(server.uri("1")));
    let output = dir.path().join("out.img");
    run(Command::new("nbdcopy").arg(server.uri("base")).arg(&output));
    assert_eq!(sha(&std::fs::read(&output).unwrap()), sha(&image));
    server.stop();
    // What was written survived the shutdown commit.
    let out = dmtool(&["thin", "read", "--pool", &pool, "1", "--length", "6M"]);
    assert_eq!(sha(&out.stdout), sha(&image[..6 << 20]));
}

#[test]
fn qemu_io_writes_reads_and_trim_frees_pool_blocks() {
    if !have("qemu-io") {
        return;
    }
    let (dir, pool) = make_pool();
    let socket = dir.path().join("s.sock");
    let server = Server::start(&pool, &socket, &[]);
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 64k 2M",
            "-c",
            "flush",
        ])
        .arg(server.uri("1")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "{text}");
    server.stop();
    let before = used_data_blocks(&pool);
    assert!(
        before >= 33,
        "{before} blocks used after writing 2 MiB + 64 KiB"
    );

    let server = Server::start(&pool, &socket, &[]);
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "discard 0 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0xcd 1M 1M",
        ])
        .arg(server.uri("base")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "{text}");
    // Flushed: the pool's used count drops while the server still runs (checked after stop,
    // since the server owns the pool; kill without a final commit to prove the flush did it).
    drop(server);
    let after = used_data_blocks(&pool);
    assert!(
        after + 16 <= before,
        "used blocks {before} -> {after} after a 1 MiB trim"
    );
}

/// A bare newstyle client: handshake with NBD_OPT_GO, then raw requests.
struct RawClient(UnixStream);

impl RawClient {
    fn go(socket: &Path, export: &str) -> (RawClient, u64, u16) {
        let mut s = UnixStream::connect(socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut hdr = [0u8; 20];
            s.read_exact(&mut hdr).unwrap();
            let kind = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            match kind {
                1 => break,
                3 if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                3 => {}
                other => panic!("unexpected reply {other:#x}"),
            }
        }
        (RawClient(s), size, flags)
    }

    /// Sends a request and returns the reply's error (and data for a successful read).
    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.send(42, kind, offset, len, payload);
        let (cookie, error, data) = self.receive(|_| if kind == 0 { len } else { 0 });
        assert_eq!(cookie, 42);
        (error, data)
    }

    fn send(&mut self, cookie: u64, kind: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.0.write_all(&req).unwrap();
    }

    /// One reply: (cookie, error, data). `read_len` gives the data length a successful
    /// reply to that cookie carries (a read's length, else 0).
    fn receive(&mut self, read_len: impl Fn(u64) -> u32) -> (u64, u32, Vec<u8>) {
        let mut hdr = [0u8; 16];
        self.0.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[..4], 0x6744_6698u32.to_be_bytes());
        let error = u32::from_be_bytes(hdr[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
        let mut data = Vec::new();
        if error == 0 {
            data = vec![0u8; read_len(cookie) as usize];
            self.0.read_exact(&mut data).unwrap();
        }
        (cookie, error, data)
    }
}

#[test]
fn read_only_export_refuses_writes_and_bad_requests_get_errors() {
    let (dir, pool) = make_pool();
    let socket = dir.path().join("s.sock");
    let server = Server::start(&pool, &socket, &["--read-only", "2"]);
    let (mut c, size, flags) = RawClient::go(&socket, "2");
    assert_eq!(size, 32 << 20);
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    let (error, _) = c.request(1, 0, 4096, &[7u8; 4096]);
    assert_eq!(error, 1, "write on a read-only export: EPERM");
    assert_eq!(c.request(4, 0, 1 << 20, &[]).0, 1, "trim: EPERM");
    let (error, data) = c.request(0, 4096, 4096, &[]);
    assert_eq!((error, data), (0, vec![0u8; 4096]));
    assert_eq!(
        c.request(0, (32 << 20) - 512, 1024, &[]).0,
        22,
        "read past the end"
    );
    assert_eq!(
        c.request(0, 0, 64 << 20, &[]).0,
        22,
        "read over the size limit"
    );
    assert_eq!(c.request(3, 0, 0, &[]).0, 0, "flush");
    // Only thin 2 is exported.
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    drop(s);
    if have("nbdinfo") {
        let out = Command::new("nbdinfo")
            .arg(server.uri("1"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "thin 1 is not exported");
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(server.uri("2"))
            .output();
        if let Ok(out) = out {
            assert!(!out.status.success(), "qemu-io wrote to a read-only export");
        }
    }
    server.stop();
}

#[test]
fn writes_on_one_connection_are_seen_by_another() {
    let (dir, pool) = make_pool();
    let socket = dir.path().join("s.sock");
    let server = Server::start(&pool, &socket, &[]);
    let (mut a, _, _) = RawClient::go(&socket, "base");
    let (mut b, _, _) = RawClient::go(&socket, "1");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(a.request(1, 12345, data.len() as u32, &data).0, 0);
    assert_eq!(a.request(3, 0, 0, &[]).0, 0);
    let (error, got) = b.request(0, 12345, data.len() as u32, &[]);
    assert_eq!(error, 0);
    assert!(got == data, "second connection reads what the first wrote");
    assert_eq!(b.request(6, 12345 + 1000, 5000, &[]).0, 0, "write zeroes");
    let (_, got) = a.request(0, 12345 + 1000, 5000, &[]);
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(
        a.request(1, 64 << 20, 512, &[0u8; 512]).0,
        22,
        "write past the end"
    );
    // The stream stays in step after a refused write.
    assert_eq!(a.request(0, 0, 512, &[]).0, 0);
    server.stop();
}

#[test]
fn fio_nbd_engine_writes_and_verifies_through_the_export() {
    if !have("fio")
        || !Command::new("fio")
            .arg("--enghelp=nbd")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: fio without its nbd engine");
        return;
    }
    let (dir, pool) = make_pool();
    let socket = dir.path().join("s.sock");
    let server = Server::start(&pool, &socket, &[]);
    // Random 4 KiB writes at queue depth 8 with a checksum in every block, then fio reads
    // everything back and verifies it: data through the real NBD client both ways.
    let out = run(Command::new("fio")
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .arg(format!("--uri={}", server.uri("base"))));
    // The nbd engine prints "fio: connected to NBD server" before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').expect("fio printed JSON")..];
    let report: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let job = &report["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "{job}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(16 << 20),
        "fio wrote the whole range"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(16 << 20),
        "fio read everything back to verify it"
    );
    server.stop();
    // 16 MiB of 64 KiB blocks, written at random: every block of the range is mapped.
    assert!(used_data_blocks(&pool) >= 256);
}

/// Many requests in flight on one connection: every one is answered once, under its own
/// cookie (replies may come in any order), and reads return what the writes before their
/// flush put there.
#[test]
fn pipelined_requests_are_all_answered_under_their_cookies() {
    let (dir, pool) = make_pool();
    let socket = dir.path().join("s.sock");
    let server = Server::start(&pool, &socket, &[]);
    let (mut c, _, _) = RawClient::go(&socket, "base");
    const N: u64 = 64;
    let block = |i: u64| vec![(i * 7 + 1) as u8; 4096];
    // Round 1: N writes in flight, each into its own 64 KiB block.
    for i in 0..N {
        c.send(i, 1, i * 65536, 4096, &block(i));
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..N {
        let (cookie, error, _) = c.receive(|_| 0);
        assert_eq!(error, 0, "write {cookie}");
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(seen.len() as u64, N);
    assert_eq!(c.request(3, 0, 0, &[]).0, 0, "flush");
    // Round 2: N reads in flight, one per block, plus a read of an unwritten block.
    for i in 0..N {
        c.send(1000 + i, 0, i * 65536, 4096, &[]);
    }
    c.send(5000, 0, N * 65536, 4096, &[]);
    let mut answered = std::collections::BTreeMap::new();
    for _ in 0..=N {
        let (cookie, error, data) = c.receive(|_| 4096);
        assert_eq!(error, 0, "read {cookie}");
        assert!(answered.insert(cookie, data).is_none(), "{cookie} twice");
    }
    for i in 0..N {
        assert!(answered[&(1000 + i)] == block(i), "block {i} reads back");
    }
    assert!(answered[&5000].iter().all(|&b| b == 0));
    // The stream is still in step after all that.
    assert_eq!(c.request(0, 0, 4096, &[]).1, block(0));
    server.stop();
}
