//! Backups: one tar file holding a consistent snapshot of the database, every other file of
//! the data dir (artifacts, the rollback signing key, the generated API token and TLS key) and
//! the config file, with a manifest of SHA-256 digests that `restore` checks.
//!
//! The database is never copied as a file while the gateway runs: the running gateway writes
//! a snapshot of one read transaction ([`crate::storage::Store::snapshot`]) into the data dir
//! and the archive takes that. Restoring goes onto a fresh data dir only, so it can never mix
//! two gateways' state.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::storage::DB_FILE;

/// First entry of every archive.
pub const MANIFEST: &str = "fleetgate-backup.json";
/// Where the config file goes in the archive.
pub const CONFIG_ENTRY: &str = "config/fleetgate.toml";
/// Prefix of the data dir's files in the archive.
const DATA: &str = "data";
/// Name of the snapshot the gateway writes into its data dir for a backup.
pub const SNAPSHOT_PREFIX: &str = "backup-snapshot-";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_ms: u64,
    pub gateway_version: String,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the archive.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// True for files of the data dir that a backup leaves out: the live database (the snapshot
/// stands in for it), snapshots and temporary files.
fn skipped(name: &str) -> bool {
    name == DB_FILE || name.starts_with(SNAPSHOT_PREFIX) || name.ends_with(".tmp")
}

/// Every file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        for entry in std::fs::read_dir(&here).map_err(io(&here))? {
            let entry = entry.map_err(io(&here))?;
            let kind = entry.file_type().map_err(io(&entry.path()))?;
            let rel = rel.join(entry.file_name());
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file()
                && !(rel.parent() == Some(Path::new(""))
                    && skipped(&entry.file_name().to_string_lossy()))
            {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn append(
    tar: &mut tar::Builder<File>,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<(), BackupError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_mtime(crate::clock::now_ms() / 1000);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, bytes)
        .map_err(|source| BackupError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Writes the archive `out` from a database snapshot, the other files of `data_dir` and the
/// config file's text. Returns what it holds.
pub fn write_archive(
    out: &Path,
    snapshot: &Path,
    data_dir: &Path,
    config: Option<&str>,
) -> Result<Manifest, BackupError> {
    // (archive path, file on disk or None for the config text, mode)
    let mut sources: Vec<(String, Option<PathBuf>, u32)> = vec![(
        format!("{DATA}/{DB_FILE}"),
        Some(snapshot.to_owned()),
        0o600,
    )];
    for rel in files_under(data_dir)? {
        let path = data_dir.join(&rel);
        let mode = file_mode(&path)?;
        let name = rel
            .to_str()
            .ok_or_else(|| BackupError::Invalid(format!("{}: not UTF-8", rel.display())))?;
        sources.push((format!("{DATA}/{name}"), Some(path), mode));
    }
    if config.is_some() {
        sources.push((CONFIG_ENTRY.to_owned(), None, 0o644));
    }
    let read = |src: &Option<PathBuf>| -> Result<Vec<u8>, BackupError> {
        match src {
            Some(p) => std::fs::read(p).map_err(io(p)),
            None => Ok(config.unwrap_or_default().as_bytes().to_vec()),
        }
    };
    let mut manifest = Manifest {
        format: FORMAT,
        created_ms: crate::clock::now_ms(),
        gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
        files: Vec::new(),
    };
    for (name, src, _) in &sources {
        let bytes = read(src)?;
        manifest.files.push(FileEntry {
            path: name.clone(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
    }
    let tmp = out.with_extension("tmp");
    let file = crate::auth::create_private(&tmp).map_err(io(&tmp))?;
    let mut tar = tar::Builder::new(file);
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Invalid(e.to_string()))?;
    append(&mut tar, MANIFEST, &json, 0o600)?;
    for (name, src, mode) in &sources {
        // Read again: large artifacts are not all held in memory at once.
        append(&mut tar, name, &read(src)?, *mode)?;
    }
    let file = tar.into_inner().map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(manifest)
}

fn file_mode(path: &Path) -> Result<u32, BackupError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::metadata(path)
            .map_err(io(path))?
            .permissions()
            .mode()
            & 0o777)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(0o600)
    }
}

/// What `restore` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub manifest: Manifest,
    /// Where the config file was written, if the archive had one and a place was given.
    pub config: Option<PathBuf>,
}

/// Unpacks `archive` into `data_dir`, which must not hold a database yet, checking every
/// file against the manifest; writes the archived config to `config_out` if given.
pub fn restore(
    archive: &Path,
    data_dir: &Path,
    config_out: Option<&Path>,
) -> Result<Restored, BackupError> {
    if data_dir.join(DB_FILE).exists() {
        return Err(BackupError::Invalid(format!(
            "{} already holds a database; restore onto a fresh data dir",
            data_dir.display()
        )));
    }
    let file = File::open(archive).map_err(io(archive))?;
    let mut tar = tar::Archive::new(file);
    let mut entries = tar.entries().map_err(io(archive))?;
    let bad = |why: String| BackupError::Invalid(format!("{}: {why}", archive.display()));
    let mut first = entries
        .next()
        .ok_or_else(|| bad("empty archive".to_owned()))?
        .map_err(io(archive))?;
    if first.path().map_err(io(archive))?.as_ref() != Path::new(MANIFEST) {
        return Err(bad(format!("not a fleetgate backup (no {MANIFEST} first)")));
    }
    let mut json = Vec::new();
    first.read_to_end(&mut json).map_err(io(archive))?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| bad(format!("manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(format!(
            "backup format {} is not {FORMAT}",
            manifest.format
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut config = None;
    let mut pending: Vec<(PathBuf, PathBuf)> = Vec::new();
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let unpack = || -> Result<(), BackupError> {
        for entry in entries {
            let mut entry = entry.map_err(io(archive))?;
            let name = entry
                .path()
                .map_err(io(archive))?
                .to_string_lossy()
                .into_owned();
            let want = manifest
                .files
                .iter()
                .find(|f| f.path == name)
                .ok_or_else(|| bad(format!("{name} is not in the manifest")))?;
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(io(archive))?;
            if bytes.len() as u64 != want.bytes || sha256_hex(&bytes) != want.sha256 {
                return Err(bad(format!(
                    "{name} does not match its digest in the manifest"
                )));
            }
            let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
            seen.insert(name.clone());
            if name == CONFIG_ENTRY {
                config = Some(bytes);
                continue;
            }
            let rel = Path::new(&name)
                .strip_prefix(DATA)
                .map_err(|_| bad(format!("{name} is outside {DATA}/")))?;
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(bad(format!("{name} is not a plain relative path")));
            }
            let dest = data_dir.join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            // Written under a temporary name; renamed into place once every file checked out.
            let tmp = dest.with_file_name(format!(
                "{}.tmp",
                dest.file_name().unwrap_or_default().to_string_lossy()
            ));
            write_with_mode(&tmp, &bytes, mode)?;
            pending.push((tmp, dest));
        }
        for f in &manifest.files {
            if !seen.contains(&f.path) {
                return Err(bad(format!(
                    "{} is in the manifest but not in the archive",
                    f.path
                )));
            }
        }
        Ok(())
    };
    if let Err(e) = unpack() {
        for (tmp, _) in &pending {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, dest) in pending {
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    }
    let config = match (config, config_out) {
        (Some(text), Some(out)) => {
            write_with_mode(out, &text, 0o644)?;
            Some(out.to_owned())
        }
        _ => None,
    };
    Ok(Restored { manifest, config })
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BackupError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests;
