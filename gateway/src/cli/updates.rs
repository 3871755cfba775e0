//! `fleetgate updates`: offer releases to devices without stages, follow and cancel transfers.

use clap::Subcommand;
use serde_json::json;

use super::ApiClient;

#[derive(Debug, Subcommand)]
pub enum UpdatesCommand {
    /// Offer a release (version or alias) to devices.
    Start {
        kind: String,
        name: String,
        version: String,
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Every enrolled device.
        #[arg(long, conflicts_with = "devices")]
        all: bool,
    },
    /// List transfers, newest first.
    List {
        #[arg(long)]
        device: Option<String>,
    },
    /// Cancel a transfer.
    Cancel { id: u64 },
}

pub fn run(client: &ApiClient, command: UpdatesCommand) -> anyhow::Result<()> {
    match command {
        UpdatesCommand::Start {
            kind,
            name,
            version,
            devices,
            all,
        } => {
            let body = if all {
                json!({ "kind": kind, "name": name, "version": version, "all": true })
            } else {
                json!({ "kind": kind, "name": name, "version": version, "devices": devices })
            };
            let plan = client.post("/updates", &body)?;
            for s in plan["started"].as_array().into_iter().flatten() {
                println!(
                    "started  {:<24} transfer {}",
                    s["device"].as_str().unwrap_or("?"),
                    s["transfer"]
                );
            }
            for s in plan["skipped"].as_array().into_iter().flatten() {
                println!(
                    "skipped  {:<24} {}",
                    s["device"].as_str().unwrap_or("?"),
                    s["reason"].as_str().unwrap_or("?")
                );
            }
        }
        UpdatesCommand::List { device } => {
            let query: Vec<(&str, &str)> = device.iter().map(|d| ("device", d.as_str())).collect();
            println!(
                "{:>6} {:<24} {:<12} {:<12} {:>8} REASON",
                "ID", "DEVICE", "VERSION", "STATE", "PROGRESS"
            );
            for t in client
                .get_query("/updates", &query)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:>6} {:<24} {:<12} {:<12} {:>7}% {}",
                    t["id"],
                    t["device"].as_str().unwrap_or("?"),
                    t["version"].as_str().unwrap_or("?"),
                    t["state"].as_str().unwrap_or("?"),
                    t["progress"],
                    t["reason"].as_str().unwrap_or("")
                );
            }
        }
        UpdatesCommand::Cancel { id } => {
            let t = client.post(&format!("/updates/{id}/cancel"), &json!({}))?;
            println!("transfer {id}: {}", t["state"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}
