//! The push side of the distribution API: blob existence checks, cross-repository mounts,
//! monolithic and chunked uploads, and manifest uploads.
//!
//! Every request goes through [`Registry::send`], which authenticates on a 401 as the pull
//! side does (a body is re-opened for the retry, so a file is never buffered whole). The
//! `Authorization` header only goes to URLs on the registry itself: an upload `Location`
//! on another host gets none, and redirects never carry it (ureq's `Never` policy).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::{bail, Context};

use super::{parse_challenge, status_error, Registry};
use crate::image::Digest;

/// A request body that can be produced again for a retry after authentication.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset`, reported to `progress` as they are read.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
        progress: &'a dyn Fn(u64),
    },
}

/// Counts what passes through and reports the running total.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    progress: &'a dyn Fn(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.done);
        Ok(n)
    }
}

/// How a blob got into the target repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobPush {
    /// `HEAD` found it there already.
    Exists,
    /// The registry linked it from another repository.
    Mounted { from: String },
    /// Its bytes were sent.
    Uploaded,
}

impl Registry {
    /// The repository path this client talks to.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Absolute URL for `location` (registries may answer with a path only).
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
    }

    /// `true` when `url` is on this registry (same scheme, host and port): only those get
    /// our credentials or tokens.
    fn is_ours(&self, url: &str) -> bool {
        url.strip_prefix(&self.base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Sends one request, authenticating on a 401 (once) as the registry asks. Statuses in
    /// `allow` come back as responses; any other status >= 400 is an error naming `what`.
    pub(super) fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &Body<'_>,
        allow: &[u16],
        what: &str,
    ) -> anyhow::Result<ureq::Response> {
        let mut tried_auth = false;
        loop {
            let mut request = self.agent.request(method, url);
            for (k, v) in headers {
                request = request.set(k, v);
            }
            if self.is_ours(url) {
                request = self.authorize(request);
            } else {
                tracing::debug!(%url, "a request off the registry goes without credentials");
            }
            let result = match body {
                Body::Empty if method == "GET" || method == "HEAD" => request.call(),
                Body::Empty => request.set("Content-Length", "0").send_bytes(&[]),
                Body::Bytes(bytes) => request.send_bytes(bytes),
                Body::File {
                    path,
                    offset,
                    len,
                    progress,
                } => {
                    let mut file = File::open(path)
                        .with_context(|| format!("failed to open {}", path.display()))?;
                    io::Seek::seek(&mut file, io::SeekFrom::Start(*offset))?;
                    let reader = Counting {
                        inner: io::BufReader::with_capacity(256 << 10, file).take(*len),
                        done: 0,
                        progress: *progress,
                    };
                    request.set("Content-Length", &len.to_string()).send(reader)
                }
            };
            match result {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(code, response)) if allow.contains(&code) => {
                    return Ok(response)
                }
                Err(ureq::Error::Status(401, response)) if !tried_auth && self.is_ours(url) => {
                    tried_auth = true;
                    let header = response
                        .header("www-authenticate")
                        .unwrap_or("")
                        .to_string();
                    self.authenticate(&parse_challenge(&header), what)?;
                }
                Err(ureq::Error::Status(code @ (401 | 403), response)) => {
                    return Err(status_error(what, code, response)).context(
                        if self.credentials.is_some() {
                            "the registry refused access with the stored credentials"
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

    /// `true` when the repository already has blob `digest` (`HEAD`).
    pub fn blob_exists(&mut self, digest: &Digest) -> anyhow::Result<bool> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.path);
        let response = self.send(
            "HEAD",
            &url,
            &[],
            &Body::Empty,
            &[404],
            &format!("blob check {digest}"),
        )?;
        Ok(response.status() == 200)
    }

    /// Asks the registry to link blob `digest` from repository `from` (same registry). `Ok(None)`
    /// when it did; `Ok(Some(location))` when it started an ordinary upload instead.
    fn mount(&mut self, digest: &Digest, from: &str) -> anyhow::Result<Option<String>> {
        let url = format!("{}/v2/{}/blobs/uploads/", self.base, self.path);
        let url = format!("{url}?mount={digest}&from={from}");
        let response = self.send(
            "POST",
            &url,
            &[],
            &Body::Empty,
            &[],
            &format!("blob mount {digest}"),
        )?;
        match response.status() {
            201 => Ok(None),
            202 => Ok(Some(self.location(&response)?)),
            code => bail!("blob mount {digest}: unexpected HTTP {code}"),
        }
    }

    fn location(&self, response: &ureq::Response) -> anyhow::Result<String> {
        let location = response
            .header("location")
            .context("the registry's upload answer has no Location")?;
        Ok(self.absolute(location))
    }

    /// Starts an upload session: its URL.
    fn start_upload(&mut self, digest: &Digest) -> anyhow::Result<String> {
        let url = format!("{}/v2/{}/blobs/uploads/", self.base, self.path);
        let response = self.send(
            "POST",
            &url,
            &[],
            &Body::Empty,
            &[],
            &format!("blob upload {digest}"),
        )?;
        if response.status() != 202 {
            bail!(
                "blob upload {digest}: unexpected HTTP {} (wanted 202)",
                response.status()
            );
        }
        self.location(&response)
    }

    /// Puts blob `digest` (the file at `path`, `size` bytes) into the repository: nothing when
    /// it is there, a mount when `mount_from` names another repository of this registry that
    /// has it, else an upload, monolithic when `size <= chunk_size`, in `chunk_size` pieces
    /// otherwise. `progress` hears the bytes sent.
    pub fn push_blob(
        &mut self,
        digest: &Digest,
        path: &Path,
        size: u64,
        mount_from: &[String],
        chunk_size: u64,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<BlobPush> {
        if self.blob_exists(digest)? {
            return Ok(BlobPush::Exists);
        }
        // One mount attempt, from the first other repository known to have the blob; a
        // registry that will not mount answers with an ordinary upload session.
        let mut location = None;
        if let Some(from) = mount_from.iter().find(|f| **f != self.path) {
            match self.mount(digest, from)? {
                None => return Ok(BlobPush::Mounted { from: from.clone() }),
                Some(l) => {
                    tracing::debug!(%digest, %from, "the registry did not mount; uploading");
                    location = Some(l);
                }
            }
        }
        let mut location = match location {
            Some(l) => l,
            None => self.start_upload(digest)?,
        };
        let what = format!("blob upload {digest}");
        let octets = [("Content-Type", "application/octet-stream")];
        let mut sent = 0u64;
        if size > chunk_size {
            while sent < size {
                let len = chunk_size.min(size - sent);
                let base = sent;
                let report = |n: u64| progress(base + n);
                let range = format!("{sent}-{}", sent + len - 1);
                let response = self.send(
                    "PATCH",
                    &location,
                    &[octets[0], ("Content-Range", &range)],
                    &Body::File {
                        path,
                        offset: sent,
                        len,
                        progress: &report,
                    },
                    &[],
                    &what,
                )?;
                if response.status() != 202 {
                    bail!("{what}: chunk {range} got HTTP {}", response.status());
                }
                location = self.location(&response)?;
                sent += len;
            }
        }
        let mut request_url = location;
        request_url.push(if request_url.contains('?') { '&' } else { '?' });
        request_url.push_str(&format!("digest={digest}"));
        let body = if sent < size {
            Body::File {
                path,
                offset: 0,
                len: size,
                progress,
            }
        } else {
            Body::Empty
        };
        let response = self.send("PUT", &request_url, &octets, &body, &[], &what)?;
        if response.status() != 201 {
            bail!("{what}: unexpected HTTP {} (wanted 201)", response.status());
        }
        Ok(BlobPush::Uploaded)
    }

    /// Puts a manifest under `reference` (a tag or its digest); returns the digest the
    /// registry reports (checked against the bytes' digest).
    pub fn put_manifest(
        &mut self,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> anyhow::Result<Digest> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.path);
        let response = self.send(
            "PUT",
            &url,
            &[("Content-Type", media_type)],
            &Body::Bytes(bytes),
            &[],
            &format!("manifest upload {reference}"),
        )?;
        let digest = Digest::of(bytes);
        if let Some(said) = response.header("docker-content-digest") {
            if said != digest.as_str() {
                bail!("the registry stored manifest {reference} as {said}, not {digest}");
            }
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::thread;

    use super::*;
    use crate::image::Reference;
    use crate::registry::{Auth, Credentials};

    /// Serves one HTTP request on `listener` with `reply`; sends the request's header lines.
    fn serve_once(listener: TcpListener, reply: String, seen: mpsc::Sender<Vec<String>>) {
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                lines.push(line.trim().to_string());
            }
            (&stream).write_all(reply.as_bytes()).unwrap();
            seen.send(lines).unwrap();
        });
    }

    fn registry_with_credentials(port: u16) -> Registry {
        let reference = Reference::parse(&format!("127.0.0.1:{port}/test/x")).unwrap();
        let mut r = Registry::new(
            &reference,
            Some(Credentials {
                username: "alice".into(),
                password: "s3cret".into(),
            }),
        );
        r.auth = Auth::Basic;
        r
    }

    #[test]
    fn a_redirected_blob_read_carries_no_credentials_to_the_other_host() {
        let storage = TcpListener::bind("127.0.0.1:0").unwrap();
        let storage_port = storage.local_addr().unwrap().port();
        let registry = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = registry.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        // "localhost" is another host than "127.0.0.1" as far as credentials go.
        serve_once(
            registry,
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://localhost:{storage_port}/blob\r\n\
                 Content-Length: 0\r\n\r\n"
            ),
            tx.clone(),
        );
        serve_once(
            storage,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_string(),
            tx,
        );
        let mut r = registry_with_credentials(port);
        let digest = Digest::of(b"hello");
        let mut body = String::new();
        r.blob(&digest, 5)
            .unwrap()
            .read_to_string(&mut body)
            .unwrap();
        assert_eq!(body, "hello");
        let first = rx.recv().unwrap();
        let second = rx.recv().unwrap();
        let has_auth = |lines: &[String]| {
            lines
                .iter()
                .any(|l| l.to_ascii_lowercase().starts_with("authorization:"))
        };
        assert!(
            has_auth(&first),
            "the registry gets the credentials: {first:?}"
        );
        assert!(!has_auth(&second), "the storage host does not: {second:?}");
    }

    #[test]
    fn only_urls_on_the_registry_get_credentials() {
        let r = registry_with_credentials(5000);
        assert!(r.is_ours("http://127.0.0.1:5000/v2/test/x/blobs/uploads/abc?_state=1"));
        assert!(!r.is_ours("http://127.0.0.1:50001/v2/"));
        assert!(!r.is_ours("http://evil.example/v2/"));
        assert!(!r.is_ours("https://127.0.0.1:5000/v2/"));
        assert_eq!(
            r.absolute("/v2/test/x/blobs/uploads/u"),
            "http://127.0.0.1:5000/v2/test/x/blobs/uploads/u"
        );
    }
}
