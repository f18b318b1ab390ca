//! Stored registry credentials: `ROOT/auth.json` (mode 0600), in the shape of Docker's
//! `config.json` (`{"auths": {"host:port": {"auth": base64("user:password")}}}`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        super::basic(&self.username, &self.password)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthFile {
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AuthEntry {
    auth: String,
}

/// The credentials file of the state directory `root`.
pub fn path(root: &Path) -> PathBuf {
    root.join("auth.json")
}

fn load(root: &Path) -> anyhow::Result<AuthFile> {
    let path = path(root);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("failed to parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AuthFile::default()),
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn save(root: &Path, file: &AuthFile) -> anyhow::Result<()> {
    let path = path(root);
    let bytes = serde_json::to_vec_pretty(file)?;
    // Mode 0600 from the start: the temporary file is created that way before the secret
    // goes in, and the rename keeps it.
    let tmp = root.join(".auth.json.tmp");
    fs::create_dir_all(root).with_context(|| format!("failed to create {}", root.display()))?;
    let _ = fs::remove_file(&tmp);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        f.write_all(&bytes).and_then(|()| f.sync_all())?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))
}

/// The stored credentials for `registry` (`host[:port]`).
pub fn lookup(root: &Path, registry: &str) -> anyhow::Result<Option<Credentials>> {
    let file = load(root)?;
    let Some(entry) = file.auths.get(registry) else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&entry.auth)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .with_context(|| format!("the stored credentials for {registry} are malformed"))?;
    let (username, password) = decoded
        .split_once(':')
        .with_context(|| format!("the stored credentials for {registry} are malformed"))?;
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

/// Stores credentials for `registry`.
pub fn store(root: &Path, registry: &str, credentials: &Credentials) -> anyhow::Result<()> {
    let mut file = load(root)?;
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", credentials.username, credentials.password));
    file.auths.insert(registry.to_string(), AuthEntry { auth });
    save(root, &file)
}

/// Forgets the credentials of `registry`; `false` when there were none.
pub fn remove(root: &Path, registry: &str) -> anyhow::Result<bool> {
    let mut file = load(root)?;
    if file.auths.remove(registry).is_none() {
        return Ok(false);
    }
    save(root, &file)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = Credentials {
            username: "alice".into(),
            password: "s3:cret".into(),
        };
        store(dir.path(), "127.0.0.1:5000", &c).unwrap();
        let mode = fs::metadata(path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(lookup(dir.path(), "127.0.0.1:5000").unwrap(), Some(c));
        assert!(remove(dir.path(), "127.0.0.1:5000").unwrap());
        assert!(!remove(dir.path(), "127.0.0.1:5000").unwrap());
        assert_eq!(lookup(dir.path(), "127.0.0.1:5000").unwrap(), None);
    }
}
