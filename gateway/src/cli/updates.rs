//! `fleetgate updates`: offer releases to devices without stages, follow and cancel transfers.

use clap::Subcommand;
use serde_json::json;

use super::out::{self, Out, Table, cell};
use super::{ApiClient, Unsuccessful};

#[derive(Debug, Subcommand)]
pub enum UpdatesCommand {
    /// Offer a release (version or alias) to devices. Exits 1 if it started on no device.
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

pub fn run(client: &ApiClient, out: Out, command: UpdatesCommand) -> anyhow::Result<()> {
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
            let started = plan["started"].as_array().map_or(0, Vec::len);
            let skipped = plan["skipped"].as_array().map_or(0, Vec::len);
            if out.json {
                out::json(&plan)?;
            } else {
                let mut t = Table::new(&["STARTED", "TRANSFER"]);
                for s in plan["started"].as_array().into_iter().flatten() {
                    t.row(vec![cell(&s["device"]), cell(&s["transfer"])]);
                }
                if started > 0 {
                    t.print()?;
                }
                super::rollout::skipped(&plan["skipped"])?;
            }
            if started == 0 {
                return Err(Unsuccessful(format!(
                    "{kind} {name} {version} started on no device ({skipped} skipped)"
                ))
                .into());
            }
        }
        UpdatesCommand::List { device } => {
            let query: Vec<(&str, &str)> = device.iter().map(|d| ("device", d.as_str())).collect();
            let list = client.get_query("/updates", &query)?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&["ID", "DEVICE", "VERSION", "STATE", "PROGRESS", "REASON"]);
            for tr in list.as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&tr["id"]),
                    cell(&tr["device"]),
                    cell(&tr["version"]),
                    cell(&tr["state"]),
                    format!("{}%", cell(&tr["progress"])),
                    cell(&tr["reason"]),
                ]);
            }
            t.print()?;
        }
        UpdatesCommand::Cancel { id } => {
            let t = client.post(&format!("/updates/{id}/cancel"), &json!({}))?;
            if out.json {
                return Ok(out::json(&t)?);
            }
            out::line(format!("transfer {id}: {}", cell(&t["state"])))?;
        }
    }
    Ok(())
}
