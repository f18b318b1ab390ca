//! Hostile layers: a corpus generated here (no binary blobs), each tar applied as root onto
//! a tmpfs mount beside a canary tree, which is hashed (names, types, modes, owners, sizes,
//! times, contents, link targets, attributes) before and after every apply; and a race
//! where a second thread swaps a directory of the path for a symlink pointing out while
//! layers are applied. Nothing may change outside the layer's root.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::*;

/// A raw tar writer: names, links and types exactly as given, `..` and all.
#[derive(Default)]
struct Tar(Vec<u8>);

#[derive(Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    major: u32,
    minor: u32,
}

const META: Meta = Meta {
    mode: 0o644,
    uid: 0,
    major: 0,
    minor: 0,
};

impl Tar {
    fn header(&mut self, name: &[u8], kind: EntryType, size: u64, link: &[u8], m: Meta) {
        let mut h = tar::Header::new_ustar();
        let n = name.len().min(100);
        h.as_ustar_mut().unwrap().name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        h.as_ustar_mut().unwrap().linkname[..l].copy_from_slice(&link[..l]);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(m.mode);
        h.set_uid(m.uid);
        h.set_gid(m.uid);
        h.set_mtime(1_000_000);
        h.set_device_major(m.major).unwrap();
        h.set_device_minor(m.minor).unwrap();
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
    }

    fn data(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while format!("{len}").len() + rest != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.header(
            b"././@PaxHeader",
            EntryType::XHeader,
            body.len() as u64,
            b"",
            META,
        );
        self.data(&body);
    }

    fn file(&mut self, name: &str, data: &[u8]) {
        self.header(
            name.as_bytes(),
            EntryType::Regular,
            data.len() as u64,
            b"",
            META,
        );
        self.data(data);
    }

    fn file_meta(&mut self, name: &str, data: &[u8], m: Meta) {
        self.header(
            name.as_bytes(),
            EntryType::Regular,
            data.len() as u64,
            b"",
            m,
        );
        self.data(data);
    }

    fn dir(&mut self, name: &str) {
        self.header(
            name.as_bytes(),
            EntryType::Directory,
            0,
            b"",
            Meta {
                mode: 0o755,
                ..META
            },
        );
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.header(
            name.as_bytes(),
            EntryType::Symlink,
            0,
            target.as_bytes(),
            META,
        );
    }

    fn hardlink(&mut self, name: &str, target: &str) {
        self.header(name.as_bytes(), EntryType::Link, 0, target.as_bytes(), META);
    }

    fn node(&mut self, name: &str, kind: EntryType, major: u32, minor: u32) {
        let m = Meta {
            mode: 0o666,
            major,
            minor,
            ..META
        };
        self.header(name.as_bytes(), kind, 0, b"", m);
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        self.0
    }
}

