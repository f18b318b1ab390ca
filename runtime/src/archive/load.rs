//! Reading image archives: a tar (plain, gzip or zstd) is first extracted into a private
//! directory, then read as a directory, the same way an OCI layout directory is.
//!
//! Everything is verified before anything is stored: each config's digest (the image id,
//! and the name the archive gives it), each blob's digest against its descriptor (OCI) and
//! each layer's uncompressed digest against the config's diff ids. A tampered archive is
//! refused with nothing kept.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use super::{DockerManifestEntry, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME};
use crate::image::{
    parse_manifest, pick_platform, Compression, ConfigSummary, Descriptor, Digest, HashingReader,
    ManifestKind, Reference,
};
use crate::storage::unpack::{Counted, Limits, RatioGuard, TarGuard};

/// Archives (and their metadata files) larger than this are not read into memory.
const MAX_JSON_BYTES: u64 = 16 << 20;

/// A directory holding an archive's files: an extracted tar (removed on drop) or a layout
/// the user named. Symbolic links of extracted tars are kept as a table and resolved
/// inside the directory only.
pub struct Layout {
    dir: PathBuf,
    links: HashMap<PathBuf, PathBuf>,
    owned: bool,
}

impl Drop for Layout {
    fn drop(&mut self) {
        if self.owned {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `path` without `.`, `..` resolved lexically; `None` when it climbs out or is absolute.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Opens `input` (compressed or not) as a tar stream, refused when it decompresses more
/// than `limits` allow.
fn decompressed(input: Box<dyn Read>, limits: &Limits) -> anyhow::Result<Box<dyn Read>> {
    let (input, compressed) = Counted::new(input);
    let mut input = BufReader::with_capacity(256 << 10, input);
    let head = input
        .fill_buf()
        .context("failed to read the archive")?
        .to_vec();
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(RatioGuard::new(
            flate2::bufread::MultiGzDecoder::new(input),
            compressed,
            limits,
        ))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(RatioGuard::new(
            zstd::stream::read::Decoder::with_buffer(input)?,
            compressed,
            limits,
        ))
    } else {
        Box::new(input)
    })
}

impl Layout {
    /// Extracts the tar `input` into `dir` (created; removed again when the layout drops).
    /// Only directories, regular files and symbolic links are taken; paths that climb out
    /// are refused, and so is an archive past the layer [`Limits`] (bytes, entries, path
    /// length, record size, decompression ratio): a bomb does not fill the host.
    pub fn extract(input: Box<dyn Read>, dir: PathBuf) -> anyhow::Result<Layout> {
        Layout::extract_with(input, dir, &Limits::from_env()?)
    }

