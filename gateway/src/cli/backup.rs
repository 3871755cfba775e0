//! `fleetgate backup` and `fleetgate restore`: one archive of a gateway's state, and putting it
//! back onto a fresh data dir.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{ApiArgs, ClientError, client, load_config, report};

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The archive to write (a tar file).
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The archive from `fleetgate backup`.
    file: PathBuf,
    /// The data dir to fill; it must not hold a database yet.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where to write the archived config file.
    #[arg(long)]
    config_out: Option<PathBuf>,
}

pub fn run_backup(args: &BackupArgs) -> ExitCode {
    backup(&args.api, &args.file)
}

pub fn run_restore(args: RestoreArgs) -> ExitCode {
    let RestoreArgs {
        file,
        data_dir,
        config_out,
    } = args;
    report(
        crate::backup::restore(&file, &data_dir, config_out.as_deref())
            .map(|r| {
                let bytes: u64 = r.manifest.files.iter().map(|f| f.bytes).sum();
                println!(
                    "restored {} files ({bytes} bytes) from a backup of {} into {}",
                    r.manifest.files.len(),
                    crate::clock::rfc3339(r.manifest.created_ms),
                    data_dir.display()
                );
                match r.config {
                    Some(c) => println!("config written to {}", c.display()),
                    None => println!(
                        "the archive's config is at {} inside it; give --config-out to write it",
                        crate::backup::CONFIG_ENTRY
                    ),
                }
            })
            .map_err(Into::into),
    )
}

/// `fleetgate backup`: the running gateway writes the database snapshot; a stopped one is
/// read directly.
fn backup(api: &ApiArgs, out: &Path) -> ExitCode {
    let config = match load_config(api.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let data_dir = config.storage.data_dir.clone();
    let config_text = match &api.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let snapshot = match client(api).map(|c| c.post("/backup/snapshot", &serde_json::json!({}))) {
        Ok(Ok(answer)) => match answer["path"].as_str() {
            Some(p) => PathBuf::from(p),
            None => {
                eprintln!("unexpected answer from the gateway: {answer}");
                return ExitCode::FAILURE;
            }
        },
        Ok(Err(ClientError::Unreachable { url, .. })) => {
            eprintln!("no gateway answers at {url}; reading the stopped gateway's database");
            let path = data_dir.join(format!(
                "{}{}.redb",
                crate::backup::SNAPSHOT_PREFIX,
                crate::clock::now_ms()
            ));
            let taken = crate::storage::Store::open(&data_dir).and_then(|s| s.snapshot(&path));
            if let Err(e) = taken {
                eprintln!("reading the database in {}: {e}", data_dir.display());
                return ExitCode::FAILURE;
            }
            path
        }
        Ok(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
        Err(code) => return code,
    };
    let written = crate::backup::write_archive(out, &snapshot, &data_dir, config_text.as_deref());
    let _ = std::fs::remove_file(&snapshot);
    match written {
        Ok(m) => {
            let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
            println!(
                "wrote {}: {} files, {bytes} bytes{}",
                out.display(),
                m.files.len(),
                if config_text.is_some() {
                    ""
                } else {
                    " (no --config given: the embedded default config applies)"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
