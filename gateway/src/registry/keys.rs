//! Release keys: ed25519 key pairs for signing bundles offline. The private key is a PKCS#8
//! PEM file readable by its owner only (`openssl pkey -in KEY -text` reads it); the public key
//! is written as 64 hex characters, the form `registry.trusted_keys` and devices take.

use std::path::Path;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};

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

/// Writes `key` to `<stem>.key` (PKCS#8 PEM, mode 0600) and its public half to `<stem>.pub`
/// (hex); refuses to overwrite an existing key.
pub fn write(key: &SigningKey, stem: &Path) -> Result<(), KeyError> {
    let private = stem.with_extension("key");
    let public = stem.with_extension("pub");
    if private.exists() {
        return Err(file_err(&private, "exists already; not overwriting a key"));
    }
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| file_err(&private, e))?;
    auth::write_private(&private, pem.trim_end()).map_err(|e| file_err(&private, e))?;
    std::fs::write(
        &public,
        format!("{}\n", hex(key.verifying_key().as_bytes())),
    )
    .map_err(|e| file_err(&public, e))
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

/// Reads a private key, refusing a file others can read.
pub fn read(path: &Path) -> Result<SigningKey, KeyError> {
    auth::check_private(path).map_err(|e| file_err(path, e))?;
    let pem = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| file_err(path, format!("not an ed25519 PKCS#8 private key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_or_create_makes_the_key_once_then_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("rollback");
        let first = load_or_create(&stem).unwrap();
        let again = load_or_create(&stem).unwrap();
        assert_eq!(first.to_bytes(), again.to_bytes());
        let public = std::fs::read_to_string(stem.with_extension("pub")).unwrap();
        assert_eq!(public.trim(), hex(first.verifying_key().as_bytes()));
    }

    #[test]
    fn a_generated_key_round_trips_and_its_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("release");
        let key = generate().unwrap();
        write(&key, &stem).unwrap();
        let back = read(&stem.with_extension("key")).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let public = std::fs::read_to_string(stem.with_extension("pub")).unwrap();
        assert_eq!(public.trim(), hex(key.verifying_key().as_bytes()));
        assert_eq!(
            fleetgate_config::parse_key(public.trim()).unwrap(),
            key.verifying_key().to_bytes()
        );
        assert!(
            std::fs::read_to_string(stem.with_extension("key"))
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );

        let again = write(&generate().unwrap(), &stem).unwrap_err();
        assert!(
            again
                .to_string()
                .ends_with("exists already; not overwriting a key"),
            "{again}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = stem.with_extension("key");
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(
                read(&path)
                    .unwrap_err()
                    .to_string()
                    .contains("readable by others")
            );
        }
    }
}
