//! The bundle file: what `fleetgate bundle sign` writes and the registry accepts. It holds the
//! signed manifest, the artifact and the operator's annotations (lineage, tags), which are not
//! signed: devices only ever see the signed manifest and the artifact.
//!
//! Layout: the 8 bytes `FGBUNDLE`, a format byte (1), then the postcard encoding of
//! [`BundleFile`]. A bundle carrying signed requirements (and a golden set) is format 2: the
//! same, followed by a [`BundleValidation`]; one without is still written as format 1, byte for
//! byte what older gateways read. It is a file format between the CLI and the gateway, not a
//! device message. docs/bundle-format.md describes it byte by byte, with a test vector that
//! `tests.rs` checks.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use fleetgate_protocol::limits::Validate;
use fleetgate_protocol::manifest::{ManifestSpec, chunk_leaves};
use fleetgate_protocol::sign::{KeyId, key_id};
use fleetgate_protocol::validation::{GoldenSet, MAX_GOLDEN_BYTES, Requirement, Requirements};
use fleetgate_protocol::{Domain, Encoding, Manifest, Signed, decode, encode, merkle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"FGBUNDLE";
pub const FORMAT: u8 = 1;
/// Format 1 followed by a [`BundleValidation`].
pub const FORMAT_VALIDATION: u8 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleFile {
    pub manifest: Signed,
    #[serde(with = "serde_bytes_vec")]
    pub artifact: Vec<u8>,
    pub lineage: BTreeMap<String, String>,
    pub tags: Vec<String>,
    /// Format 2's section (encoded after the fields above, not as one of them).
    #[serde(skip)]
    pub validation: Option<BundleValidation>,
}

/// What a release must measure on bench devices: the signed requirements and the golden set
/// they name by hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleValidation {
    /// A [`Domain::Requirements`] document whose body is the encoded [`Requirements`].
    pub requirements: Signed,
    /// The encoded [`GoldenSet`] (format byte, then postcard), or empty for none.
    #[serde(with = "serde_bytes_vec")]
    pub golden: Vec<u8>,
}

/// The checked contents of a bundle's validation section.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub requirements: Requirements,
    pub golden: Option<GoldenSet>,
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
    #[error("bundle format {0} is not supported (this gateway reads formats 1 and 2)")]
    Format(u8),
    #[error("bundle does not decode: {0}")]
    Decode(String),
    #[error("the manifest is not valid: {0}")]
    Manifest(String),
    #[error("the artifact does not match the manifest: {0}")]
    Artifact(String),
    #[error("the requirements are not valid: {0}")]
    Requirements(String),
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
            validation: None,
        }
    }

    /// Adds requirements (and a golden set) signed by every key, bound to this bundle's
    /// manifest.
    pub fn require(
        &mut self,
        rules: Vec<Requirement>,
        golden: Option<&GoldenSet>,
        keys: &[SigningKey],
    ) -> Result<(), BundleError> {
        let golden = match golden {
            Some(g) => {
                g.validate()
                    .map_err(|e| BundleError::Requirements(format!("golden set: {e}")))?;
                let bytes = encode(g, Encoding::Postcard)
                    .map_err(|e| BundleError::Requirements(e.to_string()))?;
                if bytes.len() > MAX_GOLDEN_BYTES {
                    return Err(BundleError::Requirements(format!(
                        "the golden set is {} bytes encoded, at most {MAX_GOLDEN_BYTES}",
                        bytes.len()
                    )));
                }
                bytes
            }
            None => Vec::new(),
        };
        let doc = Requirements {
            manifest_sha256: Sha256::digest(&self.manifest.body).into(),
            golden_sha256: golden_digest(&golden),
            rules,
        };
        doc.validate()
            .map_err(|e| BundleError::Requirements(e.to_string()))?;
        let body = encode(&doc, Encoding::Postcard)
            .map_err(|e| BundleError::Requirements(e.to_string()))?;
        self.validation = Some(BundleValidation {
            requirements: Signed::sign(Domain::Requirements, body, keys),
            golden,
        });
        Ok(())
    }

    /// Checks the validation section against `trusted` keys (as the manifest's signatures are
    /// checked): signed by at least `threshold` of them, bound to this manifest, the golden set
    /// the one named. `None` for a bundle without one.
    pub fn check_requirements(
        &self,
        trusted: &[[u8; 32]],
        threshold: usize,
    ) -> Result<Option<Checked>, BundleError> {
        let Some(v) = &self.validation else {
            return Ok(None);
        };
        // Signatures first: nothing of an unsigned document is decoded.
        v.requirements
            .verify(Domain::Requirements, trusted, threshold)
            .map_err(|e| BundleError::Requirements(format!("signatures: {e}")))?;
        self.requirements_unchecked()
    }

    /// The validation section decoded and bound to the manifest, signatures not checked.
    pub fn requirements_unchecked(&self) -> Result<Option<Checked>, BundleError> {
        let Some(v) = &self.validation else {
            return Ok(None);
        };
        let doc: Requirements = decode(&v.requirements.body, Encoding::Postcard)
            .map_err(|e| BundleError::Requirements(e.to_string()))?;
        let manifest: [u8; 32] = Sha256::digest(&self.manifest.body).into();
        if doc.manifest_sha256 != manifest {
            return Err(BundleError::Requirements(
                "they were signed for another manifest".to_owned(),
            ));
        }
        if doc.golden_sha256 != golden_digest(&v.golden) {
            return Err(BundleError::Requirements(
                "the golden set is not the one they name".to_owned(),
            ));
        }
        let golden = if v.golden.is_empty() {
            None
        } else {
            let g: GoldenSet = decode(&v.golden, Encoding::Postcard)
                .map_err(|e| BundleError::Requirements(format!("golden set: {e}")))?;
            g.validate()
                .map_err(|e| BundleError::Requirements(format!("golden set: {e}")))?;
            Some(g)
        };
        Ok(Some(Checked {
            requirements: doc,
            golden,
        }))
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
        out.push(match self.validation {
            None => FORMAT,
            Some(_) => FORMAT_VALIDATION,
        });
        // Our own plain structs into a Vec: cannot fail.
        postcard::to_io(self, &mut out).expect("postcard encoding of a bundle");
        if let Some(v) = &self.validation {
            postcard::to_io(v, &mut out).expect("postcard encoding of a bundle");
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BundleFile, BundleError> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(BundleError::NotABundle)?;
        let (&format, body) = rest.split_first().ok_or(BundleError::NotABundle)?;
        if format != FORMAT && format != FORMAT_VALIDATION {
            return Err(BundleError::Format(format));
        }
        let (mut bundle, mut tail): (BundleFile, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| BundleError::Decode(e.to_string()))?;
        if format == FORMAT_VALIDATION {
            let (v, rest) = postcard::take_from_bytes(tail)
                .map_err(|e| BundleError::Decode(format!("validation section: {e}")))?;
            bundle.validation = Some(v);
            tail = rest;
        }
        if !tail.is_empty() {
            return Err(BundleError::Decode(format!(
                "{} trailing bytes",
                tail.len()
            )));
        }
        Ok(bundle)
    }
}

/// The SHA-256 of an encoded golden set; all zeros for none.
fn golden_digest(golden: &[u8]) -> [u8; 32] {
    if golden.is_empty() {
        [0; 32]
    } else {
        Sha256::digest(golden).into()
    }
}

#[cfg(test)]
mod tests;
