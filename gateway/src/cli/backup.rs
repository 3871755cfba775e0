//! `fleetgate backup` and `fleetgate restore`: one archive of a gateway's state, and putting it
//! back onto a fresh data dir.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use anyhow::Context;

use super::out;
use super::{ApiArgs, ClientError, client, load_config, report};

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The archive to write (a tar file).
    file: PathBuf,
    /// Sign the archive's manifest with this ed25519 key (`fleetgate keys generate`), kept
    /// outside the data dir; `restore --trust-key` then proves the archive was not changed.
    #[arg(long)]
    sign_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The archive from `fleetgate backup`.
    file: PathBuf,
    /// The data dir to fill; it must be new or empty.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where to write the archived config file.
    #[arg(long)]
    config_out: Option<PathBuf>,
    /// Require the manifest to be signed by this key (hex, or the .pub file of the key given
    /// to `backup --sign-key`).
    #[arg(long)]
    trust_key: Option<String>,
}

pub fn run_backup(args: &BackupArgs) -> ExitCode {
    let key = match &args.sign_key {
        Some(path) => match crate::registry::keys::read(path) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("fleetgate: {e}");
                return ExitCode::from(super::EXIT_USAGE);
            }
        },
        None => None,
    };
    let config = match load_config(args.api.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let client = match client(&args.api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    report(backup(
        &args.api,
        &config,
        &client,
        &args.file,
        key.as_ref(),
    ))
}

pub fn run_restore(args: RestoreArgs) -> ExitCode {
    let RestoreArgs {
        file,
        data_dir,
        config_out,
        trust_key,
    } = args;
    report((|| {
        let trusted_key = trust_key
            .map(|k| crate::registry::keys::read_public(&k))
            .transpose()?;
        let options = crate::backup::RestoreOptions {
            config_out: config_out.as_deref(),
            trusted_key,
        };
        let r = crate::backup::restore(&file, &data_dir, &options)?;
        let bytes: u64 = r.manifest.files.iter().map(|f| f.bytes).sum();
        out::line(format!(
            "restored {} files ({bytes} bytes) from a backup of {} into {}",
            r.manifest.files.len(),
            crate::clock::rfc3339(r.manifest.created_ms),
            data_dir.display()
        ))?;
        match r.verified_by {
            Some(k) => out::line(format!(
                "the manifest is signed by the trusted key {}",
                crate::registry::keys::hex(&k)
            ))?,
            None => out::line(
                "checked against the manifest's digests (not authenticated: give --trust-key for a signed backup)",
            )?,
        }
        match r.config {
            Some(c) => out::line(format!(
                "config written to {} (storage.data_dir = {})",
                c.display(),
                data_dir.display()
            ))?,
            None => out::line(format!(
                "the archive's config is at {} inside it; give --config-out to write it",
                crate::backup::CONFIG_ENTRY
            ))?,
        }
        Ok(())
    })())
}

/// `fleetgate backup`: the running gateway writes the database snapshot; a stopped one is
/// read directly.
fn backup(
    api: &ApiArgs,
    config: &crate::Config,
    client: &super::ApiClient,
    out_file: &Path,
    key: Option<&ed25519_dalek::SigningKey>,
) -> anyhow::Result<()> {
    let data_dir = config.storage.data_dir.clone();
    let config_text = match &api.config {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let snapshot = match client.post("/backup/snapshot", &serde_json::json!({})) {
        Ok(answer) => match answer["path"].as_str() {
            Some(p) => PathBuf::from(p),
            None => anyhow::bail!("unexpected answer from the gateway: {answer}"),
        },
        Err(ClientError::Unreachable { url, .. }) => {
            eprintln!("no gateway answers at {url}; reading the stopped gateway's database");
            let path = data_dir.join(format!(
                "{}{}.redb",
                crate::backup::SNAPSHOT_PREFIX,
                crate::clock::now_ms()
            ));
            crate::storage::Store::open(&data_dir)
                .and_then(|s| s.snapshot(&path))
                .with_context(|| format!("reading the database in {}", data_dir.display()))?;
            path
        }
        Err(e) => return Err(e.into()),
    };
    let written =
        crate::backup::write_archive(out_file, &snapshot, &data_dir, config_text.as_deref(), key);
    let _ = std::fs::remove_file(&snapshot);
    let m = written?;
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    out::line(format!(
        "wrote {}: {} files, {bytes} bytes{}{}",
        out_file.display(),
        m.files.len(),
        if key.is_some() {
            ", manifest signed"
        } else {
            ""
        },
        if config_text.is_some() {
            ""
        } else {
            " (no --config given: the embedded default config applies)"
        }
    ))?;
    Ok(())
}
