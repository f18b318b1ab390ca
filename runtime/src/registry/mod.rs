//! A registry client for the distribution API v2 (pull side): manifests and blobs, with
//! basic and bearer-token authentication.
//!
//! Each request is first sent with what we already have (basic credentials when the
//! registry asked for basic before, the last bearer token); a 401 names the scheme in
//! `WWW-Authenticate`: for `Basic` the request is sent again with the stored credentials,
//! for `Bearer` a token is fetched from the realm (with the credentials when there are any,
//! anonymously otherwise) for the scope asked, and the request is sent again with it.

pub mod auth;
pub mod push;
pub mod sources;

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;

use crate::image::{Digest, Reference, MANIFEST_TYPES};
pub use auth::Credentials;

/// Manifests larger than this are refused (distribution's own limit is 4 MiB).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// A bearer challenge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    realm: Option<String>,
    service: Option<String>,
    scope: Option<String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm="…"`).
fn parse_challenge(header: &str) -> Challenge {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    let mut c = Challenge {
        scheme: scheme.to_ascii_lowercase(),
        ..Challenge::default()
    };
    let mut rest = params;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        match key.as_str() {
            "realm" => c.realm = Some(value.to_string()),
            "service" => c.service = Some(value.to_string()),
            "scope" => c.scope = Some(value.to_string()),
            _ => {}
        }
        rest = next;
    }
    c
}

/// What to send in `Authorization`.
#[derive(Clone, Debug)]
enum Auth {
    None,
    Basic,
    Bearer(String),
}

/// A client for one repository on one registry.
pub struct Registry {
    agent: ureq::Agent,
    base: String,
    path: String,
    credentials: Option<Credentials>,
    auth: Auth,
}

/// A manifest as the registry returned it.
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub content_type: String,
}

fn status_error(what: &str, code: u16, response: ureq::Response) -> anyhow::Error {
    let body = response.into_string().unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorBody>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        code: String,
        message: String,
    }
    match serde_json::from_str::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => anyhow::anyhow!(
            "{what}: {} ({})",
            e.errors
                .iter()
                .map(|e| format!("{}: {}", e.code.to_lowercase(), e.message))
                .collect::<Vec<_>>()
                .join("; "),
            code
        ),
        _ => anyhow::anyhow!("{what}: HTTP {code}"),
    }
}

impl Registry {
    /// A client for `reference`'s repository, with `credentials` for its registry if any.
    pub fn new(reference: &Reference, credentials: Option<Credentials>) -> Registry {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .user_agent(concat!("thinbox/", env!("CARGO_PKG_VERSION")))
            // Registries redirect blob reads to storage hosts: credentials and tokens are
            // never carried along (this is ureq's default; said here because it matters).
            .redirect_auth_headers(ureq::RedirectAuthHeaders::Never)
            .build();
        Registry {
            agent,
            base: reference.base_url(),
            path: reference.path.clone(),
            credentials,
            auth: Auth::None,
        }
    }

    fn authorize(&self, request: ureq::Request) -> ureq::Request {
        match (&self.auth, &self.credentials) {
            (Auth::Bearer(token), _) => request.set("Authorization", &format!("Bearer {token}")),
            (Auth::Basic, Some(c)) => request.set("Authorization", &c.basic_header()),
            _ => request,
        }
    }

    /// Sends `GET url` (with `accept`), authenticating on a 401 as the registry asks.
    fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        what: &str,
    ) -> anyhow::Result<ureq::Response> {
        let mut tried_auth = false;
        loop {
            let mut request = self.agent.get(url);
            if let Some(accept) = accept {
                request = request.set("Accept", accept);
            }
            match self.authorize(request).call() {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if !tried_auth => {
                    tried_auth = true;
                    let header = response
                        .header("www-authenticate")
                        .unwrap_or("")
                        .to_string();
                    self.authenticate(&parse_challenge(&header), what)?;
                }
                Err(ureq::Error::Status(401, response)) => {
                    return Err(status_error(what, 401, response)).context(
                        if self.credentials.is_some() {
                            "the registry refused the stored credentials"
                        } else {
                            "the registry needs credentials (thinbox login)"
                        },
                    );
                }
                Err(ureq::Error::Status(code, response)) => {
                    return Err(status_error(what, code, response))
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("{what}: request failed")))
                }
            }
        }
    }

    fn authenticate(&mut self, challenge: &Challenge, what: &str) -> anyhow::Result<()> {
        match challenge.scheme.as_str() {
            "basic" => {
                if self.credentials.is_none() {
                    bail!("{what}: the registry needs credentials (thinbox login)");
                }
                self.auth = Auth::Basic;
                Ok(())
            }
            "bearer" => {
                let token = self
                    .fetch_token(challenge)
                    .with_context(|| format!("{what}: failed to get a token"))?;
                self.auth = Auth::Bearer(token);
                Ok(())
            }
            other => bail!("{what}: unsupported authentication scheme {other:?}"),
        }
    }

    fn fetch_token(&self, challenge: &Challenge) -> anyhow::Result<String> {
        let realm = challenge
            .realm
            .as_deref()
            .context("the bearer challenge has no realm")?;
        let mut request = self.agent.get(realm);
        if let Some(service) = &challenge.service {
            request = request.query("service", service);
        }
        let scope = challenge
            .scope
            .clone()
            .or_else(|| (!self.path.is_empty()).then(|| format!("repository:{}:pull", self.path)));
        // A challenge can ask for several scopes at once, space-separated (a cross-repository
        // mount needs push on one repository and pull on the other): each is its own
        // `scope` parameter, as token servers expect.
        for scope in scope.iter().flat_map(|s| s.split_whitespace()) {
            request = request.query("scope", scope);
        }
        if let Some(c) = &self.credentials {
            request = request
                .query("account", &c.username)
                .set("Authorization", &c.basic_header());
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, response)) => {
                return Err(status_error("token request", code, response))
            }
            Err(e) => return Err(e).context("token request failed"),
        };
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
        }
        let mut body = Vec::new();
        response
            .into_reader()
            .take(1 << 20)
            .read_to_end(&mut body)?;
        let reply: TokenReply = serde_json::from_slice(&body).context("malformed token reply")?;
        reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .context("the token reply has no token")
    }

    /// A client for the registry `host[:port]` itself (no repository), for `login`.
    pub fn for_registry(
        registry: &str,
        credentials: Option<Credentials>,
    ) -> anyhow::Result<Registry> {
        let mut r = Reference::parse(&format!("{registry}/x"))?;
        r.path = String::new();
        Ok(Registry::new(&r, credentials))
    }

    /// Checks that the registry answers and accepts our credentials (`GET /v2/`).
    pub fn ping(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/v2/", self.base);
        self.get(&url, None, "registry check").map(drop)
    }

    /// Fetches the manifest (or index) `reference` (a tag or a digest). Bytes only; the
    /// caller checks the digest.
    pub fn manifest(&mut self, reference: &str) -> anyhow::Result<Manifest> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.path);
        let accept = MANIFEST_TYPES.join(", ");
        let response = self.get(&url, Some(&accept), &format!("manifest {reference}"))?;
        let content_type = response.content_type().to_string();
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("failed to read manifest {reference}"))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            bail!("manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes");
        }
        Ok(Manifest {
            bytes,
            content_type,
        })
    }

    /// Opens blob `digest` for reading; at most `size + 1` bytes are returned, so a blob
    /// longer than its descriptor shows as a size mismatch, not an endless read.
    pub fn blob(&mut self, digest: &Digest, size: u64) -> anyhow::Result<Box<dyn Read + Send>> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.path);
        let response = self.get(&url, None, &format!("blob {digest}"))?;
        Ok(Box::new(
            response.into_reader().take(size.saturating_add(1)),
        ))
    }
}

/// `Basic base64(user:password)`.
fn basic(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="http://127.0.0.1:1/token",service="test-registry",scope="repository:a/b:pull""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm.as_deref(), Some("http://127.0.0.1:1/token"));
        assert_eq!(c.service.as_deref(), Some("test-registry"));
        assert_eq!(c.scope.as_deref(), Some("repository:a/b:pull"));
        let c = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!(c.scheme, "basic");
        assert_eq!(basic("alice", "s3cret"), "Basic YWxpY2U6czNjcmV0");
    }
}
