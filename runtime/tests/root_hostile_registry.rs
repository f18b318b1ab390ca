//! Hostile registries, as root with the overlay driver: the real `docker-registry` asked for
//! malformed digests, and a small lying HTTP server on 127.0.0.1 (a std `TcpListener`) that
//! serves wrong digests, truncated and oversized bodies, malformed descriptors and redirects
//! to another host. Every bad case is refused and nothing of it is kept in the content store.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::{file, image_config, layer_tar, sha256_hex, Env, LoneRoot};
use fixtures::registry::RegistryAuth;

/// What the lying server answers for one path.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many bytes of the body (Content-Length still says all of it).
    truncate: Option<usize>,
}

fn ok(body: Vec<u8>, content_type: &str) -> Reply {
    Reply {
        status: 200,
        headers: vec![("Content-Type".into(), content_type.into())],
        body,
        truncate: None,
    }
}

/// Requests seen: path and the Authorization header, if any.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Serves `routes` on 127.0.0.1 (one request per connection) until the test ends.
fn serve(routes: HashMap<String, Reply>, seen: Seen, basic: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut auth = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        auth = Some(v.trim().to_string());
                    }
                }
            }
            seen.lock().unwrap().push((path.clone(), auth.clone()));
            let challenge = Reply {
                status: 401,
                headers: vec![("WWW-Authenticate".into(), "Basic realm=\"lie\"".into())],
                body: vec![],
                truncate: None,
            };
            let reply = if basic && auth.is_none() {
                Some(challenge)
            } else {
                routes.get(&path).cloned()
            };
            let reply = reply.unwrap_or(Reply {
                status: 404,
                headers: vec![],
                body: br#"{"errors":[{"code":"NOT_FOUND","message":"no"}]}"#.to_vec(),
                truncate: None,
            });
            let mut head = format!(
                "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                reply.status,
                reply.body.len()
            );
            for (k, v) in &reply.headers {
                head += &format!("{k}: {v}\r\n");
            }
            head += "\r\n";
            let body = &reply.body[..reply.truncate.unwrap_or(reply.body.len())];
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    port
}

/// A one-layer image: (manifest, config, layer) bytes, with the manifest built from
/// `describe(config digest, layer digest, layer size)`.
fn image(describe: impl Fn(&str, &str, usize) -> String) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    b.append_data(&mut h, "hello", &b"hello"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#,
        sha256_hex(&layer)
    )
    .into_bytes();
    let manifest = describe(
        &format!("sha256:{}", sha256_hex(&config)),
        &format!("sha256:{}", sha256_hex(&layer)),
        layer.len(),
    );
    (manifest.into_bytes(), config, layer)
}

fn manifest_json(config: &str, config_size: usize, layer: &str, layer_size: usize) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_size}}}]}}"#
    )
}

