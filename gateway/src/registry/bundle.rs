//! The bundle file: what `fleetgate bundle sign` writes and the registry accepts. It holds the
//! signed manifest, the artifact and the operator's annotations (lineage, tags), which are not
//! signed: devices only ever see the signed manifest and the artifact.
//!
//! Layout: the 8 bytes `FGBUNDLE`, a format byte (1), then the postcard encoding of
//! [`BundleFile`]. It is a file format between the CLI and the gateway, not a device message.
//! docs/bundle-format.md describes it byte by byte, with a test vector that `tests.rs` checks.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use fleetgate_protocol::manifest::{ManifestSpec, chunk_leaves};
use fleetgate_protocol::sign::{KeyId, key_id};
use fleetgate_protocol::{Domain, Encoding, Manifest, Signed, decode, encode, merkle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"FGBUNDLE";
pub const FORMAT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleFile {
    pub manifest: Signed,
    #[serde(with = "serde_bytes_vec")]
    pub artifact: Vec<u8>,
    pub lineage: BTreeMap<String, String>,
    pub tags: Vec<String>,
}

/// Bytes as a postcard byte string rather than a sequence of u8 (one length, then the bytes).
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("not a fleetgate bundle (no FGBUNDLE header)")]
    NotABundle,
    #[error("bundle format {0} is not supported (this gateway reads format {FORMAT})")]
    Format(u8),
    #[error("bundle does not decode: {0}")]
    Decode(String),
    #[error("the manifest is not valid: {0}")]
    Manifest(String),
    #[error("the artifact does not match the manifest: {0}")]
    Artifact(String),
}

/// What one signature of a bundle's manifest is worth, given the keys the checker trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureStatus {
    /// By a trusted key, and it verifies.
    Valid,
    /// By a trusted key, and it does not verify: the manifest or the signature was changed.
    Invalid,
    /// By a key the checker was not given: it cannot be checked.
    Unknown,
}

impl SignatureStatus {
    pub fn name(self) -> &'static str {
        match self {
            SignatureStatus::Valid => "valid",
            SignatureStatus::Invalid => "invalid",
            SignatureStatus::Unknown => "unknown key",
        }
    }
}

impl BundleFile {
    /// Builds the manifest of `artifact` and signs it with every key.
    pub fn sign(
        artifact: Vec<u8>,
        spec: ManifestSpec,
        keys: &[SigningKey],
        lineage: BTreeMap<String, String>,
        tags: Vec<String>,
    ) -> BundleFile {
        let manifest = Manifest::build(spec, &artifact);
        // A manifest is our own plain struct: encoding cannot fail.
        let body = encode(&manifest, Encoding::Postcard).expect("manifest encodes");
        BundleFile {
            manifest: Signed::sign(Domain::Manifest, body, keys),
            artifact,
            lineage,
            tags,
        }
    }

    /// The manifest, decoded and validated (signatures are not checked here).
    pub fn manifest(&self) -> Result<Manifest, BundleError> {
        decode(&self.manifest.body, Encoding::Postcard)
            .map_err(|e| BundleError::Manifest(e.to_string()))
    }

    /// Checks the artifact against the manifest exactly as the registry and devices do: size,
    /// SHA-256, and the Merkle root of its chunks. Returns the manifest.
    pub fn check_artifact(&self) -> Result<Manifest, BundleError> {
        let m = self.manifest()?;
        let size = self.artifact.len() as u64;
        if size != m.size {
            return Err(BundleError::Artifact(format!(
                "it is {size} bytes, the manifest says {}",
                m.size
            )));
        }
        let digest: [u8; 32] = Sha256::digest(&self.artifact).into();
        if digest != m.sha256 {
            return Err(BundleError::Artifact("its SHA-256 differs".to_owned()));
        }
        if merkle::root(&chunk_leaves(&self.artifact, m.chunk_size)) != m.merkle_root {
            return Err(BundleError::Artifact(
                "its chunks do not match the Merkle root".to_owned(),
            ));
        }
        Ok(m)
    }

    /// Each signature's key id and what it is worth against `trusted` public keys.
    pub fn signatures(&self, trusted: &[[u8; 32]]) -> Vec<(KeyId, SignatureStatus)> {
        self.manifest
            .signatures
            .iter()
            .map(|sig| {
                let status = match trusted.iter().find(|k| key_id(k) == sig.key_id) {
                    None => SignatureStatus::Unknown,
                    Some(public) => {
                        let one = Signed {
                            body: self.manifest.body.clone(),
                            signatures: vec![sig.clone()],
                        };
                        match one.verify(Domain::Manifest, &[*public], 1) {
                            Ok(_) => SignatureStatus::Valid,
                            Err(_) => SignatureStatus::Invalid,
                        }
                    }
                };
                (sig.key_id, status)
            })
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.artifact.len() + 1024);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        // Our own plain struct into a Vec: cannot fail.
        postcard::to_io(self, &mut out).expect("postcard encoding of a bundle");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BundleFile, BundleError> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(BundleError::NotABundle)?;
        let (&format, body) = rest.split_first().ok_or(BundleError::NotABundle)?;
        if format != FORMAT {
            return Err(BundleError::Format(format));
        }
        let (bundle, tail) =
            postcard::take_from_bytes(body).map_err(|e| BundleError::Decode(e.to_string()))?;
        if !tail.is_empty() {
            return Err(BundleError::Decode(format!(
                "{} trailing bytes",
                tail.len()
            )));
        }
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests;