    fn extract_with(input: Box<dyn Read>, dir: PathBuf, limits: &Limits) -> anyhow::Result<Layout> {
        fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        let mut layout = Layout {
            dir,
            links: HashMap::new(),
            owned: true,
        };
        let mut archive = tar::Archive::new(TarGuard::new(
            decompressed(input, limits)?,
            limits.max_record_bytes,
        ));
        let (mut entries, mut bytes) = (0u64, 0u64);
        for entry in archive.entries().context("failed to read the archive")? {
            let mut entry = entry.context("failed to read the archive")?;
            entries += 1;
            if entries > limits.max_entries {
                bail!(
                    "the archive has more than {} entries: refused (THINBOX_MAX_LAYER_ENTRIES)",
                    limits.max_entries
                );
            }
            if entry.path_bytes().len() > limits.max_path_bytes {
                bail!("an archive entry's path is too long: refused (THINBOX_MAX_PATH_BYTES)");
            }
            let raw = entry.path().context("an archive entry has a bad path")?;
            let Some(path) = normalize(&raw) else {
                bail!("archive entry {} climbs out of the archive", raw.display());
            };
            if path.as_os_str().is_empty() {
                continue;
            }
            let target = layout.dir.join(&path);
            match entry.header().entry_type() {
                tar::EntryType::Directory => fs::create_dir_all(&target)?,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    if let Some(parent) = target.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    let mut file = File::create(&target)
                        .with_context(|| format!("failed to create {}", target.display()))?;
                    let budget = limits.max_bytes.saturating_sub(bytes);
                    bytes += io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut file)
                        .with_context(|| format!("failed to extract {}", path.display()))?;
                    if bytes > limits.max_bytes {
                        bail!(
                            "the archive unpacks to more than {} bytes: refused \
                             (THINBOX_MAX_LAYER_BYTES)",
                            limits.max_bytes
                        );
                    }
                }
                tar::EntryType::Symlink => {
                    let link = entry
                        .link_name()?
                        .context("a symbolic link without a target")?;
                    layout.links.insert(path, link.into_owned());
                }
                other => {
                    tracing::debug!(path = %path.display(), ?other, "archive entry skipped");
                }
            }
        }
        Ok(layout)
    }

    /// A layout directory the user named; kept as it is.
    pub fn directory(dir: &Path) -> anyhow::Result<Layout> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("failed to open {}", dir.display()))?;
        Ok(Layout {
            dir,
            links: HashMap::new(),
            owned: false,
        })
    }

    /// The file `name` names inside the layout (links followed, never out of it).
    fn resolve(&self, name: &str) -> anyhow::Result<PathBuf> {
        let mut path = normalize(Path::new(name))
            .with_context(|| format!("archive path {name:?} climbs out of the archive"))?;
        for _ in 0..16 {
            let Some(target) = self.links.get(&path) else {
                let full = self.dir.join(&path);
                if !self.owned {
                    let real = full
                        .canonicalize()
                        .with_context(|| format!("{name} is missing from the layout"))?;
                    if !real.starts_with(&self.dir) {
                        bail!("{name} points out of the layout");
                    }
                    return Ok(real);
                }
                if !full.is_file() {
                    bail!("{name} is missing from the archive");
                }
                return Ok(full);
            };
            let joined = path.parent().unwrap_or(Path::new("")).join(target);
            path = normalize(&joined)
                .with_context(|| format!("link {name} points out of the archive"))?;
        }
        bail!("too many links resolving {name}")
    }

    fn exists(&self, name: &str) -> bool {
        self.resolve(name).is_ok()
    }

    fn read_small(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.resolve(name)?;
        let mut bytes = Vec::new();
        File::open(&path)
            .with_context(|| format!("failed to open {name}"))?
            .take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_JSON_BYTES {
            bail!("{name} is larger than {MAX_JSON_BYTES} bytes");
        }
        Ok(bytes)
    }

    fn blob_name(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    /// Reads blob `d` whole (a manifest, an index, a config), verified.
    fn read_blob(&self, d: &Descriptor) -> anyhow::Result<Vec<u8>> {
        let bytes = self.read_small(&Self::blob_name(&d.digest))?;
        d.digest
            .verify(&bytes, Some(d.size))
            .with_context(|| format!("blob {} of the archive is damaged", d.digest))?;
        Ok(bytes)
    }
}

/// One layer of an image to load: where its blob is and what it must be.
#[derive(Clone, Debug)]
pub struct LoadLayer {
    pub path: PathBuf,
    /// The blob's descriptor: digest, size and media type; the digest and size are
    /// computed (and, when the archive gave them, checked) by [`verify`].
    pub blob: Descriptor,
    pub diff_id: Digest,
}

/// One image to load, verified.
pub struct LoadImage {
    pub config: Vec<u8>,
    pub id: Digest,
    pub summary: ConfigSummary,
    /// The manifest the archive had for it (OCI layouts), byte for byte.
    pub manifest: Option<(Vec<u8>, Digest)>,
    pub layers: Vec<LoadLayer>,
    pub tags: Vec<Reference>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(default)]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    platform: Option<crate::image::Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

impl IndexEntry {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            platform: self.platform.clone(),
            urls: None,
        }
    }

    /// The image name the entry carries: containerd's full name, else a reference name
    /// that is a full name (a bare tag, as skopeo writes, names no repository). A name that
    /// does not parse is no name; one with a digest is refused ([`Reference::parse_tag`]).
    fn name(&self) -> anyhow::Result<Option<Reference>> {
        let name = match self.annotations.get(ANNOTATION_IMAGE_NAME) {
            Some(n) => n,
            None => match self.annotations.get(ANNOTATION_REF_NAME) {
                Some(n) if n.contains('/') || n.contains(':') => n,
                _ => return Ok(None),
            },
        };
        if Reference::parse(name).is_err() {
            return Ok(None);
        }
        Reference::parse_tag(name)
            .with_context(|| format!("the archive names an image {name:?}"))
            .map(Some)
    }
}

