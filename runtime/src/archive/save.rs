//! Writing Docker 25's archive layout (see the module above) from the content store.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;

use anyhow::{bail, Context};
use serde_json::json;

use super::{DockerManifestEntry, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME};
use crate::image::local::manifest_of;
use crate::image::{parse_manifest, Digest, ManifestKind, Reference, OCI_INDEX};
use crate::store::{ImageRecord, Store};

/// An image to save and the names to save it under (none: saved by id, untagged).
pub struct SaveImage {
    pub image: ImageRecord,
    pub tags: Vec<Reference>,
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// A tar of read-only-looking regular files, owned by root, dated at the epoch, as Docker
/// and skopeo write theirs.
struct Writer<W: Write> {
    tar: tar::Builder<W>,
}

impl<W: Write> Writer<W> {
    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, 0, 0o755);
        self.tar.append_data(&mut h, path, std::io::empty())?;
        Ok(())
    }

    fn bytes(&mut self, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
        self.tar.append_data(&mut h, path, bytes)?;
        Ok(())
    }

    /// Appends a stored blob, checking on the way that it still has its digest and size
    /// (the archive is refused, not written wrong, when the content store was damaged).
    fn blob(&mut self, store: &Store, digest: &Digest, size: u64) -> anyhow::Result<()> {
        let path = store.blob_path(digest);
        let file = File::open(&path).with_context(|| format!("failed to open blob {digest}"))?;
        let len = file.metadata()?.len();
        if len != size {
            bail!("stored blob {digest} has {len} bytes, its descriptor says {size}");
        }
        let mut h = Self::header(tar::EntryType::Regular, size, 0o644);
        let mut reader = crate::image::HashingReader::new(std::io::BufReader::new(file));
        self.tar
            .append_data(&mut h, blob_name(digest), &mut reader)
            .with_context(|| format!("failed to write blob {digest}"))?;
        let (actual, _) = reader.finish();
        if actual != *digest {
            bail!("stored blob {digest} is damaged (its content is {actual})");
        }
        Ok(())
    }
}

/// The name Docker 25 puts in the `io.containerd.image.name` annotation: fully qualified.
fn full_name(r: &Reference) -> String {
    format!(
        "{}/{}:{}",
        r.registry,
        r.path,
        r.tag_or_default().unwrap_or("latest")
    )
}

/// Writes `images` as one archive to `out`; returns `out` (to finish a compressor).
pub fn write_archive<W: Write>(store: &Store, images: &[SaveImage], out: W) -> anyhow::Result<W> {
    let mut w = Writer {
        tar: tar::Builder::new(out),
    };
    w.dir("blobs/")?;
    w.dir("blobs/sha256/")?;
    let mut written: BTreeSet<Digest> = BTreeSet::new();
    let mut docker_manifest = Vec::new();
    let mut index = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for SaveImage { image, tags } in images {
        let manifest = manifest_of(store, image)?;
        let ManifestKind::Image { config, layers } =
            parse_manifest(&manifest.bytes, &manifest.media_type)?
        else {
            bail!("the stored manifest of {} is an index", image.id);
        };
        if config.digest != image.id {
            bail!(
                "the stored manifest of {} names config {}",
                image.id,
                config.digest
            );
        }
        for d in layers.iter().chain([&config]) {
            if written.insert(d.digest.clone()) {
                w.blob(store, &d.digest, d.size)?;
            }
        }
        if written.insert(manifest.digest.clone()) {
            w.bytes(&blob_name(&manifest.digest), &manifest.bytes)?;
        }
        let descriptor = |annotations: Option<serde_json::Value>| {
            let mut d = json!({
                "mediaType": manifest.media_type,
                "digest": manifest.digest,
                "size": manifest.bytes.len(),
            });
            if let Some(a) = annotations {
                d["annotations"] = a;
            }
            d
        };
        if tags.is_empty() {
            index.push(descriptor(None));
        }
        for tag in tags {
            index.push(descriptor(Some(json!({
                ANNOTATION_IMAGE_NAME: full_name(tag),
                ANNOTATION_REF_NAME: tag.tag_or_default().unwrap_or("latest"),
            }))));
            if let (Some(top), Some(t)) = (layers.last(), tag.tag_or_default()) {
                repositories
                    .entry(tag.repository())
                    .or_default()
                    .insert(t.to_string(), top.digest.hex().to_string());
            }
        }
        docker_manifest.push(DockerManifestEntry {
            config: blob_name(&config.digest),
            repo_tags: Some(tags.iter().map(|t| t.to_string()).collect()),
            layers: layers.iter().map(|l| blob_name(&l.digest)).collect(),
        });
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": index,
    });
    w.bytes("index.json", &serde_json::to_vec(&index)?)?;
    w.bytes("manifest.json", &serde_json::to_vec(&docker_manifest)?)?;
    w.bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    if !repositories.is_empty() {
        w.bytes("repositories", &serde_json::to_vec(&repositories)?)?;
    }
    Ok(w.tar.into_inner()?)
}
