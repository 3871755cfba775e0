//! Backups: one tar file holding a consistent snapshot of the database, every other file of
//! the data dir (artifacts, the rollback signing key, the generated API token and TLS key) and
//! the config file, with a manifest of SHA-256 digests that `restore` checks.
//!
//! The database is never copied as a file while the gateway runs: the running gateway writes
//! a snapshot of one read transaction ([`crate::storage::Store::snapshot`]) into the data dir
//! and the archive takes that. Restoring goes onto a new or empty data dir only, so it can
//! never mix two gateways' state, and it is atomic: nothing is put in place unless every file
//! checked out.
//!
//! The digests catch damage, not tampering: whoever can change the archive can change the
//! manifest with it. Signing the manifest with a key from inside the archive (the gateway's
//! rollback key) would prove nothing, since the archive hands that key to whoever holds it.
//! `backup --sign-key` signs the manifest with a key kept outside the data dir, and
//! `restore --trust-key` refuses an archive whose manifest that key did not sign.

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
    sign_key: Option<&ed25519_dalek::SigningKey>,
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
    if let Some(key) = sign_key {
        let sig = serde_json::to_vec_pretty(&sign_manifest(&json, key))
            .map_err(|e| BackupError::Invalid(e.to_string()))?;
        append(&mut tar, SIGNATURE, &sig, 0o600)?;
    }
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
    /// The key whose signature over the manifest was checked, if one was asked for.
    pub verified_by: Option<[u8; 32]>,
}

/// Where and how `restore` puts an archive back.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions<'a> {
    /// Where to write the archived config file.
    pub config_out: Option<&'a Path>,
    /// Require a signature over the manifest by this key (see [`sign_manifest`]).
    pub trusted_key: Option<[u8; 32]>,
}

