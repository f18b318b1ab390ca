//! Image archives: what `save` writes and `load` reads.
//!
//! `save` writes Docker 25's layout, which is two layouts in one tar:
//! - Docker's `manifest.json` (`[{"Config": …, "RepoTags": […], "Layers": […]}]`) and the
//!   legacy `repositories` file, read by `docker load` and skopeo's `docker-archive:`;
//! - an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), read by
//!   `skopeo oci-archive:` and containerd.
//!
//! Both name the same files: every blob once, under `blobs/sha256/<hex>`. Layers are the
//! blobs the image was pulled with (compressed as they were), so the manifest in the OCI
//! part is the pulled manifest byte for byte and the layer digests are the registry's.
//!
//! `load` reads that, the legacy Docker layout (`<id>/layer.tar`, `<diff id>.tar`, as
//! skopeo and Docker before 25 write it), and OCI layouts (a directory or a tar of one),
//! each possibly gzip- or zstd-compressed.

pub mod load;
pub mod save;

use serde::{Deserialize, Serialize};

/// One entry of Docker's `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DockerManifestEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

/// The annotation containerd and Docker 25 put on index entries: the full image name.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The OCI annotation for an index entry's reference (a tag, or a full name).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
