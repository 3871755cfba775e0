//! The update manifest: what a release is, what it runs on, and how to check every byte of it.
//! It travels as the body of a [`Signed`](crate::sign::Signed) document in the
//! [`Domain::Manifest`](crate::sign::Domain) domain, encoded like every postcard message (a
//! format byte, then postcard).

use alloc::string::String;
use alloc::vec::Vec;

use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::limits::{self, Invalid, Validate};
use crate::merkle;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Model,
    Firmware,
}

impl ArtifactKind {
    pub const fn name(self) -> &'static str {
        match self {
            ArtifactKind::Model => "model",
            ArtifactKind::Firmware => "firmware",
        }
    }

    pub fn from_name(name: &str) -> Option<ArtifactKind> {
        [ArtifactKind::Model, ArtifactKind::Firmware]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// A runtime the artifact needs, at least at `min_version` (e.g. `tflm` 2.14).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeReq {
    pub name: String,
    pub min_version: Version,
}

/// Which devices an artifact is for. Empty lists and zeros mean "any".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compat {
    /// Device classes (`HardwareProfile::class`) the artifact runs on.
    pub classes: Vec<String>,
    /// CPU architecture (`HardwareProfile::arch`).
    pub arch: Option<String>,
    pub min_ram_bytes: u64,
    pub min_flash_bytes: u64,
    pub runtime: Option<RuntimeReq>,
}

/// Which compatibility rule a device fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("device class is not one of the artifact's classes")]
    Class,
    #[error("architecture differs")]
    Arch,
    #[error("not enough RAM")]
    Ram,
    #[error("not enough flash")]
    Flash,
    #[error("required runtime missing or too old")]
    Runtime,
}

impl Compat {
    /// Whether a device with `hw` can run the artifact.
    pub fn check(&self, hw: &crate::HardwareProfile) -> Result<(), Mismatch> {
        if !self.classes.is_empty() && !self.classes.contains(&hw.class) {
            return Err(Mismatch::Class);
        }
        if self.arch.as_ref().is_some_and(|a| *a != hw.arch) {
            return Err(Mismatch::Arch);
        }
        if hw.ram_bytes < self.min_ram_bytes {
            return Err(Mismatch::Ram);
        }
        if hw.flash_bytes < self.min_flash_bytes {
            return Err(Mismatch::Flash);
        }
        if let Some(req) = &self.runtime {
            let ok = hw
                .runtime
                .as_ref()
                .is_some_and(|rt| rt.name == req.name && rt.version >= req.min_version);
            if !ok {
                return Err(Mismatch::Runtime);
            }
        }
        Ok(())
    }
}

/// Largest artifact a manifest may describe.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 32;
/// Chunk sizes allowed in a manifest.
pub const MIN_CHUNK: u32 = 256;
pub const MAX_CHUNK: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    /// Monotonic per artifact name: a device installs only a release greater than its own.
    pub release: u64,
    pub compat: Compat,
    pub size: u64,
    #[serde(with = "crate::bytes::array")]
    pub sha256: [u8; 32],
    pub chunk_size: u32,
    /// Root of the Merkle tree over the chunks (see [`crate::merkle`]).
    #[serde(with = "crate::bytes::array")]
    pub merkle_root: [u8; 32],
    pub created_ms: u64,
    pub expires_ms: u64,
}

/// What a manifest is made from, besides the artifact bytes.
#[derive(Debug, Clone)]
pub struct ManifestSpec {
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    pub release: u64,
    pub compat: Compat,
    pub chunk_size: u32,
    pub created_ms: u64,
    pub expires_ms: u64,
}

impl Manifest {
    /// Describes `artifact`: size, SHA-256 and the Merkle root of its chunks.
    pub fn build(spec: ManifestSpec, artifact: &[u8]) -> Manifest {
        let leaves = chunk_leaves(artifact, spec.chunk_size);
        Manifest {
            kind: spec.kind,
            name: spec.name,
            version: spec.version,
            release: spec.release,
            compat: spec.compat,
            size: artifact.len() as u64,
            sha256: Sha256::digest(artifact).into(),
            chunk_size: spec.chunk_size,
            merkle_root: merkle::root(&leaves),
            created_ms: spec.created_ms,
            expires_ms: spec.expires_ms,
        }
    }

    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index * u64::from(self.chunk_size);
        self.size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }
}

/// Leaf hashes of `artifact` cut into `chunk_size` pieces.
pub fn chunk_leaves(artifact: &[u8], chunk_size: u32) -> Vec<merkle::Hash> {
    artifact
        .chunks(chunk_size.max(1) as usize)
        .map(merkle::leaf)
        .collect()
}

impl Validate for Manifest {
    fn validate(&self) -> Result<(), Invalid> {
        limits::name("name", &self.name)?;
        limits::count(
            "compat.classes",
            self.compat.classes.len(),
            limits::MAX_MODELS * 2,
        )?;
        for class in &self.compat.classes {
            limits::name("compat.classes", class)?;
        }
        if let Some(arch) = &self.compat.arch {
            limits::name("compat.arch", arch)?;
        }
        if let Some(rt) = &self.compat.runtime {
            limits::name("compat.runtime.name", &rt.name)?;
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(Invalid::new("chunk_size", "must be within 256 B..=1 MiB"));
        }
        if self.size > MAX_ARTIFACT_BYTES {
            return Err(Invalid::new("size", "is over 4 GiB"));
        }
        if self.expires_ms <= self.created_ms {
            return Err(Invalid::new("expires_ms", "must be after created_ms"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
