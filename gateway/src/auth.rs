//! Secrets: device credentials and the operator API token.
//!
//! Secrets are 32 random bytes shown once as 64 hex characters; only their SHA-256 is stored.
//! Comparing digests instead of secrets makes the comparison's timing useless to an attacker
//! (it can at best reveal a prefix of the digest of the attacker's own guess), and a stolen
//! database does not yield usable credentials.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use sha2::{Digest, Sha256};

pub type Digest32 = [u8; 32];

/// A new random secret, 64 hex characters.
pub fn new_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// The credential digests of enrolled devices, read on every MQTT CONNECT. The ingest writer
/// updates it after each enrollment change is committed.
#[derive(Debug, Default)]
pub struct Credentials {
    by_device: RwLock<HashMap<String, Digest32>>,
}

impl Credentials {
    pub fn check(&self, device: &str, secret: &str) -> bool {
        let want = self
            .by_device
            .read()
            .ok()
            .and_then(|m| m.get(device).copied());
        want.is_some_and(|w| w == digest(secret))
    }

    pub fn set(&self, device: &str, digest: Digest32) {
        if let Ok(mut m) = self.by_device.write() {
            m.insert(device.to_owned(), digest);
        }
    }

    pub fn remove(&self, device: &str) {
        if let Ok(mut m) = self.by_device.write() {
            m.remove(device);
        }
    }

    pub fn len(&self) -> usize {
        self.by_device.read().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the operator token came from, so `serve` can tell the operator where to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Config,
    Env,
    /// Read from, or generated into, this file.
    File(PathBuf),
}

/// Environment variable that sets the operator token.
pub const TOKEN_ENV: &str = "FLEETGATE_API_TOKEN";
/// File in the data dir holding the generated operator token.
pub const TOKEN_FILE: &str = "api-token";

/// Picks the operator token: config, else environment, else the token file in `data_dir`
/// (generated with mode 0600 on first start).
pub fn operator_token(
    from_config: Option<&str>,
    from_env: Option<String>,
    data_dir: &Path,
) -> std::io::Result<(String, TokenSource)> {
    if let Some(t) = from_config {
        return Ok((t.to_owned(), TokenSource::Config));
    }
    if let Some(t) = from_env.filter(|t| !t.trim().is_empty()) {
        return Ok((t.trim().to_owned(), TokenSource::Env));
    }
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            check_private(&path)?;
            return Ok((text.trim().to_owned(), TokenSource::File(path)));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let token = new_secret()?;
    write_private(&path, &token)?;
    Ok((token, TokenSource::File(path)))
}

/// Writes `contents` to a new file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Refuses a secret file that others can read.
pub fn check_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is readable by others (mode {:o}); run `chmod 600` on it",
                    path.display(),
                    mode & 0o777
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
