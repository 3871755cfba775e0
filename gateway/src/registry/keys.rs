//! Release keys: ed25519 key pairs for signing bundles offline. The private key is a PKCS#8
//! v1 PEM file (RFC 8410, the form `openssl genpkey -algorithm ed25519` writes and OpenSSL 3
//! and Python's `cryptography` load) readable by its owner only; the public key is written as
//! 64 hex characters, the form `registry.trusted_keys` and devices take.
//!
//! Keys written by earlier versions (PKCS#8 v2 with the public key attached, which OpenSSL 3
//! refuses) are still read.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};

use crate::auth;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

fn file_err(path: &Path, message: impl ToString) -> KeyError {
    KeyError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random key pair.
pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The private key as PKCS#8 v1 PEM: the 32-byte seed only, no public key attached.
pub fn to_pem(key: &SigningKey) -> Result<String, KeyError> {
    let v1 = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    let pem = v1
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Random(format!("encoding the key: {e}")))?;
    Ok(pem.trim_end().to_owned())
}

/// Creates `path` for writing; fails if anything is there already, a dangling symbolic link
/// included (`O_CREAT | O_EXCL` never follows one), so a key is never written through a link
/// an attacker planted or over an existing file.
fn create_new(path: &Path, mode: u32) -> Result<std::fs::File, KeyError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            file_err(path, "exists already; not overwriting a key")
        } else {
            file_err(path, e)
        }
    })
}

/// Writes `key` to `<stem>.key` (PKCS#8 v1 PEM, mode 0600) and its public half to `<stem>.pub`
/// (hex). Refuses if either path exists, even as a dangling symbolic link; on any failure
/// neither file is left behind.
pub fn write(key: &SigningKey, stem: &Path) -> Result<(), KeyError> {
    let private = stem.with_extension("key");
    let public = stem.with_extension("pub");
    for path in [&private, &public] {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(file_err(path, "exists already; not overwriting a key"));
        }
    }
    let pem = to_pem(key)?;
    let mut key_file = create_new(&private, 0o600)?;
    let mut pub_file = match create_new(&public, 0o644) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&private);
            return Err(e);
        }
    };
    // Both files are ours from here on: on failure, both go.
    let written = writeln!(pub_file, "{}", hex(key.verifying_key().as_bytes()))
        .and_then(|()| pub_file.sync_all())
        .map_err(|e| file_err(&public, e))
        .and_then(|()| {
            writeln!(key_file, "{pem}")
                .and_then(|()| key_file.sync_all())
                .map_err(|e| file_err(&private, e))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&private);
        let _ = std::fs::remove_file(&public);
    }
    written
}

/// Reads `<stem>.key`, or creates it (and `<stem>.pub`) on first use: the gateway's own key for
/// rollback directives.
pub fn load_or_create(stem: &Path) -> Result<SigningKey, KeyError> {
    let private = stem.with_extension("key");
    if private.exists() {
        return read(&private);
    }
    let key = generate()?;
    write(&key, stem)?;
    Ok(key)
}

/// Reads a private key (PKCS#8 v1 or v2 PEM), refusing a file others can read.
pub fn read(path: &Path) -> Result<SigningKey, KeyError> {
    auth::check_private(path).map_err(|e| file_err(path, e))?;
    let pem = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    SigningKey::from_pkcs8_pem(pem.trim())
        .map_err(|e| file_err(path, format!("not an ed25519 PKCS#8 private key: {e}")))
}

/// Reads a public key: 64 hex characters, given as such or in a file (a `.pub` from
/// `fleetgate keys generate`).
pub fn read_public(text_or_path: &str) -> Result<[u8; 32], KeyError> {
    if let Ok(key) = fleetgate_config::parse_key(text_or_path) {
        return Ok(key);
    }
    let path = Path::new(text_or_path);
    let text = std::fs::read_to_string(path).map_err(|e| {
        file_err(
            path,
            format!("{e} (expected 64 hex characters or a .pub file)"),
        )
    })?;
    fleetgate_config::parse_key(&text).map_err(|e| file_err(path, e))
}

#[cfg(test)]
mod tests;
