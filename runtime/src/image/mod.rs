//! Image formats: digests, references, and the manifests, indexes and configs of OCI and
//! Docker schema 2 images.

pub mod change;
mod digest;
pub mod local;
mod reference;

use anyhow::{bail, Context};
use serde::Deserialize;

pub use digest::{Digest, HashingReader, HashingWriter};
pub use reference::Reference;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest type a pull accepts, for the `Accept` header (registries do not convert:
/// asking only for one type can get a 404 for an image stored as the other).
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// A content descriptor as manifests and indexes carry it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// What a manifest endpoint returned.
pub enum ManifestKind {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or an index (OCI or Docker schema 2). The media type comes from the
/// document when it names one, else from the registry's Content-Type. Validated with
/// oci-spec's types first, then read into our descriptors.
pub fn parse_manifest(bytes: &[u8], content_type: &str) -> anyhow::Result<ManifestKind> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        schema_version: u32,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<Vec<Descriptor>>,
        #[serde(default)]
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Option<Vec<Descriptor>>,
    }
    let doc: Doc = serde_json::from_slice(bytes).context("the manifest is not valid JSON")?;
    if doc.schema_version != 2 {
        bail!(
            "manifest schema version {} is not supported (only 2)",
            doc.schema_version
        );
    }
    let media_type = doc.media_type.as_deref().unwrap_or(content_type);
    let media_type = media_type.split(';').next().unwrap_or_default().trim();
    match (media_type, doc.manifests, doc.config, doc.layers) {
        (OCI_INDEX | DOCKER_MANIFEST_LIST, Some(manifests), _, _)
        | ("" | "application/json", Some(manifests), None, None) => {
            oci_spec::image::ImageIndex::from_reader(bytes)
                .context("the image index is malformed")?;
            Ok(ManifestKind::Index(manifests))
        }
        (
            OCI_MANIFEST | DOCKER_MANIFEST | "" | "application/json",
            None,
            Some(config),
            Some(layers),
        ) => {
            oci_spec::image::ImageManifest::from_reader(bytes)
                .context("the image manifest is malformed")?;
            Ok(ManifestKind::Image { config, layers })
        }
        (other, ..) => bail!("unsupported manifest (media type {other:?})"),
    }
}

/// The index entry for linux/amd64 (the platform this runtime runs).
pub fn pick_platform(manifests: &[Descriptor]) -> anyhow::Result<&Descriptor> {
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .with_context(|| {
            let have: Vec<String> = manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            format!(
                "the image index has no linux/amd64 manifest (it has: {})",
                have.join(", ")
            )
        })
}

/// Layer blob compression, from the media type (and the blob's first bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer of `media_type` whose blob starts with `head`. Layer
    /// media types that are not tar (foreign, encrypted, unknown) are refused.
    pub fn of_layer(media_type: &str, head: &[u8]) -> anyhow::Result<Compression> {
        let known = [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.diff.tar",
            "",
        ];
        if !known.contains(&media_type) {
            bail!("layer media type {media_type:?} is not supported");
        }
        // The bytes decide: some registries and tools label gzip layers as plain tar.
        Ok(if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        })
    }
}

/// The parts of an image config the store needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ConfigSummary {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    pub rootfs: RootFs,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

impl ConfigSummary {
    pub fn parse(bytes: &[u8]) -> anyhow::Result<ConfigSummary> {
        // oci-spec 0.7 requires `history`, which the image spec makes optional (and some
        // tools leave out): validate as if an empty one were there.
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).context("the image config is malformed")?;
        if let Some(obj) = value.as_object_mut() {
            obj.entry("history")
                .or_insert_with(|| serde_json::json!([]));
        }
        serde_json::from_value::<oci_spec::image::ImageConfiguration>(value)
            .context("the image config is malformed")?;
        let config: ConfigSummary =
            serde_json::from_slice(bytes).context("the image config is malformed")?;
        if config.rootfs.kind != "layers" {
            bail!(
                "image config rootfs type {:?} is not \"layers\"",
                config.rootfs.kind
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_and_oci_manifests_parse() {
        let d = Digest::of(b"c");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":1}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":2}}]}}"#
        );
        match parse_manifest(m.as_bytes(), OCI_MANIFEST).unwrap() {
            ManifestKind::Image { layers, .. } => assert_eq!(layers[0].size, 2),
            ManifestKind::Index(_) => panic!("not an index"),
        }
        let i = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[
               {{"mediaType":"{DOCKER_MANIFEST}","digest":"{d}","size":3,"platform":{{"architecture":"arm64","os":"linux"}}}},
               {{"mediaType":"{DOCKER_MANIFEST}","digest":"{d}","size":4,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        match parse_manifest(i.as_bytes(), "").unwrap() {
            ManifestKind::Index(m) => assert_eq!(pick_platform(&m).unwrap().size, 4),
            ManifestKind::Image { .. } => panic!("not an image"),
        }
    }

    #[test]
    fn a_config_without_history_is_accepted() {
        let d = Digest::of(b"layer");
        let c = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let summary = ConfigSummary::parse(c.as_bytes()).unwrap();
        assert_eq!(summary.rootfs.diff_ids, [d]);
        assert!(ConfigSummary::parse(br#"{"architecture":"amd64"}"#).is_err());
    }

    #[test]
    fn compression_follows_the_bytes() {
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        assert_eq!(
            Compression::of_layer(gz, &[0x1f, 0x8b, 8]).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::of_layer(gz, &[0x28, 0xb5, 0x2f, 0xfd]).unwrap(),
            Compression::Zstd
        );
        assert!(Compression::of_layer("application/x-foreign", &[]).is_err());
    }
}