/// The image manifest an index entry leads to (through nested indexes, for linux/amd64):
/// its bytes, digest, config and layers.
fn follow(
    layout: &Layout,
    entry: &Descriptor,
    depth: u32,
) -> anyhow::Result<(Vec<u8>, Digest, Descriptor, Vec<Descriptor>)> {
    if depth > 4 {
        bail!("the archive's indexes nest too deep");
    }
    let bytes = layout.read_blob(entry)?;
    match parse_manifest(&bytes, &entry.media_type)? {
        ManifestKind::Index(manifests) => {
            let next = pick_platform(&manifests)?.clone();
            follow(layout, &next, depth + 1)
        }
        ManifestKind::Image { config, layers } => Ok((bytes, entry.digest.clone(), config, layers)),
    }
}

/// A layer's media type from its first bytes (Docker archives do not say).
fn media_type_of(path: &Path) -> anyhow::Result<String> {
    let mut head = [0u8; 4];
    let n = File::open(path)?.read(&mut head)?;
    let head = &head[..n];
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.docker.image.rootfs.diff.tar"
    }
    .to_string())
}

/// The digest a Docker archive's file name gives its content, if it gives one
/// (`blobs/sha256/<hex>`, `<hex>.json`, `<hex>.tar`).
fn digest_in_name(name: &str) -> Option<Digest> {
    let file = Path::new(name).file_name()?.to_str()?;
    let hex = file
        .strip_suffix(".json")
        .or_else(|| file.strip_suffix(".tar"))
        .unwrap_or(file);
    let in_blobs = name.contains("blobs/sha256/");
    if in_blobs || hex.len() == 64 && file != hex {
        Digest::parse(&format!("sha256:{hex}")).ok()
    } else {
        None
    }
}