/// Makes one lying server's routes.
type Routes = dyn Fn() -> HashMap<String, Reply>;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn root_hostile_registries_are_refused_and_nothing_is_kept() {
    let mut env = Env::new(RegistryAuth::None);
    let o = env.add_overlay_root("hostile");
    let host = env.host();
    let root = &env.roots[o];
    let mut refused = 0;

    // The real registry, asked for malformed or unknown digests.
    let good = "0".repeat(64);
    for name in [
        format!("{host}/test/busybox@sha256:../../../../etc/passwd"),
        format!("{host}/test/busybox@sha256:{}", "AB".repeat(32)),
        format!("{host}/test/busybox@sha512:{}", "ab".repeat(64)),
        format!("{host}/test/busybox@md5:{}", "ab".repeat(16)),
        format!("{host}/test/busybox@sha256:{}", "zz".repeat(32)),
        format!("{host}/test/busybox@sha256:{}", &good[..63]),
        format!("{host}/test/busybox@sha256:{good}"),
    ] {
        let err = root.fails(&["pull", "-q", &name]);
        assert!(root.blobs().is_empty(), "{name}: {err}");
        refused += 1;
    }

    // The lying server.
    let cases: Vec<(&str, Box<Routes>)> = vec![
        (
            "layer with another digest",
            Box::new(|| {
                let (m, c, mut l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
                let (m, c) = fix_config_size(m, c);
                let (cd, ld) = (sha256_hex(&c), sha256_hex(&l));
                l[600] ^= 1;
                lying_routes(m, (cd, c), (ld, l), None)
            }),
        ),
        (
            "truncated layer",
            Box::new(|| {
                let (m, c, l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
                let (m, c) = fix_config_size(m, c);
                let n = l.len() / 2;
                routes(m, c, l, Some(n))
            }),
        ),
        (
            "oversized layer",
            Box::new(|| {
                let (m, c, mut l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
                let (m, c) = fix_config_size(m, c);
                let (cd, ld) = (sha256_hex(&c), sha256_hex(&l));
                l.extend_from_slice(&[0u8; 4096]);
                lying_routes(m, (cd, c), (ld, l), None)
            }),
        ),
        (
            "descriptor smaller than the layer",
            Box::new(|| {
                let (m, c, l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls - 512));
                let (m, c) = fix_config_size(m, c);
                routes(m, c, l, None)
            }),
        ),
        (
            "config with another digest",
            Box::new(|| {
                let (m, c, l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
                let (m, mut c) = fix_config_size(m, c);
                let (cd, ld) = (sha256_hex(&c), sha256_hex(&l));
                c[2] = b' ';
                lying_routes(m, (cd, c), (ld, l), None)
            }),
        ),
        (
            "layer digest that climbs",
            Box::new(|| {
                let (m, c, l) =
                    image(|cd, _, ls| manifest_json(cd, 0, "sha256:../../../../tmp/x", ls));
                let (m, c) = fix_config_size(m, c);
                routes(m, c, l, None)
            }),
        ),
        (
            "layer digest in upper case",
            Box::new(|| {
                let (m, c, l) = image(|cd, ld, ls| {
                    manifest_json(cd, 0, &ld.to_uppercase().replace("SHA256", "sha256"), ls)
                });
                let (m, c) = fix_config_size(m, c);
                routes(m, c, l, None)
            }),
        ),
        (
            "unknown digest algorithm",
            Box::new(|| {
                let (m, c, l) =
                    image(|cd, ld, ls| manifest_json(cd, 0, &ld.replace("sha256", "sha384"), ls));
                let (m, c) = fix_config_size(m, c);
                routes(m, c, l, None)
            }),
        ),
        (
            "oversized manifest",
            Box::new(|| {
                let (_, c, l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
                routes(vec![b' '; 5 << 20], c, l, None)
            }),
        ),
    ];
    for (what, make) in &cases {
        let seen: Seen = Arc::default();
        let port = serve(make(), seen.clone(), false);
        let name = format!("127.0.0.1:{port}/lie/image:tag");
        let err = root.fails(&["pull", "-q", &name]);
        let left = root.blobs();
        assert!(left.is_empty(), "{what}: kept {left:?} ({err})");
        let images = root.ok(&["images", "-q"]);
        assert!(images.trim().is_empty(), "{what}: {images}");
        eprintln!(
            "lying registry, {what}: refused: {}",
            err.lines().last().unwrap_or("")
        );
        refused += 1;
    }

    // Pulling by digest: the manifest the registry sends must be the one asked for.
    let (m, c, l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
    let (m, c) = fix_config_size(m, c);
    let other = sha256_hex(b"another manifest");
    let mut r = routes(m.clone(), c, l, None);
    r.insert(
        format!("/v2/lie/image/manifests/sha256:{other}"),
        ok(m, MANIFEST_TYPE),
    );
    let port = serve(r, Arc::default(), false);
    root.fails(&[
        "pull",
        "-q",
        &format!("127.0.0.1:{port}/lie/image@sha256:{other}"),
    ]);
    assert!(root.blobs().is_empty());
    refused += 1;

    // Credentials go to the registry, never along a redirect to another host.
    let (m, c, l) = image(|cd, ld, ls| manifest_json(cd, 0, ld, ls));
    let (m, c) = fix_config_size(m, c);
    let layer_path = format!("/v2/lie/image/blobs/sha256:{}", sha256_hex(&l));
    let storage_seen: Seen = Arc::default();
    let storage = serve(
        HashMap::from([(
            "/storage".to_string(),
            ok(l.clone(), "application/octet-stream"),
        )]),
        storage_seen.clone(),
        false,
    );
    let mut r = routes(m, c, l, None);
    r.insert(
        layer_path,
        Reply {
            status: 307,
            headers: vec![(
                "Location".into(),
                format!("http://localhost:{storage}/storage"),
            )],
            body: vec![],
            truncate: None,
        },
    );
    let registry_seen: Seen = Arc::default();
    let port = serve(r, registry_seen.clone(), true);
    let reg = format!("127.0.0.1:{port}");
    let out = root.output(
        root.command(&["login", "-u", "alice", "--password-stdin", &reg]),
        Some(b"s3cret-pw\n"),
    );
    root.check(&["login"], out);
    let auth_file = root.root.join("auth.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&auth_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = root.output(
        root.command(&["pull", &format!("{reg}/lie/image:tag")]),
        None,
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !printed.contains("s3cret-pw") && !printed.contains("czNjcmV0LXB3"),
        "{printed}"
    );
    let to_storage = storage_seen.lock().unwrap().clone();
    assert!(
        !to_storage.is_empty(),
        "the redirect was not followed: {printed}"
    );
    assert!(
        to_storage.iter().all(|(_, a)| a.is_none()),
        "credentials leaked: {to_storage:?}"
    );
    assert!(registry_seen
        .lock()
        .unwrap()
        .iter()
        .any(|(_, a)| a.is_some()));
    eprintln!("{refused} hostile registry cases refused; credentials kept off the redirect");
}

/// The manifest with the config's real size filled in.
fn fix_config_size(manifest: Vec<u8>, config: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let m = String::from_utf8(manifest).unwrap().replacen(
        "\"size\":0",
        &format!("\"size\":{}", config.len()),
        1,
    );
    (m.into_bytes(), config)
}

fn routes(
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer: Vec<u8>,
    truncate: Option<usize>,
) -> HashMap<String, Reply> {
    let (c, l) = (sha256_hex(&config), sha256_hex(&layer));
    lying_routes(manifest, (c, config), (l, layer), truncate)
}

/// Routes that serve `config` and `layer` under the given digests, whatever they hold.
fn lying_routes(
    manifest: Vec<u8>,
    (c, config): (String, Vec<u8>),
    (l, layer): (String, Vec<u8>),
    truncate: Option<usize>,
) -> HashMap<String, Reply> {
    let mut r = HashMap::new();
    r.insert("/v2/".to_string(), ok(b"{}".to_vec(), "application/json"));
    r.insert(
        "/v2/lie/image/manifests/tag".to_string(),
        ok(manifest, MANIFEST_TYPE),
    );
    // Blobs are served under the digest of what they should be (the lie is in the body).
    r.insert(
        format!("/v2/lie/image/blobs/sha256:{c}"),
        ok(config, "application/octet-stream"),
    );
    let mut layer = ok(layer, "application/octet-stream");
    layer.truncate = truncate;
    r.insert(format!("/v2/lie/image/blobs/sha256:{l}"), layer);
    r
}

/// An image manifest of `config` and uncompressed `layers`.
fn manifest_of(config: &[u8], layers: &[Vec<u8>]) -> Vec<u8> {
    let descriptor = |media_type: &str, bytes: &[u8]| {
        serde_json::json!({
            "mediaType": media_type,
            "digest": format!("sha256:{}", sha256_hex(bytes)),
            "size": bytes.len(),
        })
    };
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": layers
            .iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l))
            .collect::<Vec<_>>(),
    }))
    .unwrap()
}

