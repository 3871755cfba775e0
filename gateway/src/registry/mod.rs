//! The registry of model and firmware releases: signed bundles are checked and stored here,
//! artifacts once per content (by SHA-256) in `<data_dir>/artifacts/`, release records in redb.
//!
//! A bundle is accepted only if at least `registry.threshold` distinct keys of
//! `registry.trusted_keys` signed its manifest, the manifest is valid and unexpired, and the
//! artifact matches the manifest's size, SHA-256 and Merkle root exactly. Registry tables are
//! written here (from API requests); the ingest writer only reads them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use fleetgate_protocol::manifest::chunk_leaves;
use fleetgate_protocol::sign::SigError;
use fleetgate_protocol::{ArtifactKind, Compat, Domain, Encoding, Manifest, decode, merkle};
use sha2::{Digest, Sha256};

use crate::model::{ArtifactRecord, ReleaseRecord, Stamp};
use crate::storage::{StorageError, Store};

pub mod bundle;
pub mod keys;
pub mod mlflow;
pub mod spec;

use bundle::{BundleError, BundleFile};

/// Artifact bytes on disk, one file per SHA-256.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    pub fn new(data_dir: &Path) -> ArtifactStore {
        ArtifactStore {
            dir: data_dir.join("artifacts"),
        }
    }

    pub fn path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir.join(keys::hex(sha256))
    }

    /// Stores `data` under its hash (written to a temporary file, synced, then renamed, so a
    /// crash never leaves a partial artifact under a valid name). A no-op if it exists.
    pub fn put(&self, sha256: &[u8; 32], data: &[u8]) -> std::io::Result<()> {
        let path = self.path(sha256);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{}.tmp", keys::hex(sha256)));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Reads a whole artifact and checks it against its hash (the file could have been changed
    /// or damaged on disk since it was registered).
    pub fn read_verified(&self, sha256: &[u8; 32]) -> std::io::Result<Vec<u8>> {
        let data = std::fs::read(self.path(sha256))?;
        let digest: [u8; 32] = Sha256::digest(&data).into();
        if digest != *sha256 {
            return Err(std::io::Error::other(format!(
                "artifact {} is damaged on disk",
                keys::hex(sha256)
            )));
        }
        Ok(data)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("no trusted release keys are configured (registry.trusted_keys)")]
    NoTrustedKeys,
    #[error("bundle signatures: {0}")]
    Signature(SigError),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("the manifest expired at {0}")]
    Expired(String),
    #[error("artifact is {actual} bytes but the manifest says {signed} (truncated?)")]
    Size { actual: u64, signed: u64 },
    #[error("artifact SHA-256 differs from the manifest")]
    Hash,
    #[error("artifact chunks do not match the manifest's Merkle root")]
    Merkle,
    #[error("chunk size {0} is over registry.max_chunk_bytes ({1})")]
    ChunkSize(u32, usize),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("artifact store: {0}")]
    Io(#[from] std::io::Error),
}

/// Release counters follow version order within an artifact name: a device decides "newer" by
/// the counter, an operator by the version, and the two must never disagree. One counter
/// belongs to one version.
fn check_order(existing: &[ReleaseRecord], m: &Manifest) -> Result<(), RegisterError> {
    let what = format!("{} {}", m.kind.name(), m.name);
    for r in existing {
        if r.version == m.version {
            if r.release != m.release {
                return Err(RegisterError::Conflict(format!(
                    "version {} has release counter {}, this bundle says {}",
                    r.version, r.release, m.release
                )));
            }
            continue;
        }
        if r.release == m.release {
            return Err(RegisterError::Conflict(format!(
                "release counter {} of {what} is already used by version {}",
                m.release, r.version
            )));
        }
        if (m.version > r.version) != (m.release > r.release) {
            return Err(RegisterError::Conflict(format!(
                "release counter {} of {what} {} does not follow version order: {} has counter {}",
                m.release, m.version, r.version, r.release
            )));
        }
    }
    Ok(())
}

/// Whether one device could match both compatibility rules. Artifacts of one version are told
/// apart by hardware class alone: any other difference (RAM, runtime, architecture) still lets
/// a device of a shared class match both, or neither depending on details the operator cannot
/// see. An artifact for every class (no class list) overlaps everything.
fn overlap(a: &Compat, b: &Compat) -> bool {
    a.classes.is_empty() || b.classes.is_empty() || a.classes.iter().any(|c| b.classes.contains(c))
}

fn shared_class(a: &Compat, b: &Compat) -> String {
    a.classes
        .iter()
        .find(|c| b.classes.contains(c))
        .cloned()
        .unwrap_or_else(|| "(any class)".to_owned())
}

