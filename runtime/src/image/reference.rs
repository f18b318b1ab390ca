//! Image references: `[registry[:port]/]path[:tag][@digest]`, normalised as Docker does
//! (no registry: Docker Hub, with `library/` for one-component paths).

use std::fmt;

use anyhow::bail;

use super::Digest;

pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path on the registry (`library/busybox`, `test/busybox`).
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

fn valid_path_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

impl Reference {
    /// A reference a tag can be made from (`tag`, `commit`, the names in a `load`ed
    /// archive): a digest reference (`repo@sha256:…`, `repo:tag@sha256:…`) is refused, as
    /// Docker refuses it. A repo digest says what a registry serves under it, which only a
    /// pull can vouch for; a tag made from one would pose as the image a user pinned.
    pub fn parse_tag(text: &str) -> anyhow::Result<Reference> {
        let reference = Reference::parse(text)?;
        if reference.digest.is_some() {
            bail!("refusing to create a tag with a digest reference: {text}");
        }
        Ok(reference)
    }

    pub fn parse(text: &str) -> anyhow::Result<Reference> {
        let (rest, digest) = match text.split_once('@') {
            Some((rest, d)) => (rest, Some(Digest::parse(d)?)),
            None => (text, None),
        };
        // A tag follows the last ':' that comes after the last '/' (a port comes before).
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        if let Some(tag) = &tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                && !tag.starts_with(['.', '-']);
            if !ok {
                bail!("invalid tag {tag:?} in reference {text:?}");
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if !path.split('/').all(valid_path_component) {
            bail!("invalid repository name in reference {text:?} (lower-case letters, digits, '.', '_', '-' and '/')");
        }
        Ok(Reference {
            registry,
            path,
            tag,
            digest,
        })
    }

    /// The repository as Docker shows it: `busybox`, `ns/app`, `127.0.0.1:5000/test/busybox`.
    pub fn repository(&self) -> String {
        if self.registry == DOCKER_HUB {
            self.path
                .strip_prefix("library/")
                .unwrap_or(&self.path)
                .to_string()
        } else {
            format!("{}/{}", self.registry, self.path)
        }
    }

    /// The tag, `latest` when neither a tag nor a digest was given.
    pub fn tag_or_default(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }

    /// What the registry's manifest endpoint takes: the digest if any, else the tag.
    pub fn manifest_reference(&self) -> String {
        match &self.digest {
            Some(d) => d.to_string(),
            None => self.tag_or_default().unwrap_or("latest").to_string(),
        }
    }

    /// Plain HTTP for the local host (tests, local registries); HTTPS everywhere else.
    pub fn base_url(&self) -> String {
        let host = self.registry.split(':').next().unwrap_or_default();
        let plain = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
        let registry = if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        };
        format!("{}://{registry}", if plain { "http" } else { "https" })
    }
}

impl fmt::Display for Reference {
    /// `repository:tag` (or `repository@digest` when only a digest was given).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.tag_or_default(), &self.digest) {
            (Some(tag), _) => write!(f, "{}:{tag}", self.repository()),
            (None, Some(d)) => write!(f, "{}@{d}", self.repository()),
            (None, None) => unreachable!("tag_or_default gives latest without a digest"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_docker() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.path.as_str()),
            ("docker.io", "library/busybox")
        );
        assert_eq!(r.to_string(), "busybox:latest");
        assert_eq!(r.base_url(), "https://registry-1.docker.io");

        let r = Reference::parse("127.0.0.1:5000/test/busybox:v2").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.path, "test/busybox");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.repository(), "127.0.0.1:5000/test/busybox");
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");

        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("localhost:5000/a@{d}")).unwrap();
        assert_eq!(r.digest.as_ref(), Some(&d));
        assert_eq!(r.manifest_reference(), d.to_string());
        assert_eq!(r.to_string(), format!("localhost:5000/a@{d}"));
    }

    #[test]
    fn malformed_references_are_refused() {
        assert!(Reference::parse("Busybox").is_err());
        assert!(Reference::parse("busybox:").is_err());
        assert!(Reference::parse("busybox@sha256:12").is_err());
        assert!(Reference::parse("a//b").is_err());
    }
}