#[test]
fn root_a_pull_that_fails_leaves_the_store_as_it_was() {
    let root = LoneRoot::new(false);
    // `test/ok` has one layer; `test/partial` that layer, a new one, and a last one whose
    // entry climbs out (all digests right: only applying it refuses it).
    let shared = layer_tar(&[file("one.txt", b"1\n")]);
    let new = layer_tar(&[file("two.txt", b"2\n")]);
    let bad = layer_tar(&[file("three.txt", b"3\n"), file("../../escape", b"x\n")]);
    let mut routes = HashMap::new();
    routes.insert("/v2/".to_string(), ok(b"{}".to_vec(), "application/json"));
    for (repo, layers) in [
        ("ok", vec![shared.clone()]),
        ("partial", vec![shared, new, bad]),
    ] {
        let (config, _) = image_config(&layers);
        routes.insert(
            format!("/v2/test/{repo}/manifests/v1"),
            ok(manifest_of(&config, &layers), MANIFEST_TYPE),
        );
        for blob in layers.into_iter().chain([config]) {
            routes.insert(
                format!("/v2/test/{repo}/blobs/sha256:{}", sha256_hex(&blob)),
                ok(blob, "application/octet-stream"),
            );
        }
    }
    let port = serve(routes, Seen::default(), false);
    let host = format!("127.0.0.1:{port}");
    root.ok(&["pull", "-q", &format!("{host}/test/ok:v1")]);
    let before = root.state();

    // Twice: what the first attempt left must not change the second.
    for _ in 0..2 {
        let err = root.fails(&["pull", "-q", &format!("{host}/test/partial:v1")]);
        assert!(err.contains("escape"), "{err}");
        assert_eq!(root.state(), before);
    }
    let images = root.ok(&["images", "--format", "{{.Repository}}"]);
    assert_eq!(images, format!("{host}/test/ok\n"));
}
