//! The `fleetgate` command: runs the gateway and administers a running one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetgate::auth::TokenSource;
use fleetgate::cli::{ApiClient, ClientError};
use fleetgate::{Config, Gateway};
use serde_json::{Value, json};

/// Exit code for a bad config file or bad arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Edge gateway for fleets of TinyML devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Without --config it runs on the embedded default config.
    Serve(ServeArgs),
    /// Print the default config, or check a config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Enroll and manage devices through a running gateway.
    Devices {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: DevicesCommand,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file; missing settings keep their defaults.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Overrides storage.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides mqtt.listen.
    #[arg(long)]
    mqtt_listen: Option<std::net::SocketAddr>,
    /// Overrides http.listen.
    #[arg(long)]
    http_listen: Option<std::net::SocketAddr>,
    /// How long shutdown may take per phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the default config with a comment on every setting.
    Default,
    /// Check a config file and list every problem in it.
    Check { file: PathBuf },
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// Gateway API address; default from the config's http.listen.
    #[arg(long, env = "FLEETGATE_URL", global = true)]
    url: Option<String>,
    /// Operator token; default from the config or <data_dir>/api-token.
    #[arg(
        long,
        env = "FLEETGATE_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// The gateway's config file, to find its address and token.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Enroll a device and print its credential (shown only this once).
    Enroll {
        id: String,
        /// A label, key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List devices.
    List,
    /// Show one device.
    Show { id: String },
    /// Issue a new credential; the old one stops working at once.
    Rotate { id: String },
    /// Revoke a device's credential and disconnect it; its history is kept.
    Revoke { id: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", fleetgate_config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Devices { api, command } => devices(api, command),
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::default()),
        Some(p) => Config::load(p).map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(EXIT_USAGE)
        }),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(dir) = args.data_dir {
        config.storage.data_dir = dir;
    }
    if let Some(a) = args.mqtt_listen {
        config.mqtt.listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http.listen = a;
    }
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config, args.grace));
    // Everything is flushed by now; do not let a stray blocking task hold the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, grace: Duration) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    println!("fleetgate {} running", env!("CARGO_PKG_VERSION"));
    println!("  MQTT (devices):  {}", gateway.mqtt_addr);
    println!("  HTTP API:        http://{}/api/v1", gateway.http_addr);
    println!("  data dir:        {}", gateway.data_dir.display());
    match &gateway.token_source {
        TokenSource::File(path) => println!("  operator token:  in {}", path.display()),
        TokenSource::Env => println!("  operator token:  from ${}", fleetgate::auth::TOKEN_ENV),
        TokenSource::Config => println!("  operator token:  from the config file (http.token)"),
    }
    wait_for_signal()
        .await
        .context("waiting for a shutdown signal")?;
    println!("fleetgate: shutting down");
    gateway.shutdown(grace).await?;
    println!("fleetgate: stopped, all data flushed");
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Builds an API client from flags, environment and the gateway's config.
fn client(api: &ApiArgs) -> Result<ApiClient, ExitCode> {
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
            let path = config.storage.data_dir.join(fleetgate::auth::TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    eprintln!(
                        "no operator token: give --token or ${}, or run where {} is readable ({e})",
                        fleetgate::auth::TOKEN_ENV,
                        path.display()
                    );
                    return Err(ExitCode::from(EXIT_USAGE));
                }
            }
        }
    };
    Ok(ApiClient::new(&url, &token))
}

fn devices(api: ApiArgs, command: DevicesCommand) -> ExitCode {
    let client = match client(&api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: Result<(), ClientError> = (|| {
        match command {
            DevicesCommand::Enroll { id, labels } => {
                let labels: serde_json::Map<String, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                let answer = client.post("/devices", &json!({ "id": id, "labels": labels }))?;
                print_credential(&answer);
            }
            DevicesCommand::List => {
                let list = client.get("/devices")?;
                println!(
                    "{:<24} {:<8} {:<12} {:<10} {:>10} {:>6} {:>6}",
                    "ID", "ONLINE", "FIRMWARE", "CLASS", "TELEMETRY", "LOST", "DUPS"
                );
                for d in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<8} {:<12} {:<10} {:>10} {:>6} {:>6}",
                        d["id"].as_str().unwrap_or("?"),
                        if d["online"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        d["firmware"]["version"].as_str().unwrap_or("-"),
                        d["hardware"]["class"].as_str().unwrap_or("-"),
                        d["counters"]["telemetry"].as_u64().unwrap_or(0),
                        d["counters"]["lost"].as_u64().unwrap_or(0),
                        d["counters"]["duplicates"].as_u64().unwrap_or(0),
                    );
                }
            }
            DevicesCommand::Show { id } => {
                let d = client.get(&format!("/devices/{id}"))?;
                println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
            }
            DevicesCommand::Rotate { id } => {
                let answer = client.post(&format!("/devices/{id}/credential"), &json!({}))?;
                print_credential(&answer);
            }
            DevicesCommand::Revoke { id } => {
                client.delete(&format!("/devices/{id}"))?;
                println!("revoked {id}");
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_credential(answer: &Value) {
    let id = answer["id"].as_str().unwrap_or("?");
    let credential = answer["credential"].as_str().unwrap_or("?");
    println!("device:     {id}");
    println!("credential: {credential}");
    println!("(shown only now; the device connects with username {id:?} and this password)");
}