/// Unpacks `archive` into `data_dir`, which must be new or empty, checking every file
/// against the manifest; writes the archived config to `options.config_out` if given.
///
/// Atomic: everything is unpacked and checked in a staging directory beside `data_dir` (and
/// the config beside its destination) and moved into place only when all of it checked out.
/// On any failure nothing is left behind, so the same restore can simply be run again.
pub fn restore(
    archive: &Path,
    data_dir: &Path,
    options: &RestoreOptions<'_>,
) -> Result<Restored, BackupError> {
    if data_dir.join(DB_FILE).exists() {
        return Err(BackupError::Invalid(format!(
            "{} already holds a database; restore onto a fresh data dir",
            data_dir.display()
        )));
    }
    let existing = match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::Invalid(format!(
                    "{} is not empty; restore onto a new or empty data dir",
                    data_dir.display()
                )));
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(data_dir)(e)),
    };
    let name = data_dir
        .file_name()
        .ok_or_else(|| {
            BackupError::Invalid(format!("{}: not a directory name", data_dir.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let staging = parent.join(format!(".{name}.restoring"));
    let config_tmp = options.config_out.map(|c| {
        c.with_file_name(format!(
            ".{}.restoring",
            c.file_name().unwrap_or_default().to_string_lossy()
        ))
    });
    let cleanup = |moved_into_place: bool| {
        let _ = std::fs::remove_dir_all(&staging);
        if let Some(t) = &config_tmp {
            let _ = std::fs::remove_file(t);
        }
        if moved_into_place {
            // Only what this restore put there: the data dir was absent or empty before.
            if existing {
                if let Ok(entries) = std::fs::read_dir(data_dir) {
                    for e in entries.flatten() {
                        let _ = std::fs::remove_dir_all(e.path())
                            .or_else(|_| std::fs::remove_file(e.path()));
                    }
                }
            } else {
                let _ = std::fs::remove_dir_all(data_dir);
            }
        }
    };
    // A staging dir left by a restore that was killed is ours to remove.
    let _ = std::fs::remove_dir_all(&staging);
    let staged = stage(archive, &staging, data_dir, options, config_tmp.as_deref());
    let (manifest, config, verified_by) = match staged {
        Ok(s) => s,
        Err(e) => {
            cleanup(false);
            return Err(e);
        }
    };
    let committed = (|| -> Result<Option<PathBuf>, BackupError> {
        if existing {
            for entry in std::fs::read_dir(&staging).map_err(io(&staging))? {
                let entry = entry.map_err(io(&staging))?;
                let dest = data_dir.join(entry.file_name());
                std::fs::rename(entry.path(), &dest).map_err(io(&dest))?;
            }
        } else {
            std::fs::rename(&staging, data_dir).map_err(io(data_dir))?;
        }
        sync_dir(&parent);
        match (config, options.config_out, &config_tmp) {
            (true, Some(out), Some(tmp)) => {
                std::fs::rename(tmp, out).map_err(io(out))?;
                if let Some(dir) = out.parent() {
                    sync_dir(dir);
                }
                Ok(Some(out.to_owned()))
            }
            _ => Ok(None),
        }
    })();
    match committed {
        Ok(config) => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(Restored {
                manifest,
                config,
                verified_by,
            })
        }
        Err(e) => {
            cleanup(true);
            Err(e)
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Unpacks and checks the archive into `staging` (and the config into `config_tmp`).
/// Returns the manifest, whether a config was written, and the key that signed the manifest.
fn stage(
    archive: &Path,
    staging: &Path,
    data_dir: &Path,
    options: &RestoreOptions<'_>,
    config_tmp: Option<&Path>,
) -> Result<(Manifest, bool, Option<[u8; 32]>), BackupError> {
    let file = File::open(archive).map_err(io(archive))?;
    let mut tar = tar::Archive::new(file);
    let mut entries = tar.entries().map_err(io(archive))?.peekable();
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
    // The signature, if any, comes right after the manifest.
    let mut signature: Option<ManifestSignature> = None;
    let next_is_signature = match entries.peek() {
        Some(Ok(e)) => e.path().is_ok_and(|p| p.as_ref() == Path::new(SIGNATURE)),
        _ => false,
    };
    if next_is_signature && let Some(entry) = entries.next() {
        let mut entry = entry.map_err(io(archive))?;
        let mut text = Vec::new();
        entry.read_to_end(&mut text).map_err(io(archive))?;
        signature =
            Some(serde_json::from_slice(&text).map_err(|e| bad(format!("{SIGNATURE}: {e}")))?);
    }
    let verified_by = match options.trusted_key {
        None => None,
        Some(key) => {
            let sig = signature.as_ref().ok_or_else(|| {
                bad(
                    "the manifest is not signed, and a signature by the trusted key was asked for"
                        .to_owned(),
                )
            })?;
            verify_manifest(&json, sig, &key).map_err(bad)?;
            Some(key)
        }
    };
    std::fs::create_dir(staging).map_err(io(staging))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o750))
            .map_err(io(staging))?;
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut config = false;
    for entry in entries {
        let mut entry = entry.map_err(io(archive))?;
        let name = entry
            .path()
            .map_err(io(archive))?
            .to_string_lossy()
            .into_owned();
        // Links, devices, directories: a backup holds regular files only. A hard link's
        // content is another entry's, which its digest would not cover.
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(bad(format!(
                "{name} is a {kind:?} entry; a backup holds regular files only"
            )));
        }
        let want = manifest
            .files
            .iter()
            .find(|f| f.path == name)
            .ok_or_else(|| bad(format!("{name} is not in the manifest")))?;
        if !seen.insert(name.clone()) {
            return Err(bad(format!("{name} is in the archive twice")));
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(io(archive))?;
        if bytes.len() as u64 != want.bytes || sha256_hex(&bytes) != want.sha256 {
            return Err(bad(format!(
                "{name} does not match its digest in the manifest"
            )));
        }
        let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
        if name == CONFIG_ENTRY {
            if let Some(tmp) = config_tmp {
                let text =
                    String::from_utf8(bytes).map_err(|_| bad(format!("{name} is not UTF-8")))?;
                let text = point_at(&text, data_dir).map_err(|e| bad(format!("{name}: {e}")))?;
                write_with_mode(tmp, text.as_bytes(), 0o644)?;
                config = true;
            }
            continue;
        }
        let rel = Path::new(&name)
            .strip_prefix(DATA)
            .map_err(|_| bad(format!("{name} is outside {DATA}/")))?;
        if rel.as_os_str().is_empty()
            || rel.components().any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(bad(format!("{name} is not a plain relative path")));
        }
        let dest = staging.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        write_with_mode(&dest, &bytes, mode)?;
    }
    for f in &manifest.files {
        if !seen.contains(&f.path) {
            return Err(bad(format!(
                "{} is in the manifest but not in the archive",
                f.path
            )));
        }
    }
    Ok((manifest, config, verified_by))
}

/// The config text with `storage.data_dir` set to `data_dir` (made absolute), comments and
/// layout kept: the restored config must run on the restored data, not on the data dir the
/// backup was taken from.
pub fn point_at(config: &str, data_dir: &Path) -> Result<String, String> {
    let dir = std::path::absolute(data_dir).map_err(|e| e.to_string())?;
    let dir = dir
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", dir.display()))?;
    let mut doc: toml_edit::DocumentMut = config
        .parse()
        .map_err(|e: toml_edit::TomlError| format!("not valid TOML: {}", e.message()))?;
    match doc.get("storage") {
        None => doc["storage"] = toml_edit::table(),
        Some(item) if item.is_table_like() => {}
        Some(_) => return Err("storage is not a table".to_owned()),
    }
    doc["storage"]["data_dir"] = toml_edit::value(dir);
    Ok(doc.to_string())
}

/// The entry after the manifest in a signed archive.
pub const SIGNATURE: &str = "fleetgate-backup.sig";
/// The domain tag a manifest signature covers before the manifest's bytes (one length byte,
/// the tag, then the manifest entry's exact bytes), as for manifests of bundles.
const SIGNATURE_TAG: &[u8] = b"fleetgate/backup-manifest/v1";

/// An ed25519 signature over the manifest's exact bytes in the archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// The signer's public key, hex.
    pub public_key: String,
    /// The signature, hex.
    pub signature: String,
}

fn signed_message(manifest_json: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + SIGNATURE_TAG.len() + manifest_json.len());
    m.push(SIGNATURE_TAG.len() as u8);
    m.extend_from_slice(SIGNATURE_TAG);
    m.extend_from_slice(manifest_json);
    m
}

