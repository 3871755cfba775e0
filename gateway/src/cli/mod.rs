//! The `fleetgate` command line: one module per command group, each with its clap arguments
//! and what it runs. `main.rs` only parses and dispatches; [`client`] talks to a running
//! gateway's HTTP API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::Config;

pub mod alerts;
pub mod audit;
pub mod backup;
pub mod baseline;
pub mod bundle;
pub mod client;
pub mod config;
pub mod devices;
pub mod drift;
pub mod keys;
pub mod out;
pub mod registry;
pub mod rollout;
pub mod serve;
pub mod tokens;
pub mod updates;
pub mod uplink;
pub mod validate;

pub use client::{ApiClient, ClientError};

/// Exit code for a bad config file or bad arguments (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Edge gateway for fleets of TinyML devices"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway. Without --config it runs on the embedded default config.
    Serve(serve::ServeArgs),
    /// Print the default config, or check a config file.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Enroll and manage devices through a running gateway.
    Devices {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: devices::DevicesCommand,
    },
    /// Create release signing keys (offline).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Sign, co-sign and inspect bundles (offline).
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Upload bundles and manage releases on a running gateway.
    Registry {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: registry::RegistryCommand,
    },
    /// Build a model's drift baseline from reference data (offline), or upload one.
    #[command(subcommand)]
    Baseline(baseline::BaselineCommand),
    /// Show drift of model versions on a running gateway.
    Drift(drift::DriftArgs),
    /// List, acknowledge and resolve alerts (hardware and drift) on a running gateway.
    Alerts {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: alerts::AlertsCommand,
    },
    /// Staged rollouts with automatic rollback on a running gateway.
    Rollout {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: rollout::RolloutCommand,
    },
    /// Validate releases on bench devices against their signed requirements; show and
    /// compare the results on a running gateway.
    Validate {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: validate::ValidateCommand,
    },
    /// Start, follow and cancel updates on a running gateway.
    Updates {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: updates::UpdatesCommand,
    },
    /// Create, list and revoke operator API tokens (needs an admin token).
    Tokens {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
    /// Back up a gateway into one file: a consistent snapshot of the database (taken by the
    /// running gateway, or directly when it is stopped), the rest of the data dir (artifacts,
    /// keys, the API token) and the config file. Run it on the gateway's host (admin token).
    Backup(backup::BackupArgs),
    /// Restore a backup onto a fresh data dir (the gateway must not be running on it).
    Restore(backup::RestoreArgs),
    /// Show the audit log: every change made through the API, newest first (admin).
    Audit(audit::AuditArgs),
    /// The bridge to an upstream MQTT cluster: sign requests for sites (offline), show a
    /// gateway's uplink and webhooks.
    #[command(subcommand)]
    Uplink(uplink::UplinkCommand),
}

/// How to reach a running gateway: flags, environment, or its config file.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Gateway API address; default from the config's http.listen.
    #[arg(long, env = "FLEETGATE_URL", global = true)]
    pub url: Option<String>,
    /// Operator token; default from the config or <data_dir>/api-token.
    #[arg(
        long,
        env = "FLEETGATE_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// The gateway's config file, to find its address and token.
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// Print the API's JSON answers instead of tables, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    pub fn out(&self) -> out::Out {
        out::Out { json: self.json }
    }
}

/// Reads the config file, or the embedded default without one; a bad file exits with 64.
pub fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::default()),
        Some(p) => Config::load(p).map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(EXIT_USAGE)
        }),
    }
}

/// Builds an API client from flags, environment and the gateway's config.
pub fn client(api: &ApiArgs) -> Result<ApiClient, ExitCode> {
    let config = load_config(api.config.as_deref())?;
    let url = api.url.clone().unwrap_or_else(|| {
        let mut addr = config.http.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let token = match (&api.token, &config.http.token) {
        (Some(t), _) | (None, Some(t)) => t.clone(),
        (None, None) => {
            let path = config.storage.data_dir.join(crate::auth::TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    eprintln!(
                        "no operator token: give --token or ${}, or run where {} is readable ({e})",
                        crate::auth::TOKEN_ENV,
                        path.display()
                    );
                    return Err(ExitCode::from(EXIT_USAGE));
                }
            }
        }
    };
    Ok(ApiClient::new(&url, &token))
}

/// Runs `f` with a client for `api` and how to print; a missing token or a bad config ends
/// it first.
pub fn with_client(
    api: &ApiArgs,
    f: impl FnOnce(&ApiClient, out::Out) -> anyhow::Result<()>,
) -> ExitCode {
    match client(api) {
        Ok(c) => report(f(&c, api.out())),
        Err(code) => code,
    }
}

/// A command's own verdict on a run that went through but did not do what was asked (an
/// update that started on no device): exits 1 with this message, after what was printed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsuccessful(pub String);

/// The exit code of a command: 0, or 1 with the error (and its causes) on stderr. A closed
/// stdout (the reader of a pipe went away) is not an error of the command: it ends quietly.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, each once: a cause whose text its parent already shows (as
/// `ClientError::Unreachable` does) is not repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// `key=value`, for labels and lineage.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}
