//! `fleetgate serve`: runs the gateway until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::load_config;
use crate::auth::TokenSource;
use crate::{Config, Gateway};

#[derive(Debug, Args)]
pub struct ServeArgs {
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
    /// Overrides log.format: text or json.
    #[arg(long)]
    log_format: Option<fleetgate_config::LogFormat>,
}

pub fn run(args: ServeArgs) -> ExitCode {
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
    if let Some(f) = args.log_format {
        config.log.format = f;
    }
    init_tracing(config.log.format);
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
    let result = runtime.block_on(serve(config, args.grace));
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

async fn serve(config: Config, grace: Duration) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        mqtt = %gateway.mqtt_addr,
        http = %gateway.http_addr,
        data_dir = %gateway.data_dir.display(),
        "gateway started"
    );
    say(format!("fleetgate {} running", env!("CARGO_PKG_VERSION")));
    say(format!("  MQTT (devices):  {}", gateway.mqtt_addr));
    if let Some(tls) = gateway.mqtt_tls_addr.filter(|a| *a != gateway.mqtt_addr) {
        say(format!("  MQTT over TLS:   {tls}"));
    }
    say(format!(
        "  HTTP API:        http://{}/api/v1",
        gateway.http_addr
    ));
    say(format!(
        "  dashboard:       http://{}/ui/",
        gateway.http_addr
    ));
    say(format!("  data dir:        {}", gateway.data_dir.display()));
    say(match &gateway.token_source {
        TokenSource::File(path) => format!("  operator token:  in {}", path.display()),
        TokenSource::Env => format!("  operator token:  from ${}", crate::auth::TOKEN_ENV),
        TokenSource::Config => "  operator token:  from the config file (http.token)".to_owned(),
    });
    tokio::select! {
        signal = wait_for_signal() => signal.context("waiting for a shutdown signal")?,
        why = gateway.failed() => {
            // Nothing is acknowledged without the writer: stop, and let the service manager
            // start a fresh gateway.
            tracing::error!(reason = why, "the gateway cannot go on");
            anyhow::bail!("{why}");
        }
    }
    say("fleetgate: shutting down");
    gateway.shutdown(grace).await?;
    tracing::info!("gateway stopped, all data flushed");
    say("fleetgate: stopped, all data flushed");
    Ok(())
}

/// A line for whoever started the gateway; nobody reading it (stdout closed) is no reason
/// to stop serving.
fn say(text: impl std::fmt::Display) {
    let _ = super::out::line(text);
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

fn init_tracing(format: fleetgate_config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        fleetgate_config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        // Colour codes only for a person at a terminal: not in a file or the journal.
        fleetgate_config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
}
