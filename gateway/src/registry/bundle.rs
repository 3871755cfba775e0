//! The bundle file: what `fleetgate bundle sign` writes and the registry accepts. It holds the
//! signed manifest, the artifact and the operator's annotations (lineage, tags), which are not
//! signed: devices only ever see the signed manifest and the artifact.
//!
//! Layout: the 8 bytes `FGBUNDLE`, a format byte (1), then the postcard encoding of
//! [`BundleFile`]. It is a file format between the CLI and the gateway, not a device message.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use fleetgate_protocol::manifest::ManifestSpec;
use fleetgate_protocol::{Domain, Encoding, Manifest, Signed, encode};
use serde::{Deserialize, Serialize};

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
