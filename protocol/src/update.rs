//! What a device must check before, while and after it downloads an update. Runs on the
//! device (no_std); the simulator uses the same code.
//!
//! 1. [`check_offer`]: signatures (threshold of distinct trusted keys), then the manifest
//!    decodes and is sane, is not expired at the device's time, is newer than what is installed
//!    (anti-rollback), fits the hardware, and is not larger than the device allows.
//! 2. [`Download::accept`] per chunk: in order, the right length, and in the signed Merkle tree.
//! 3. [`Download::finish`]: every chunk, the signed size, the signed SHA-256 of the whole.
//!
//! Every failure is a distinct [`UpdateError`], which the device reports to the gateway.

use alloc::format;
use alloc::string::String;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{Encoding, decode};
use crate::manifest::Manifest;
use crate::merkle;
use crate::sign::{Domain, SigError, Signed};

/// Why a device refused or abandoned an update. Append-only (the code travels in reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateError {
    /// No signature from a key the device trusts.
    NoTrustedSignature,
    /// A trusted key's signature does not match: the manifest was altered.
    BadSignature,
    /// Fewer distinct trusted keys signed than the device requires.
    BelowThreshold,
    /// The signed body is not a valid manifest.
    MalformedManifest,
    /// The manifest's expiry is before the device's time.
    Expired,
    /// Not newer than the installed release of the same artifact.
    Downgrade,
    /// The artifact is for other hardware.
    Incompatible,
    /// Larger than the device can hold.
    TooLarge,
    /// A chunk index beyond the artifact.
    ChunkOutOfRange,
    /// A chunk shorter or longer than the manifest says.
    Truncated,
    /// A chunk that is not in the signed Merkle tree.
    ChunkHash,
    /// `finish` before every chunk arrived.
    Incomplete,
    /// The whole artifact's SHA-256 differs from the signed one.
    FinalHash,
    /// The device (or its user) declined the update.
    Declined,
    /// Writing or activating the new image failed.
    InstallFailed,
}

impl UpdateError {
    pub const fn name(self) -> &'static str {
        match self {
            UpdateError::NoTrustedSignature => "no_trusted_signature",
            UpdateError::BadSignature => "bad_signature",
            UpdateError::BelowThreshold => "below_threshold",
            UpdateError::MalformedManifest => "malformed_manifest",
            UpdateError::Expired => "expired",
            UpdateError::Downgrade => "downgrade",
            UpdateError::Incompatible => "incompatible",
            UpdateError::TooLarge => "too_large",
            UpdateError::ChunkOutOfRange => "chunk_out_of_range",
            UpdateError::Truncated => "truncated",
            UpdateError::ChunkHash => "chunk_hash",
            UpdateError::Incomplete => "incomplete",
            UpdateError::FinalHash => "final_hash",
            UpdateError::Declined => "declined",
            UpdateError::InstallFailed => "install_failed",
        }
    }
}

/// A refusal with its reason and a human-readable detail for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: UpdateError,
    pub detail: String,
}

fn fail<T>(code: UpdateError, detail: String) -> Result<T, Failure> {
    Err(Failure { code, detail })
}

/// What the device trusts and can hold.
#[derive(Debug, Clone, Copy)]
pub struct DevicePolicy<'a> {
    pub trusted_keys: &'a [[u8; 32]],
    /// Distinct trusted keys that must have signed (at least 1).
    pub threshold: usize,
    pub hardware: &'a crate::HardwareProfile,
    pub max_size: u64,
}