/// Reads every image the layout holds, and verifies each completely (see the module doc);
/// a layer is decompressed within `limits`, as unpacking it would be.
pub fn read_images(layout: &Layout, limits: &Limits) -> anyhow::Result<Vec<LoadImage>> {
    let index: Option<Index> = if layout.exists("index.json") {
        Some(
            serde_json::from_slice(&layout.read_small("index.json")?)
                .context("the archive's index.json is malformed")?,
        )
    } else {
        None
    };
    let mut images = Vec::new();
    if layout.exists("manifest.json") {
        let entries: Vec<DockerManifestEntry> =
            serde_json::from_slice(&layout.read_small("manifest.json")?)
                .context("the archive's manifest.json is malformed")?;
        for entry in entries {
            let config = layout.read_small(&entry.config)?;
            let id = Digest::of(&config);
            if let Some(named) = digest_in_name(&entry.config) {
                if named != id {
                    bail!(
                        "config {} of the archive is damaged: its content is {id}",
                        entry.config
                    );
                }
            }
            // The OCI part of a Docker 25 archive has this image's manifest: use it (its
            // descriptors, and its bytes for the repo digest).
            let oci = index.as_ref().and_then(|index| {
                index.manifests.iter().find_map(|e| {
                    let (bytes, digest, config, layers) =
                        follow(layout, &e.descriptor(), 0).ok()?;
                    (config.digest == id && layers.len() == entry.layers.len())
                        .then_some((bytes, digest, layers))
                })
            });
            let summary = ConfigSummary::parse(&config)?;
            let layers = match &oci {
                Some((_, _, descriptors)) => descriptors
                    .iter()
                    .map(|d| Ok((layout.resolve(&Layout::blob_name(&d.digest))?, d.clone())))
                    .collect::<anyhow::Result<Vec<_>>>()?,
                None => entry
                    .layers
                    .iter()
                    .map(|name| {
                        let path = layout.resolve(name)?;
                        let blob = Descriptor {
                            media_type: media_type_of(&path)?,
                            // Filled in by the verification below.
                            digest: Digest::of(b""),
                            size: 0,
                            platform: None,
                            urls: None,
                        };
                        Ok((path, blob))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
            };
            let tags = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    Reference::parse_tag(t)
                        .with_context(|| format!("the archive names an image {t:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            images.push(verify(
                config,
                id,
                summary,
                oci.map(|(bytes, digest, _)| (bytes, digest)),
                layers,
                tags,
                limits,
            )?);
        }
    } else if let Some(index) = index {
        for entry in &index.manifests {
            let (bytes, digest, config_d, layers) = follow(layout, &entry.descriptor(), 0)?;
            let config = layout.read_blob(&config_d)?;
            let summary = ConfigSummary::parse(&config)?;
            let layers = layers
                .iter()
                .map(|d| Ok((layout.resolve(&Layout::blob_name(&d.digest))?, d.clone())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tags = entry.name()?.into_iter().collect();
            images.push(verify(
                config,
                config_d.digest,
                summary,
                Some((bytes, digest)),
                layers,
                tags,
                limits,
            )?);
        }
    } else {
        bail!("not an image archive: no manifest.json and no index.json");
    }
    if images.is_empty() {
        bail!("the archive holds no image");
    }
    Ok(images)
}

/// Checks every layer of an image: the blob's digest and size (against the manifest's
/// descriptor when the archive has a manifest, else computed), and the uncompressed tar's
/// digest against the config's diff id. Decompression stops where `limits` would stop
/// unpacking: a bomb is refused here, before it costs more than its unpacking would.
fn verify(
    config: Vec<u8>,
    id: Digest,
    summary: ConfigSummary,
    manifest: Option<(Vec<u8>, Digest)>,
    layers: Vec<(PathBuf, Descriptor)>,
    tags: Vec<Reference>,
    limits: &Limits,
) -> anyhow::Result<LoadImage> {
    let known = manifest.is_some();
    if summary.rootfs.diff_ids.len() != layers.len() {
        bail!(
            "image {id}: the config lists {} layers, the archive {}",
            summary.rootfs.diff_ids.len(),
            layers.len()
        );
    }
    let mut out = Vec::new();
    for ((path, mut blob), diff_id) in layers.into_iter().zip(&summary.rootfs.diff_ids) {
        let file =
            File::open(&path).with_context(|| format!("failed to open {}", path.display()))?;
        let mut raw = HashingReader::new(BufReader::with_capacity(256 << 10, file));
        let mut head = Vec::new();
        {
            let (counted, compressed) = Counted::new(&mut raw);
            let mut buffered = BufReader::new(counted);
            head.extend_from_slice(buffered.fill_buf()?);
            let decoded: Box<dyn Read + '_> = match Compression::of_layer(&blob.media_type, &head)?
            {
                Compression::None => Box::new(buffered),
                Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(buffered)),
                Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
            };
            let mut tar = HashingReader::new(RatioGuard::new(decoded, compressed, limits));
            io::copy(&mut tar, &mut io::sink())
                .with_context(|| format!("layer {diff_id} of the archive is unreadable"))?;
            let (actual, _) = tar.finish();
            if actual != *diff_id {
                bail!(
                    "layer content digest mismatch: the config says {diff_id}, the archive has \
                     {actual}: refused"
                );
            }
        }
        io::copy(&mut raw, &mut io::sink())?;
        let (digest, size) = raw.finish();
        if known {
            if digest != blob.digest || size != blob.size {
                bail!(
                    "blob digest mismatch: expected {} ({} bytes), the archive has {digest} \
                     ({size} bytes): refused",
                    blob.digest,
                    blob.size
                );
            }
        } else {
            blob.digest = digest;
            blob.size = size;
        }
        out.push(LoadLayer {
            path,
            blob,
            diff_id: diff_id.clone(),
        });
    }
    Ok(LoadImage {
        config,
        id,
        summary,
        manifest,
        layers: out,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Written raw: the tar crate refuses to build '..' paths itself.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn entries_that_climb_out_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = tar_with(&[("../evil", b"x")]);
        let err = Layout::extract(Box::new(io::Cursor::new(bytes)), dir.path().join("x"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("climbs out"), "{err:#}");
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn archive_bombs_are_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = tar_with(&[("a", &[b'x'; 8192]), ("b", &[b'y'; 8192])]);
        let limits = Limits {
            max_bytes: 10_000,
            ..Limits::default()
        };
        let err = Layout::extract_with(
            Box::new(io::Cursor::new(bytes)),
            dir.path().join("x"),
            &limits,
        )
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("THINBOX_MAX_LAYER_BYTES"),
            "{err:#}"
        );
        assert!(!dir.path().join("x").exists());

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &tar_with(&[("zeros", &vec![0u8; 32 << 20])])).unwrap();
        let limits = Limits {
            ratio_floor: 1 << 20,
            ..Limits::default()
        };
        let gz = gz.finish().unwrap();
        let err =
            Layout::extract_with(Box::new(io::Cursor::new(gz)), dir.path().join("y"), &limits)
                .err()
                .unwrap();
        assert!(
            format!("{err:#}").contains("THINBOX_MAX_LAYER_RATIO"),
            "{err:#}"
        );
        assert!(!dir.path().join("y").exists());
    }

    #[test]
    fn links_resolve_inside_the_archive_only() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = tar_with(&[("a/layer.tar", b"x")]);
        let mut layout =
            Layout::extract(Box::new(io::Cursor::new(bytes)), dir.path().join("x")).unwrap();
        layout.links.insert(
            PathBuf::from("b/layer.tar"),
            PathBuf::from("../a/layer.tar"),
        );
        layout.links.insert(
            PathBuf::from("c/layer.tar"),
            PathBuf::from("../../etc/passwd"),
        );
        assert!(layout
            .resolve("b/layer.tar")
            .unwrap()
            .ends_with("a/layer.tar"));
        assert!(layout.resolve("c/layer.tar").is_err());
        assert!(layout.resolve("/etc/passwd").is_err());
    }

    /// Writes the blobs of one image whose one layer is `blob` (of `media_type`, with
    /// `diff_id` in the config) under `dir/blobs/sha256`; returns its config and manifest.
    fn write_image_blobs(
        dir: &Path,
        blob: &[u8],
        media_type: &str,
        diff_id: &Digest,
    ) -> (Vec<u8>, Vec<u8>) {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": Digest::of(&config).to_string(),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": media_type,
                "digest": Digest::of(blob).to_string(),
                "size": blob.len(),
            }],
        }))
        .unwrap();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        for bytes in [blob, &config, &manifest] {
            fs::write(blobs.join(Digest::of(bytes).hex()), bytes).unwrap();
        }
        (config, manifest)
    }

    /// Reads a layout directory in `dir` of one one-layer image (its files under
    /// `blobs/sha256`): with a Docker `manifest.json` whose `RepoTags` are `tags`, or, given
    /// `index`, with an OCI `index.json` whose one entry has those annotations.
    fn layout_with_names(
        dir: &Path,
        tags: &[&str],
        index: Option<serde_json::Value>,
    ) -> anyhow::Result<Vec<LoadImage>> {
        let layer = tar_with(&[("hello", b"hello")]);
        let diff_id = Digest::of(&layer);
        let (config, manifest) = write_image_blobs(
            dir,
            &layer,
            "application/vnd.oci.image.layer.v1.tar",
            &diff_id,
        );
        match index {
            Some(annotations) => {
                let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": Digest::of(&manifest).to_string(),
                    "size": manifest.len(),
                    "annotations": annotations,
                }]});
                fs::write(dir.join("index.json"), index.to_string()).unwrap();
            }
            None => {
                let entry = serde_json::json!([{
                    "Config": format!("blobs/sha256/{}", Digest::of(&config).hex()),
                    "RepoTags": tags,
                    "Layers": [format!("blobs/sha256/{}", diff_id.hex())],
                }]);
                fs::write(dir.join("manifest.json"), entry.to_string()).unwrap();
            }
        }
        read_images(&Layout::directory(dir)?, &Limits::default())
    }

    #[test]
    fn digest_references_are_refused_as_image_names() {
        let pinned = format!("127.0.0.1:5000/test/busybox@sha256:{}", "d".repeat(64));
        let tagged_and_pinned = format!("x/y:v1@sha256:{}", "d".repeat(64));
        for name in [&pinned, &tagged_and_pinned] {
            let dir = tempfile::tempdir().unwrap();
            let err = layout_with_names(dir.path(), &["ok/image:v1", name], None)
                .err()
                .unwrap_or_else(|| panic!("{name} was taken as a tag"));
            let err = format!("{err:#}");
            assert!(
                err.contains(name) && err.contains("refusing to create a tag with a digest"),
                "{err}"
            );
            for key in [ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME] {
                let dir = tempfile::tempdir().unwrap();
                let annotations = serde_json::json!({ key: name });
                let err = layout_with_names(dir.path(), &[], Some(annotations))
                    .err()
                    .unwrap_or_else(|| panic!("{name} was taken as a tag ({key})"));
                assert!(format!("{err:#}").contains("digest reference"), "{err:#}");
            }
        }

        // The same archive with plain tags loads, with those tags.
        let dir = tempfile::tempdir().unwrap();
        let images = layout_with_names(dir.path(), &["ok/image:v1"], None).unwrap();
        let tags: Vec<String> = images[0].tags.iter().map(|t| t.to_string()).collect();
        assert_eq!(tags, ["ok/image:v1"]);
        let dir = tempfile::tempdir().unwrap();
        let annotations = serde_json::json!({ ANNOTATION_IMAGE_NAME: "ok/image:v2" });
        let images = layout_with_names(dir.path(), &[], Some(annotations)).unwrap();
        assert_eq!(images[0].tags[0].to_string(), "ok/image:v2");
    }

    /// An OCI layout in `dir` of one image whose one layer is `blob` (of `media_type`),
    /// with `diff_id` in its config.
    fn layout_with_layer(dir: &Path, blob: &[u8], media_type: &str, diff_id: &Digest) -> Layout {
        let (_, manifest) = write_image_blobs(dir, blob, media_type, diff_id);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::of(&manifest).to_string(),
            "size": manifest.len(),
        }]});
        fs::write(dir.join("index.json"), index.to_string()).unwrap();
        Layout::directory(dir).unwrap()
    }

    #[test]
    fn layer_bombs_are_refused_while_verifying() {
        // 64 MiB of zeros after the tar's end: gzip makes that about 64 KiB. Hashing it
        // was unbounded before (a 1 GiB blob could keep a core busy for an hour).
        let mut tar = tar_with(&[("hello", b"hello")]);
        tar.resize(tar.len() + (64 << 20), 0);
        let diff_id = Digest::of(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";

        let dir = tempfile::tempdir().unwrap();
        let layout = layout_with_layer(dir.path(), &gz, gzip, &diff_id);
        let ratio = Limits {
            ratio_floor: 1 << 20,
            ..Limits::default()
        };
        let err = read_images(&layout, &ratio)
            .err()
            .expect("a bomb was verified");
        assert!(
            format!("{err:#}").contains("THINBOX_MAX_LAYER_RATIO"),
            "{err:#}"
        );

        // A ratio that allows it still meets the bound on the stream's length.
        let length = Limits {
            max_bytes: 1 << 20,
            max_entries: 16,
            max_ratio: u64::MAX,
            ..Limits::default()
        };
        assert!(length.max_stream_bytes() < 64 << 20);
        let err = read_images(&layout, &length)
            .err()
            .expect("a bomb was verified");
        assert!(
            format!("{err:#}").contains("THINBOX_MAX_LAYER_BYTES"),
            "{err:#}"
        );

        // Within the limits, the same layer verifies.
        let images = read_images(&layout, &Limits::default()).unwrap();
        assert_eq!(images[0].layers[0].diff_id, diff_id);
    }

    #[test]
    fn archive_names_give_digests() {
        let d = Digest::of(b"c");
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{}", d.hex())),
            Some(d.clone())
        );
        assert_eq!(
            digest_in_name(&format!("{}.json", d.hex())),
            Some(d.clone())
        );
        assert_eq!(digest_in_name("config.json"), None);
    }
}