/// Registry settings and handles; cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    pub store: Store,
    pub artifacts: ArtifactStore,
    trusted_keys: Vec<[u8; 32]>,
    threshold: usize,
    max_chunk: usize,
}

/// What a registration did.
#[derive(Debug, Clone)]
pub struct Registered {
    pub release: ReleaseRecord,
    /// False when exactly this artifact was registered before (uploads are idempotent).
    pub created: bool,
}

impl Registry {
    pub fn new(store: Store, data_dir: &Path, cfg: &fleetgate_config::Registry) -> Registry {
        Registry {
            store,
            artifacts: ArtifactStore::new(data_dir),
            trusted_keys: cfg.trusted_keys.clone(),
            threshold: cfg.threshold,
            max_chunk: cfg.max_chunk_bytes,
        }
    }

    /// Checks and stores one bundle.
    pub fn register(
        &self,
        bytes: &[u8],
        now_ms: u64,
        by: &str,
    ) -> Result<Registered, RegisterError> {
        let bundle = BundleFile::decode(bytes)?;
        if self.trusted_keys.is_empty() {
            return Err(RegisterError::NoTrustedKeys);
        }
        let body = bundle
            .manifest
            .verify(Domain::Manifest, &self.trusted_keys, self.threshold)
            .map_err(RegisterError::Signature)?;
        let manifest: Manifest =
            decode(body, Encoding::Postcard).map_err(|e| RegisterError::Manifest(e.to_string()))?;
        if now_ms >= manifest.expires_ms {
            return Err(RegisterError::Expired(crate::clock::rfc3339(
                manifest.expires_ms,
            )));
        }
        if manifest.chunk_size as usize > self.max_chunk {
            return Err(RegisterError::ChunkSize(
                manifest.chunk_size,
                self.max_chunk,
            ));
        }
        let data = &bundle.artifact;
        if data.len() as u64 != manifest.size {
            return Err(RegisterError::Size {
                actual: data.len() as u64,
                signed: manifest.size,
            });
        }
        let digest: [u8; 32] = Sha256::digest(data).into();
        if digest != manifest.sha256 {
            return Err(RegisterError::Hash);
        }
        if merkle::root(&chunk_leaves(data, manifest.chunk_size)) != manifest.merkle_root {
            return Err(RegisterError::Merkle);
        }
        // Requirements are held to the same keys and threshold as the manifest.
        let checked = bundle.check_requirements(&self.trusted_keys, self.threshold)?;
        // The artifact goes to disk first, so a release record never names a missing file; a
        // refused bundle takes its file away again unless a registered release uses it.
        self.artifacts.put(&manifest.sha256, data)?;
        let stamp = Stamp {
            at_ms: now_ms,
            by: by.to_owned(),
        };
        let artifact = ArtifactRecord {
            sha256: manifest.sha256,
            size: manifest.size,
            compat: manifest.compat.clone(),
            manifest: manifest.clone(),
            signed: bundle.manifest.clone(),
            uploaded: stamp.clone(),
        };
        let result = self.store.write(|t| {
            let existing = t.releases_of(manifest.kind, &manifest.name)?;
            if let Err(e) = check_order(&existing, &manifest) {
                return Ok(Err(e));
            }
            let release = match existing.into_iter().find(|r| r.version == manifest.version) {
                Some(mut r) => {
                    if r.artifacts
                        .iter()
                        .any(|a| a.sha256 == manifest.sha256 && a.compat == manifest.compat)
                    {
                        return Ok(Ok(Registered {
                            release: r,
                            created: false,
                        }));
                    }
                    if let Some(other) = r
                        .artifacts
                        .iter()
                        .find(|a| overlap(&a.compat, &manifest.compat))
                    {
                        return Ok(Err(RegisterError::Conflict(format!(
                            "version {} already has an artifact for hardware class {}: each \
                             device must map to exactly one artifact of a version",
                            r.version,
                            shared_class(&other.compat, &manifest.compat)
                        ))));
                    }
                    r.artifacts.push(artifact);
                    for (k, v) in &bundle.lineage {
                        r.lineage.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    for tag in &bundle.tags {
                        if !r.tags.contains(tag) {
                            r.tags.push(tag.clone());
                        }
                    }
                    r
                }
                None => ReleaseRecord {
                    kind: manifest.kind,
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    release: manifest.release,
                    registered: stamp,
                    lineage: bundle.lineage.clone(),
                    tags: bundle.tags.clone(),
                    artifacts: vec![artifact],
                    baseline: None,
                },
            };
            t.put_release(&release)?;
            if let (Some(c), Some(v)) = (&checked, &bundle.validation) {
                let mut reqs = t
                    .requirements(release.kind, &release.name, release.release)?
                    .unwrap_or_default();
                reqs.artifacts.retain(|a| a.sha256 != manifest.sha256);
                reqs.artifacts
                    .push(crate::validation::ArtifactRequirements {
                        sha256: manifest.sha256,
                        classes: manifest.compat.classes.clone(),
                        requirements: c.requirements.clone(),
                        signed: v.requirements.clone(),
                        golden: c.golden.clone(),
                        registered: Stamp {
                            at_ms: now_ms,
                            by: by.to_owned(),
                        },
                    });
                t.put_requirements(release.kind, &release.name, release.release, &reqs)?;
            }
            Ok(Ok(Registered {
                release,
                created: true,
            }))
        });
        if !matches!(result, Ok(Ok(_))) {
            self.forget_unused(&manifest.sha256);
        }
        result?
    }

    /// Removes an artifact file no registered release names (after a refused upload).
    fn forget_unused(&self, sha256: &[u8; 32]) {
        let used = self.store.releases(None, None).map(|all| {
            all.iter()
                .any(|r| r.artifacts.iter().any(|a| a.sha256 == *sha256))
        });
        if matches!(used, Ok(false))
            && let Err(e) = std::fs::remove_file(self.artifacts.path(sha256))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "could not remove the artifact of a refused bundle");
        }
    }

    /// Points `alias` (e.g. `production`) at one version.
    pub fn set_alias(
        &self,
        kind: ArtifactKind,
        name: &str,
        alias: &str,
        version: &str,
    ) -> Result<ReleaseRecord, RegisterError> {
        check_alias(alias)?;
        let release = self.store.release(kind, name, version)?.ok_or_else(|| {
            RegisterError::NotFound(format!("{} {name} {version} not found", kind.name()))
        })?;
        let counter = release.release;
        self.store
            .write(|t| t.set_alias(kind, name, alias, counter))?;
        Ok(release)
    }

    pub fn remove_alias(
        &self,
        kind: ArtifactKind,
        name: &str,
        alias: &str,
    ) -> Result<(), RegisterError> {
        if self.store.write(|t| t.remove_alias(kind, name, alias))? {
            Ok(())
        } else {
            Err(RegisterError::NotFound(format!(
                "alias {alias} of {} {name} not found",
                kind.name()
            )))
        }
    }

    /// Sets a model version's baseline (drift reference).
    pub fn set_baseline(
        &self,
        name: &str,
        version: &str,
        baseline: crate::drift::baseline::Baseline,
    ) -> Result<ReleaseRecord, RegisterError> {
        baseline
            .validate()
            .map_err(|e| RegisterError::Invalid(e.to_string()))?;
        let mut release = self
            .store
            .release(ArtifactKind::Model, name, version)?
            .ok_or_else(|| RegisterError::NotFound(format!("model {name} {version} not found")))?;
        release.baseline = Some(baseline);
        self.store.write(|t| t.put_release(&release))?;
        Ok(release)
    }

    /// Edits a release's annotations as a JSON merge patch (RFC 7396) would: each lineage key
    /// given is set, or removed when its value is `None`, and the others are kept; tags, a
    /// list, are replaced when given. The read and the write are one transaction.
    pub fn annotate(
        &self,
        kind: ArtifactKind,
        name: &str,
        version: &str,
        lineage: Option<BTreeMap<String, Option<String>>>,
        tags: Option<Vec<String>>,
    ) -> Result<ReleaseRecord, RegisterError> {
        let found = self.store.release(kind, name, version)?.ok_or_else(|| {
            RegisterError::NotFound(format!("{} {name} {version} not found", kind.name()))
        })?;
        self.store
            .write(|t| {
                // Read again inside the write: a concurrent edit is not lost.
                let mut release = t
                    .releases_of(kind, name)?
                    .into_iter()
                    .find(|r| r.release == found.release)
                    .unwrap_or(found);
                for (k, v) in lineage.into_iter().flatten() {
                    match v {
                        Some(v) => release.lineage.insert(k, v),
                        None => release.lineage.remove(&k),
                    };
                }
                if let Some(t) = tags {
                    release.tags = t;
                }
                t.put_release(&release)?;
                Ok(release)
            })
            .map_err(Into::into)
    }
}

/// Aliases are lower-case words, never versions (a version always means itself).
fn check_alias(alias: &str) -> Result<(), RegisterError> {
    let ok = !alias.is_empty()
        && alias.len() <= 32
        && alias
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && alias.as_bytes()[0].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(RegisterError::Invalid(format!(
            "alias {alias:?}: 1-32 of a-z 0-9 - _, starting with a letter"
        )))
    }
}

#[cfg(test)]
mod tests;