/// Verifies a signed manifest before downloading anything. `now_ms` is the device's time;
/// `installed_release` is the release counter of the installed artifact of the manifest's
/// kind and name (0 when none is installed), looked up by the caller.
pub fn check_offer(
    signed: &Signed,
    policy: &DevicePolicy<'_>,
    now_ms: u64,
    installed_release: impl FnOnce(&Manifest) -> u64,
) -> Result<Manifest, Failure> {
    let body = signed
        .verify(Domain::Manifest, policy.trusted_keys, policy.threshold)
        .map_err(|e| {
            let code = match e {
                SigError::NoTrustedSignature => UpdateError::NoTrustedSignature,
                SigError::BelowThreshold { .. } => UpdateError::BelowThreshold,
                SigError::BadSignature | SigError::TooManySignatures => UpdateError::BadSignature,
            };
            Failure {
                code,
                detail: format!("{e}"),
            }
        })?;
    let manifest: Manifest = decode(body, Encoding::Postcard).map_err(|e| Failure {
        code: UpdateError::MalformedManifest,
        detail: format!("{e}"),
    })?;
    if now_ms >= manifest.expires_ms {
        return fail(
            UpdateError::Expired,
            format!(
                "expired at {} ms, device time {now_ms} ms",
                manifest.expires_ms
            ),
        );
    }
    let installed = installed_release(&manifest);
    if manifest.release <= installed {
        return fail(
            UpdateError::Downgrade,
            format!(
                "release {} is not newer than installed {installed}",
                manifest.release
            ),
        );
    }
    if let Err(m) = manifest.compat.check(policy.hardware) {
        return fail(UpdateError::Incompatible, format!("{m}"));
    }
    if manifest.size > policy.max_size {
        return fail(
            UpdateError::TooLarge,
            format!("{} bytes, device holds {}", manifest.size, policy.max_size),
        );
    }
    Ok(manifest)
}

/// What happened to one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Verified; its bytes go to storage at the chunk's offset.
    Stored,
    /// Already have it (a redelivery): ignore.
    Duplicate,
    /// Ahead of the next expected chunk: ignore; the device asks again from `next_chunk`.
    Ahead,
}

/// A download in progress. Chunks are taken in order, so the running SHA-256 covers exactly
/// the stored prefix; after a reboot, [`Download::restore`] rebuilds it from the stored bytes.
#[derive(Debug, Clone)]
pub struct Download {
    manifest: Manifest,
    next: u64,
    received: u64,
    hasher: Sha256,
}

impl Download {
    pub fn new(manifest: Manifest) -> Download {
        Download {
            manifest,
            next: 0,
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Resumes after a reboot from the chunks already stored (already verified when they
    /// arrived), given in order.
    pub fn restore<'c>(manifest: Manifest, stored: impl IntoIterator<Item = &'c [u8]>) -> Download {
        let mut d = Download::new(manifest);
        for chunk in stored {
            d.hasher.update(chunk);
            d.received += chunk.len() as u64;
            d.next += 1;
        }
        d
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The first chunk not yet stored: where a resumed download starts.
    pub fn next_chunk(&self) -> u64 {
        self.next
    }

    pub fn is_complete(&self) -> bool {
        self.next >= self.manifest.chunk_count()
    }

    /// Checks one chunk. On [`Accepted::Stored`] the caller stores `data`.
    pub fn accept(
        &mut self,
        index: u64,
        data: &[u8],
        proof: &[merkle::Hash],
    ) -> Result<Accepted, Failure> {
        let count = self.manifest.chunk_count();
        if index >= count {
            return fail(
                UpdateError::ChunkOutOfRange,
                format!("chunk {index} of {count}"),
            );
        }
        if index < self.next {
            return Ok(Accepted::Duplicate);
        }
        if index > self.next {
            return Ok(Accepted::Ahead);
        }
        let want = self.manifest.chunk_len(index);
        if data.len() as u64 != want {
            return fail(
                UpdateError::Truncated,
                format!("chunk {index} has {} bytes, {want} expected", data.len()),
            );
        }
        if !merkle::verify(
            &self.manifest.merkle_root,
            index,
            count,
            merkle::leaf(data),
            proof,
        ) {
            return fail(
                UpdateError::ChunkHash,
                format!("chunk {index} is not in the signed tree"),
            );
        }
        self.hasher.update(data);
        self.received += data.len() as u64;
        self.next += 1;
        Ok(Accepted::Stored)
    }

    /// Checks the whole artifact once every chunk is stored.
    pub fn finish(self) -> Result<Manifest, Failure> {
        if !self.is_complete() {
            return fail(
                UpdateError::Incomplete,
                format!("{} of {} chunks", self.next, self.manifest.chunk_count()),
            );
        }
        if self.received != self.manifest.size {
            return fail(
                UpdateError::Truncated,
                format!("{} bytes, {} signed", self.received, self.manifest.size),
            );
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        if digest != self.manifest.sha256 {
            return fail(
                UpdateError::FinalHash,
                String::from("SHA-256 of the artifact differs from the manifest"),
            );
        }
        Ok(self.manifest)
    }
}

#[cfg(test)]
mod tests;