/// Signs the manifest's bytes with `key`.
pub fn sign_manifest(manifest_json: &[u8], key: &ed25519_dalek::SigningKey) -> ManifestSignature {
    use ed25519_dalek::Signer;
    ManifestSignature {
        public_key: hex(key.verifying_key().as_bytes()),
        signature: hex(&key.sign(&signed_message(manifest_json)).to_bytes()),
    }
}

fn verify_manifest(
    manifest_json: &[u8],
    sig: &ManifestSignature,
    trusted: &[u8; 32],
) -> Result<(), String> {
    if sig.public_key != hex(trusted) {
        return Err(format!(
            "the manifest is signed by key {}, not by the trusted key {}",
            sig.public_key,
            hex(trusted)
        ));
    }
    let bytes: Vec<u8> = (0..sig.signature.len() / 2)
        .filter_map(|i| u8::from_str_radix(sig.signature.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let signature = <[u8; 64]>::try_from(bytes.as_slice())
        .map(|b| ed25519_dalek::Signature::from_bytes(&b))
        .map_err(|_| "the manifest signature is not 64 bytes of hex".to_owned())?;
    ed25519_dalek::VerifyingKey::from_bytes(trusted)
        .and_then(|k| k.verify_strict(&signed_message(manifest_json), &signature))
        .map_err(|_| "the manifest signature does not verify: the archive was changed".to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
