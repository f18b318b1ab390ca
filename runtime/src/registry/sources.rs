//! Where blobs are known to be: `ROOT/blob-sources.json`, blob digest → the repositories
//! (`registry/path`) it was pulled from or pushed to. A push to another repository of the
//! same registry asks for a cross-repository mount from one of them instead of uploading
//! (Docker keeps the same knowledge as `distribution/v2metadata-by-diffid`).
//!
//! A hint only: a stale entry costs one refused mount, after which the blob is uploaded.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::image::Digest;

/// The sources file of `root`.
fn path(root: &Path) -> PathBuf {
    root.join("blob-sources.json")
}

/// Blob digest → `registry/path` repositories that have it.
#[derive(Debug, Default)]
pub struct Sources {
    map: BTreeMap<Digest, BTreeSet<String>>,
}

impl Sources {
    pub fn load(root: &Path) -> anyhow::Result<Sources> {
        let path = path(root);
        let map = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("failed to parse {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
        };
        Ok(Sources { map })
    }

    pub fn save(&self, root: &Path) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(&self.map)?;
        bytes.push(b'\n');
        crate::store::write_atomic(&path(root), &bytes)
    }

    /// Records that repository `path` of `registry` has `digest`.
    pub fn add(&mut self, digest: &Digest, registry: &str, path: &str) {
        self.map
            .entry(digest.clone())
            .or_default()
            .insert(format!("{registry}/{path}"));
    }

    /// Repository paths of `registry` known to have `digest`.
    pub fn on_registry(&self, digest: &Digest, registry: &str) -> Vec<String> {
        let prefix = format!("{registry}/");
        self.map
            .get(digest)
            .into_iter()
            .flatten()
            .filter_map(|r| r.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_found_by_registry() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"layer");
        let mut s = Sources::default();
        s.add(&d, "127.0.0.1:5000", "test/busybox");
        s.add(&d, "127.0.0.1:6000", "other/repo");
        s.save(dir.path()).unwrap();
        let s = Sources::load(dir.path()).unwrap();
        assert_eq!(s.on_registry(&d, "127.0.0.1:5000"), ["test/busybox"]);
        assert!(s
            .on_registry(&Digest::of(b"x"), "127.0.0.1:5000")
            .is_empty());
    }
}
