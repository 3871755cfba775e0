//! Secrets: device credentials, and operator API tokens with their roles.
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

/// What an operator token may do. Each role may do everything the roles before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Every read: devices, telemetry, alerts, registry, drift, rollouts, metrics.
    ReadOnly,
    /// Also rollouts (create, pause, resume, abort, roll back), updates, commands to devices,
    /// alert acknowledgement and resolution.
    Operator,
    /// Also enrollment and credentials, the registry (bundles, aliases), tokens and the audit
    /// log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::ReadOnly, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`: expected read-only, operator or admin"))
    }
}

/// Who presented a token: its name (recorded with every change it makes) and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Name of the token from the config, the environment or the token file: always an admin.
pub const BOOTSTRAP_TOKEN: &str = "bootstrap";

/// Checks a token name: 1 to 64 characters of `a-z 0-9 - _ .`, not the bootstrap token's.
pub fn check_token_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("token name must be 1 to 64 characters".to_owned());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "token name `{name}` may contain only a-z, 0-9, `-`, `_` and `.`"
        ));
    }
    if name == BOOTSTRAP_TOKEN {
        return Err(format!("`{BOOTSTRAP_TOKEN}` names the configured token"));
    }
    Ok(())
}

/// The digests of valid operator tokens, read on every API request. The API updates it after
/// each token change is committed.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: RwLock<HashMap<Digest32, Caller>>,
}

impl Tokens {
    pub fn check(&self, token: &str) -> Option<Caller> {
        let d = digest(token);
        self.by_digest.read().ok()?.get(&d).cloned()
    }

    pub fn insert(&self, digest: Digest32, caller: Caller) {
        if let Ok(mut m) = self.by_digest.write() {
            m.insert(digest, caller);
        }
    }

    /// Forgets the token called `name`; true if there was one.
    pub fn remove(&self, name: &str) -> bool {
        self.by_digest.write().is_ok_and(|mut m| {
            let before = m.len();
            m.retain(|_, c| c.name != name);
            m.len() != before
        })
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

/// Creates (or truncates) a file readable by its owner only.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Writes `contents` to a new file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut file = create_private(path)?;
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