/// A digest of everything under `dir` but `skip`: one line per path.
fn hash_tree(dir: &Path, skip: &Path) -> String {
    fn walk(dir: &Path, skip: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for p in names {
            if p == skip {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let mut line = format!(
                "{} {:o} {}:{} {} {}.{} {}.{} {}",
                p.display(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.nlink()
            );
            if m.file_type().is_symlink() {
                line += &format!(" -> {}", fs::read_link(&p).unwrap().display());
            } else if m.is_file() {
                line += &format!(" {:x}", Sha256::digest(fs::read(&p).unwrap()));
            }
            let mut names = vec![0u8; 4096];
            if let Ok(n) = rustix::fs::llistxattr(&p, &mut names[..]) {
                line += &format!(" xattrs {:?}", String::from_utf8_lossy(&names[..n]));
            }
            out.push(line);
            if m.is_dir() {
                walk(&p, skip, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, skip, &mut out);
    format!("{:x}", Sha256::digest(out.join("\n")))
}

/// A tmpfs mounted at `base/root` beside a canary tree `base/canary`; unmounted on drop,
/// also when the test fails.
struct Bed {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    canary: PathBuf,
}

impl Bed {
    fn new() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let (root, canary) = (base.join("root"), base.join("canary"));
        fs::create_dir(&root).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m", "thinbox-test"])
            .arg(&root)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (root_ tests need root)");
        fs::create_dir_all(canary.join("sub/deeper")).unwrap();
        fs::write(canary.join("file"), "canary file").unwrap();
        fs::write(canary.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(canary.join("sub/deeper/x"), "deep").unwrap();
        std::os::unix::fs::symlink("file", canary.join("link")).unwrap();
        Bed {
            _dir: dir,
            base,
            root,
            canary,
        }
    }

    fn hash(&self) -> String {
        hash_tree(&self.base, &self.root)
    }

    fn clear_root(&self) {
        for e in fs::read_dir(&self.root).unwrap().flatten() {
            let p = e.path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                fs::remove_dir_all(&p).unwrap();
            } else {
                fs::remove_file(&p).unwrap();
            }
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.root)
            .status();
    }
}

/// Every hostile layer, by class. `c` is the canary's absolute host path.
fn corpus(c: &str) -> Vec<(&'static str, String, Vec<u8>)> {
    let rel = c.trim_start_matches('/');
    // Ways to point out of the root at the canary (or at the host's root).
    let targets: Vec<String> = vec![
        c.to_string(),
        format!("{c}/"),
        "../canary".into(),
        "../../canary".into(),
        format!("{}{rel}", "../".repeat(12)),
        format!("/proc/self/root{c}"),
        format!("/proc/self/cwd/../../../../../../..{c}"),
        "/".into(),
        "..".into(),
        "../..".into(),
    ];
    let mut out = Vec::new();
    let mut add = |class: &'static str, name: String, build: &dyn Fn(&mut Tar)| {
        let mut t = Tar::default();
        build(&mut t);
        out.push((class, name, t.finish()));
    };

    for (i, p) in [
        "../canary/pwned".to_string(),
        "a/../../canary/pwned".into(),
        "./../canary/pwned".into(),
        "a/b/../../../canary/pwned".into(),
        format!("{}{rel}/pwned", "../".repeat(12)),
        "../canary/file".into(),
        "..".into(),
    ]
    .iter()
    .enumerate()
    {
        add("dotdot", format!("file {i}"), &|t| t.file(p, b"pwned"));
        add("dotdot", format!("dir {i}"), &|t| t.dir(&format!("{p}/")));
        add("dotdot", format!("symlink {i}"), &|t| t.symlink(p, "/"));
        add("dotdot", format!("hardlink {i}"), &|t| {
            t.file("inside", b"x");
            t.hardlink(p, "inside");
        });
        add("dotdot", format!("fifo {i}"), &|t| {
            t.node(p, EntryType::Fifo, 0, 0)
        });
    }

    for (i, p) in [
        format!("{c}/pwned"),
        format!("{c}/file"),
        format!("/{rel}/sub/deeper/x"),
    ]
    .iter()
    .enumerate()
    {
        add("absolute", format!("file {i}"), &|t| t.file(p, b"pwned"));
        add("absolute", format!("dir {i}"), &|t| t.dir(&format!("{p}/")));
        add("absolute", format!("hardlink source {i}"), &|t| {
            t.hardlink("h", p)
        });
    }

    for (i, target) in targets.iter().enumerate() {
        add("symlink-write-through", format!("file {i}"), &|t| {
            t.symlink("l", target);
            t.file("l/pwned", b"pwned");
            t.file("l/file", b"pwned");
            t.file(&format!("l/{rel}/pwned"), b"pwned");
            t.file(&format!("l/{rel}/file"), b"pwned");
        });
        add("symlink-write-through", format!("dir {i}"), &|t| {
            t.symlink("l", target);
            t.dir("l/newdir/");
            t.dir(&format!("l/{rel}/newdir/"));
            t.file("l/sub/deeper/x", b"pwned");
        });
        add("symlink-write-through", format!("nested {i}"), &|t| {
            t.dir("d/");
            t.symlink("d/l", target);
            t.file("d/l/pwned", b"pwned");
            t.file(&format!("d/l/{rel}/file"), b"pwned");
        });
        add("symlink-write-through", format!("chain {i}"), &|t| {
            t.symlink("a", "b");
            t.symlink("b", target);
            t.file("a/pwned", b"pwned");
            t.file(&format!("a/{rel}/passwd"), b"pwned");
        });
        add(
            "symlink-write-through",
            format!("replace the link itself {i}"),
            &|t| {
                t.symlink("l", &format!("{target}/file"));
                t.file("l", b"replaces the link, not its target");
                t.symlink("m", &format!("{c}/file"));
                t.dir("m/");
            },
        );
        add("symlink-swap", format!("dir then link {i}"), &|t| {
            t.dir("d/");
            t.file("d/x", b"x");
            t.symlink("d", target);
            t.file("d/pwned", b"pwned");
            t.file(&format!("d/{rel}/file"), b"pwned");
        });
        add("symlink-swap", format!("link then dir {i}"), &|t| {
            t.symlink("d", target);
            t.dir("d/");
            t.file("d/x", b"x");
            t.symlink("d", target);
            t.dir(&format!("d/{rel}/sub/"));
        });
        add("hardlink", format!("to a symlink {i}"), &|t| {
            t.symlink("s", &format!("{target}/file"));
            t.hardlink("h", "s");
            t.file("h/pwned", b"pwned");
            t.symlink("s2", target);
            t.hardlink("h2", "s2");
            t.file(&format!("h2/{rel}/file"), b"pwned");
        });
        add(
            "hardlink",
            format!("through a symlinked parent {i}"),
            &|t| {
                t.symlink("p", target);
                t.hardlink("h", "p/file");
                t.hardlink("h2", &format!("p/{rel}/file"));
                t.file("h", b"pwned");
            },
        );
        add("whiteout-through-symlink", format!("whiteout {i}"), &|t| {
            t.symlink("p", target);
            t.file("p/.wh.file", b"");
            t.file(&format!("p/{rel}/.wh.file"), b"");
            t.file(&format!("p/{rel}/.wh.sub"), b"");
        });
        add("whiteout-through-symlink", format!("opaque {i}"), &|t| {
            t.symlink("p", target);
            t.file("p/.wh..wh..opq", b"");
            t.file(&format!("p/{rel}/.wh..wh..opq"), b"");
        });
        add("devices-setuid", format!("through a link {i}"), &|t| {
            t.symlink("l", target);
            t.node("l/null", EntryType::Char, 1, 3);
            t.node(&format!("l/{rel}/sda"), EntryType::Block, 8, 0);
            t.node("l/fifo", EntryType::Fifo, 0, 0);
            t.file_meta(
                "l/suid",
                b"#!",
                Meta {
                    mode: 0o4755,
                    ..META
                },
            );
            t.file_meta(
                &format!("l/{rel}/file"),
                b"#!",
                Meta {
                    mode: 0o6777,
                    ..META
                },
            );
        });
        add("xattrs", format!("capability through a link {i}"), &|t| {
            t.symlink("l", target);
            t.pax(&[(
                "SCHILY.xattr.security.capability",
                &[
                    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            )]);
            t.file(&format!("l/{rel}/file"), b"cap");
            t.pax(&[("SCHILY.xattr.user.evil", b"1")]);
            t.dir(&format!("l/{rel}/sub/"));
            t.pax(&[("SCHILY.xattr.trusted.overlay.redirect", c.as_bytes())]);
            t.dir("o/");
        });
        add("pax-path", format!("pax path out {i}"), &|t| {
            t.pax(&[("path", b"../canary/pwned")]);
            t.file("harmless", b"pwned");
            t.symlink("l", target);
            t.pax(&[("path", format!("l/{rel}/file").as_bytes())]);
            t.file("harmless2", b"pwned");
            t.pax(&[("linkpath", format!("{c}/file").as_bytes())]);
            t.hardlink("h", "harmless");
            t.pax(&[
                ("path", format!("{}/x", "a/".repeat(60)).as_bytes()),
                ("linkpath", b"../../../../canary"),
            ]);
            t.symlink("y", "z");
        });
        add("duplicates", format!("file, link, file {i}"), &|t| {
            t.file("x", b"first");
            t.symlink("x", target);
            t.file("x/pwned", b"pwned");
            t.file(&format!("x/{rel}/file"), b"pwned");
            t.dir("y/");
            t.symlink("y", target);
            t.dir("y/");
            t.file("y/pwned", b"inside");
        });
    }

    for (i, name) in [
        ".wh.",
        "d/.wh.",
        ".wh..",
        ".wh...",
        "d/.wh..",
        "../canary/.wh.file",
        "../.wh.canary",
    ]
    .iter()
    .enumerate()
    {
        add("bare-whiteout", format!("{i}"), &|t| {
            t.dir("d/");
            t.file(name, b"");
        });
    }
    add("bare-whiteout", "opaque at the root".into(), &|t| {
        t.file(".wh..wh..opq", b"")
    });
    add("bare-whiteout", "aufs metadata".into(), &|t| {
        t.dir(".wh..wh.plnk/");
        t.file(".wh..wh.plnk/1.2", b"x");
    });
    out
}

#[test]
fn root_hostile_layers_change_nothing_outside_the_root() {
    let bed = Bed::new();
    let c = bed.canary.to_str().unwrap().to_string();
    let before = bed.hash();
    let corpus = corpus(&c);
    let classes: BTreeSet<&str> = corpus.iter().map(|(class, _, _)| *class).collect();
    let mut runs = 0;
    let mut refused = 0;
    for (class, name, bytes) in &corpus {
        for whiteouts in [Whiteouts::Apply, Whiteouts::Overlay] {
            for resolve in [Resolve::InRoot, Resolve::NoFollow] {
                bed.clear_root();
                // A canary-named directory inside the root too: links that the kernel
                // clamps to the root land there.
                fs::create_dir(bed.root.join("canary")).unwrap();
                fs::write(bed.root.join("canary/file"), "inside").unwrap();
                let result = apply(
                    &bed.root,
                    bytes.as_slice(),
                    whiteouts,
                    &Limits::default(),
                    Some(resolve),
                );
                runs += 1;
                refused += usize::from(result.is_err());
                assert_eq!(
                    bed.hash(),
                    before,
                    "{class} / {name} ({whiteouts:?}, {resolve:?}) changed something outside the root: {result:?}"
                );
            }
        }
    }
    eprintln!(
        "hostile corpus: {} variants in {} classes ({}), {runs} applies ({refused} refused), \
         0 changes outside the root",
        corpus.len(),
        classes.len(),
        classes.iter().copied().collect::<Vec<_>>().join(", ")
    );
    assert!(classes.len() >= 11, "{classes:?}");
}

#[test]
fn root_flipping_a_directory_to_an_outward_symlink_never_leaks_a_write() {
    let bed = Bed::new();
    let c = bed.canary.to_str().unwrap().to_string();
    let before = bed.hash();
    let iterations: usize = std::env::var("THINBOX_RACE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut layer = Tar::default();
    for i in 0..4 {
        layer.file(&format!("d/f{i}"), b"content");
    }
    layer.dir("d/sub/");
    layer.file("d/sub/g", b"g");
    layer.file_meta(
        "d/suid",
        b"x",
        Meta {
            mode: 0o4755,
            ..META
        },
    );
    layer.hardlink("d/h", "d/f0");
    layer.node("d/null", EntryType::Char, 1, 3);
    layer.file("d/.wh.f1", b"");
    layer.symlink("d/s", "/");
    layer.pax(&[("SCHILY.xattr.user.x", b"1")]);
    layer.file("d/sub/passwd", b"pwned");
    let layer = layer.finish();
    for (round, link) in [c.clone(), "../canary".to_string()].iter().enumerate() {
        for resolve in [Resolve::InRoot, Resolve::NoFollow] {
            bed.clear_root();
            fs::create_dir(bed.root.join("canary")).unwrap();
            fs::create_dir(bed.root.join("d")).unwrap();
            std::os::unix::fs::symlink(link, bed.root.join("alt")).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let flips = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let flipper = {
                let (stop, flips, root) = (stop.clone(), flips.clone(), bed.root.clone());
                std::thread::spawn(move || {
                    let dir = fs::File::open(&root).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        // d and alt trade places atomically: d is a directory, then a link out.
                        if rustix::fs::renameat_with(
                            &dir,
                            "d",
                            &dir,
                            "alt",
                            rustix::fs::RenameFlags::EXCHANGE,
                        )
                        .is_ok()
                        {
                            flips.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            };
            let mut ok = 0;
            for _ in 0..iterations {
                if apply(
                    &bed.root,
                    layer.as_slice(),
                    Whiteouts::Apply,
                    &Limits::default(),
                    Some(resolve),
                )
                .is_ok()
                {
                    ok += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            flipper.join().unwrap();
            assert_eq!(
                bed.hash(),
                before,
                "the race wrote outside the root (round {round}, {resolve:?})"
            );
            eprintln!(
                "race ({resolve:?}, link {link}): {iterations} applies ({ok} complete), {} flips, \
                 0 writes outside the root",
                flips.load(Ordering::Relaxed)
            );
        }
    }
}

fn limited(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

/// A GNU sparse entry: `realsize` bytes of which only the last 512 are stored.
fn sparse(t: &mut Tar, name: &str, realsize: u64) {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(512);
    h.set_mode(0o644);
    h.set_mtime(1);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.sparse[0].set_offset(realsize - 512);
    gnu.sparse[0].set_length(512);
    gnu.set_real_size(realsize);
    h.set_cksum();
    t.0.extend_from_slice(h.as_bytes());
    t.data(&[b'S'; 512]);
}

fn used_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

#[test]
fn root_bombs_stop_at_their_limits_and_leave_nothing_outside() {
    let bed = Bed::new();
    let before = bed.hash();
    let err = |bytes: &[u8], limits: &Limits| -> String {
        bed.clear_root();
        let e = apply(&bed.root, bytes, Whiteouts::Apply, limits, None).unwrap_err();
        format!("{e:#}")
    };

    // A tar bomb: more content than the layer may hold.
    let mut t = Tar::default();
    t.file("big", &vec![b'A'; 4 << 20]);
    let e = err(&t.finish(), &limited(|l| l.max_bytes = 1 << 20));
    assert!(e.contains("THINBOX_MAX_LAYER_BYTES"), "{e}");

    // A sparse bomb: a 1 TiB file with 512 bytes stored is refused at the byte limit ...
    let mut t = Tar::default();
    sparse(&mut t, "sparse", 1 << 40);
    let e = err(&t.finish(), &limited(|l| l.max_bytes = 64 << 20));
    assert!(e.contains("THINBOX_MAX_LAYER_BYTES"), "{e}");
    // ... and one under the limit is written with holes: it takes no room.
    bed.clear_root();
    let used = used_bytes(&bed.root);
    let mut t = Tar::default();
    sparse(&mut t, "sparse", 256 << 20);
    apply(
        &bed.root,
        t.finish().as_slice(),
        Whiteouts::Apply,
        &Limits::default(),
        None,
    )
    .unwrap();
    let m = fs::metadata(bed.root.join("sparse")).unwrap();
    assert_eq!(m.len(), 256 << 20);
    assert!(
        m.blocks() * 512 <= 64 << 10,
        "{} bytes allocated",
        m.blocks() * 512
    );
    assert!(used_bytes(&bed.root) - used <= 1 << 20);

    // Too many entries; a path too long (through PAX); a PAX or GNU long-name record too
    // large to buffer (refused at its header, before its data is read).
    let mut t = Tar::default();
    for i in 0..50 {
        t.file(&format!("f{i}"), b"");
    }
    let e = err(&t.finish(), &limited(|l| l.max_entries = 10));
    assert!(e.contains("THINBOX_MAX_LAYER_ENTRIES"), "{e}");
    let mut t = Tar::default();
    t.pax(&[("path", "a/".repeat(3000).as_bytes())]);
    t.file("x", b"");
    let e = err(&t.finish(), &Limits::default());
    assert!(e.contains("THINBOX_MAX_PATH_BYTES"), "{e}");
    for kind in [EntryType::XHeader, EntryType::GNULongName] {
        let mut t = Tar::default();
        t.header(b"././@LongLink", kind, 1 << 40, b"", META);
        t.data(&[b'a'; 4096]);
        let e = err(&t.finish(), &Limits::default());
        assert!(e.contains("THINBOX_MAX_TAR_RECORD_BYTES"), "{e}");
    }

    // A decompression bomb: 64 MiB of zeros from a few kilobytes of gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut t = Tar::default();
    t.header(b"zeros", EntryType::Regular, 64 << 20, b"", META);
    t.data(&[]);
    let mut bytes = t.0;
    bytes.resize(bytes.len() + (64 << 20) + 1024, 0);
    gz.write_all(&bytes).unwrap();
    let gz = gz.finish().unwrap();
    let limits = limited(|l| l.ratio_floor = 1 << 20);
    let (counted, compressed) = Counted::new(gz.as_slice());
    let decoded = RatioGuard::new(flate2::read::GzDecoder::new(counted), compressed, &limits);
    bed.clear_root();
    let e = apply(&bed.root, decoded, Whiteouts::Apply, &limits, None).unwrap_err();
    assert!(
        format!("{e:#}").contains("THINBOX_MAX_LAYER_RATIO"),
        "{e:#}"
    );

    assert_eq!(bed.hash(), before);
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    rustix::fs::lgetxattr(path, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

#[test]
fn root_duplicates_pax_records_and_special_files_resolve_as_docker_does() {
    let bed = Bed::new();
    let r = &bed.root;
    let cap = [
        1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut t = Tar::default();
    // The last entry wins; a directory over a directory merges.
    t.file("x", b"first");
    t.file("x", b"second");
    t.dir("d/");
    t.file("d/a", b"a");
    t.header(
        b"d/",
        EntryType::Directory,
        0,
        b"",
        Meta {
            mode: 0o700,
            ..META
        },
    );
    t.file("y", b"file");
    t.dir("y/");
    t.dir("z/");
    t.file("z/a", b"a");
    t.file("z", b"now a file");
    // PAX path and ids override the ustar header.
    t.pax(&[("path", b"pax-name"), ("uid", b"1234"), ("gid", b"4321")]);
    t.file("ustar-name", b"p");
    // A hard link to an earlier entry keeps that entry's inode when the path is replaced.
    t.file("orig", b"old");
    t.hardlink("hard", "orig");
    t.file("orig", b"new");
    t.symlink("s", "/etc/passwd");
    t.hardlink("hs", "s");
    // Set-id bits, devices, owners and capabilities as the image says.
    t.file_meta(
        "suid",
        b"#!",
        Meta {
            mode: 0o4755,
            uid: 1000,
            ..META
        },
    );
    t.node("null", EntryType::Char, 1, 3);
    t.pax(&[
        ("SCHILY.xattr.security.capability", &cap[..]),
        ("SCHILY.xattr.user.note", b"kept"),
        ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
    ]);
    t.file_meta(
        "ping",
        b"elf",
        Meta {
            mode: 0o755,
            uid: 1000,
            ..META
        },
    );
    apply(
        r,
        t.finish().as_slice(),
        Whiteouts::Apply,
        &Limits::default(),
        None,
    )
    .unwrap();

    assert_eq!(fs::read(r.join("x")).unwrap(), b"second");
    assert_eq!(fs::read(r.join("d/a")).unwrap(), b"a");
    assert_eq!(fs::metadata(r.join("d")).unwrap().mode() & 0o7777, 0o700);
    assert!(fs::metadata(r.join("y")).unwrap().is_dir());
    assert_eq!(fs::read(r.join("z")).unwrap(), b"now a file");
    let p = fs::metadata(r.join("pax-name")).unwrap();
    assert_eq!((p.uid(), p.gid()), (1234, 4321));
    assert!(!r.join("ustar-name").exists());
    assert_eq!(fs::read(r.join("hard")).unwrap(), b"old");
    assert_eq!(fs::read(r.join("orig")).unwrap(), b"new");
    let (s, hs) = (
        fs::symlink_metadata(r.join("s")).unwrap(),
        fs::symlink_metadata(r.join("hs")).unwrap(),
    );
    assert!(hs.file_type().is_symlink());
    assert_eq!(s.ino(), hs.ino());
    let suid = fs::metadata(r.join("suid")).unwrap();
    assert_eq!((suid.mode() & 0o7777, suid.uid()), (0o4755, 1000));
    let null = fs::symlink_metadata(r.join("null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &null.file_type()
    ));
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    let ping = r.join("ping");
    assert_eq!(
        xattr(&ping, "security.capability").as_deref(),
        Some(&cap[..])
    );
    assert_eq!(xattr(&ping, "user.note").as_deref(), Some(&b"kept"[..]));
    assert_eq!(xattr(&ping, "trusted.overlay.redirect"), None);
    assert_eq!(fs::metadata(&ping).unwrap().uid(), 1000);
}
