//! `fleetgate uplink`: sign requests for sites (offline, central operations' side) and show a
//! running gateway's uplink and webhooks.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::out::{self, Out, Table, cell};
use super::{ApiArgs, ApiClient};
use crate::registry::keys;
use crate::uplink::down::{SiteRequest, expiry, sign_request};

#[derive(Debug, Subcommand)]
pub enum UplinkCommand {
    /// Sign a rollout request (JSON, docs/uplink.md) with an operator key, offline; prints the
    /// envelope to publish on <prefix>/sites/<site>/down/rollout or <prefix>/fleet/down/rollout.
    SignRequest {
        /// The operator's private key (`fleetgate keys generate`); its public key goes into
        /// the sites' uplink.down.operator_keys.
        #[arg(long)]
        key: PathBuf,
        /// The request, JSON; `-` reads it from stdin.
        request: PathBuf,
    },
    /// Show the upstream connection, the outboxes and the webhooks of a running gateway.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Checks `text` as a site would (fields, id, expiry) before it is signed: a request a site
/// would refuse as invalid is better refused here.
pub fn check_request(text: &[u8], now_ms: u64) -> anyhow::Result<SiteRequest> {
    let request: SiteRequest = serde_json::from_slice(text).context("the request")?;
    if request.id.is_empty() || request.id.len() > 128 || request.id.chars().any(char::is_control) {
        anyhow::bail!("the request's id: 1 to 128 characters, no control characters");
    }
    const ACTIONS: [&str; 5] = ["create", "pause", "resume", "abort", "rollback"];
    if !ACTIONS.contains(&request.action.as_str()) {
        anyhow::bail!(
            "the request's action {:?}: one of {}",
            request.action,
            ACTIONS.join(", ")
        );
    }
    expiry(&request, now_ms).map_err(|(_, _, m)| anyhow::anyhow!("the request: {m}"))?;
    Ok(request)
}

pub fn run(command: UplinkCommand) -> ExitCode {
    match command {
        UplinkCommand::SignRequest { key, request } => super::report(sign(&key, &request)),
        UplinkCommand::Status { api } => super::with_client(&api, status),
    }
}

/// `fleetgate uplink sign-request`.
fn sign(key: &Path, request: &Path) -> anyhow::Result<()> {
    let text = if request.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        buf
    } else {
        std::fs::read(request).with_context(|| format!("reading {}", request.display()))?
    };
    check_request(&text, crate::clock::now_ms())?;
    let key = keys::read(key)?;
    out::line(String::from_utf8_lossy(&sign_request(text, &key)))?;
    Ok(())
}

/// `fleetgate uplink status`.
pub fn status(c: &ApiClient, out: Out) -> anyhow::Result<()> {
    let u = c.get("/uplink")?;
    if out.json {
        return Ok(out::json(&u)?);
    }
    let conn = &u["connection"];
    out::line(format!(
        "site {}  uplink {}  connection {} {}{}",
        cell(&u["site"]),
        if u["enabled"] == true { "on" } else { "off" },
        cell(&conn["state"]),
        cell(&conn["broker"]),
        conn["last_error"]
            .as_str()
            .map(|e| format!("  ({e})"))
            .unwrap_or_default()
    ))?;
    let mut t = Table::new(&[
        "STREAM",
        "DESTINATION",
        "ACKNOWLEDGED",
        "DEPTH",
        "OLDEST UNSENT (S)",
    ]);
    for d in u["destinations"].as_array().into_iter().flatten() {
        t.row(vec![
            cell(&d["stream"]),
            cell(&d["destination"]),
            cell(&d["acknowledged"]),
            cell(&d["depth"]),
            cell(&d["oldest_unsent_seconds"]),
        ]);
    }
    t.print()?;
    let mut t = Table::new(&["STREAM", "HEAD", "MESSAGES", "BYTES", "DROPPED"]);
    for s in u["streams"].as_array().into_iter().flatten() {
        t.row(vec![
            cell(&s["stream"]),
            cell(&s["head"]),
            cell(&s["messages"]),
            cell(&s["bytes"]),
            cell(&s["dropped"]),
        ]);
    }
    t.print()?;
    if let Some(hooks) = u["webhooks"].as_array().filter(|h| !h.is_empty()) {
        let mut t = Table::new(&["WEBHOOK", "URL", "STATE", "RETRYING", "LAST ERROR"]);
        for h in hooks {
            t.row(vec![
                cell(&h["name"]),
                cell(&h["url"]),
                cell(&h["state"]),
                cell(&h["retrying"]),
                cell(&h["last_error"]),
            ]);
        }
        t.print()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
