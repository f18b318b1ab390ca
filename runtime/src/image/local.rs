//! The manifest of a local image, for push and save: the one it was pulled (or loaded)
//! with, byte for byte, so its digest stays what the registry had; for an image that has
//! none (a committed one), an OCI manifest made from the layers' stored blobs.

use anyhow::Context;
use serde_json::json;

use super::{Digest, DOCKER_MANIFEST, OCI_MANIFEST};
use crate::store::{ImageRecord, Store};

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A manifest as bytes, with its media type and digest.
#[derive(Clone, Debug)]
pub struct LocalManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// The media type of manifest `bytes`: its own `mediaType`, else (umoci writes none) the
/// family of its config's media type.
pub fn manifest_media_type(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(t) = v["mediaType"].as_str() {
        return t.to_string();
    }
    match v["config"]["mediaType"].as_str() {
        Some(t) if t.starts_with("application/vnd.docker.") => DOCKER_MANIFEST.to_string(),
        _ => OCI_MANIFEST.to_string(),
    }
}

/// The OCI layer media type for a stored layer blob of `media_type`.
fn oci_layer_type(media_type: &str, gzip: bool) -> &'static str {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar+zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        }
        _ if gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        _ => "application/vnd.oci.image.layer.v1.tar",
    }
}

/// The manifest of `image`: the stored one when there is one, else a new OCI manifest over
/// the config and the layers' blobs.
pub fn manifest_of(store: &Store, image: &ImageRecord) -> anyhow::Result<LocalManifest> {
    if let Some(digest) = &image.manifest_digest {
        if let Ok(bytes) = store.read_blob(digest) {
            digest
                .verify(&bytes, None)
                .context("the stored manifest is damaged")?;
            return Ok(LocalManifest {
                media_type: manifest_media_type(&bytes),
                digest: digest.clone(),
                bytes,
            });
        }
    }
    let config = store.read_blob(&image.id)?;
    let mut layers = Vec::new();
    for chain_id in &image.layers {
        let layer = store
            .layers
            .get(chain_id)
            .with_context(|| format!("layer {chain_id} has no record"))?;
        let blob = layer
            .blob
            .as_ref()
            .with_context(|| format!("layer {chain_id} has no stored blob"))?;
        let mut head = [0u8; 2];
        let gzip = std::fs::File::open(store.blob_path(&blob.digest))
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
            && head == [0x1f, 0x8b];
        layers.push(json!({
            "mediaType": oci_layer_type(&blob.media_type, gzip),
            "digest": blob.digest,
            "size": blob.size,
        }));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": image.id, "size": config.len() },
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest)?;
    Ok(LocalManifest {
        digest: Digest::of(&bytes),
        media_type: OCI_MANIFEST.to_string(),
        bytes,
    })
}
