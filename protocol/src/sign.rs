//! Signed documents. A signature covers a domain tag and the exact encoded bytes of the
//! document, so a signature over one kind of document never verifies as another, and nothing
//! is decoded before its signatures are checked.
//!
//! Signatures carry the id of their key; verification takes the trusted public keys and a
//! threshold: at least `threshold` distinct trusted keys must have signed. Signatures by unknown
//! keys are ignored, and one key counts once however often it signed.

use alloc::vec::Vec;

use ed25519_dalek::{Signer, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The key type that signs documents, re-exported so that signers need not depend on
/// ed25519-dalek themselves.
pub use ed25519_dalek::SigningKey;

/// What kind of document a signature is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// An update manifest (a model or firmware release).
    Manifest,
    /// A rollback directive for one device.
    Rollback,
    /// The requirements a release must meet on bench devices (`validation::Requirements`).
    Requirements,
    /// A request of central operations to a site, through the site's upstream broker (a
    /// rollout to start or steer; docs/uplink.md).
    SiteRequest,
}

impl Domain {
    pub const fn tag(self) -> &'static [u8] {
        match self {
            Domain::Manifest => b"fleetgate/manifest/v1",
            Domain::Rollback => b"fleetgate/rollback/v1",
            Domain::Requirements => b"fleetgate/requirements/v1",
            Domain::SiteRequest => b"fleetgate/site-request/v1",
        }
    }
}

pub type KeyId = [u8; 8];

/// A key's id: the first 8 bytes of the SHA-256 of its public key.
pub fn key_id(public: &[u8; 32]) -> KeyId {
    let digest: [u8; 32] = Sha256::digest(public).into();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    id
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    #[serde(with = "crate::bytes::array")]
    pub key_id: KeyId,
    #[serde(with = "crate::bytes::array")]
    pub signature: [u8; 64],
}

/// A document's encoded bytes and their signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    #[serde(with = "crate::bytes::vec")]
    pub body: Vec<u8>,
    pub signatures: Vec<Signature>,
}

/// Most signatures a document may carry (checking them costs time on a device).
pub const MAX_SIGNATURES: usize = 8;

/// Why signatures did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
    #[error("not signed by any trusted key")]
    NoTrustedSignature,
    #[error("a trusted key's signature does not match the document (tampered?)")]
    BadSignature,
    #[error("{valid} valid signature(s) from distinct trusted keys, {needed} needed")]
    BelowThreshold { valid: usize, needed: usize },
}

fn message(domain: Domain, body: &[u8]) -> Vec<u8> {
    let tag = domain.tag();
    let mut m = Vec::with_capacity(1 + tag.len() + body.len());
    m.push(tag.len() as u8);
    m.extend_from_slice(tag);
    m.extend_from_slice(body);
    m
}

impl Signed {
    /// Signs `body` as a `domain` document with every key.
    pub fn sign(domain: Domain, body: Vec<u8>, keys: &[SigningKey]) -> Signed {
        let mut signed = Signed {
            body,
            signatures: Vec::new(),
        };
        for key in keys {
            signed.add_signature(domain, key);
        }
        signed
    }

    /// Adds (or replaces) `key`'s signature: co-signing by another holder of a release key.
    pub fn add_signature(&mut self, domain: Domain, key: &SigningKey) {
        let id = key_id(key.verifying_key().as_bytes());
        let signature = key.sign(&message(domain, &self.body)).to_bytes();
        self.signatures.retain(|s| s.key_id != id);
        self.signatures.push(Signature {
            key_id: id,
            signature,
        });
    }

    /// Checks the signatures against `trusted` public keys and returns the body if at least
    /// `threshold` (at least 1) distinct trusted keys signed it.
    pub fn verify(
        &self,
        domain: Domain,
        trusted: &[[u8; 32]],
        threshold: usize,
    ) -> Result<&[u8], SigError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(SigError::TooManySignatures);
        }
        let needed = threshold.max(1);
        let msg = message(domain, &self.body);
        let mut seen: Vec<KeyId> = Vec::new();
        let (mut valid, mut bad) = (0, 0);
        for sig in &self.signatures {
            if seen.contains(&sig.key_id) {
                continue;
            }
            seen.push(sig.key_id);
            let Some(public) = trusted.iter().find(|k| key_id(k) == sig.key_id) else {
                continue;
            };
            let ok = VerifyingKey::from_bytes(public).is_ok_and(|vk| {
                let s = ed25519_dalek::Signature::from_bytes(&sig.signature);
                vk.verify_strict(&msg, &s).is_ok()
            });
            if ok {
                valid += 1;
            } else {
                bad += 1;
            }
        }
        if valid >= needed {
            Ok(&self.body)
        } else if bad > 0 {
            Err(SigError::BadSignature)
        } else if valid == 0 {
            Err(SigError::NoTrustedSignature)
        } else {
            Err(SigError::BelowThreshold { valid, needed })
        }
    }
}

#[cfg(test)]
mod tests;
