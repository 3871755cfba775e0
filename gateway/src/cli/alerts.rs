//! `fleetgate alerts`: list, acknowledge and resolve alerts.

use clap::Subcommand;
use serde_json::{Value, json};

use super::ApiClient;
use super::out::{self, Out, Table, cell};

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// List alerts, newest first.
    List {
        /// open, acknowledged or resolved.
        #[arg(long)]
        state: Option<String>,
        /// info, warning or critical.
        #[arg(long)]
        severity: Option<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Acknowledge an alert: someone is on it (it stays open until resolved).
    Ack { id: u64 },
    /// Resolve an alert by hand.
    Resolve { id: u64 },
}

pub fn run(c: &ApiClient, out: Out, command: AlertsCommand) -> anyhow::Result<()> {
    match command {
        AlertsCommand::List {
            state,
            severity,
            device,
            limit,
        } => {
            let limit = limit.to_string();
            let mut query = vec![("limit", limit.as_str())];
            for (name, value) in [
                ("state", &state),
                ("severity", &severity),
                ("device", &device),
            ] {
                if let Some(v) = value {
                    query.push((name, v.as_str()));
                }
            }
            let list = c.get_query("/alerts", &query)?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&[
                "ID", "SEVERITY", "STATE", "DEVICE", "KIND", "OPENED", "COUNT", "MESSAGE",
            ]);
            for a in list.as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&a["id"]),
                    cell(&a["severity"]),
                    cell(&a["state"]),
                    cell(&a["device"]),
                    cell(&a["kind"]),
                    cell(&a["opened_at"]),
                    cell(&a["count"]),
                    cell(&a["message"]),
                ]);
            }
            t.print()?;
        }
        AlertsCommand::Ack { id } => {
            action(&c.post(&format!("/alerts/{id}/ack"), &json!({}))?, out)?;
        }
        AlertsCommand::Resolve { id } => {
            action(&c.post(&format!("/alerts/{id}/resolve"), &json!({}))?, out)?;
        }
    }
    Ok(())
}

fn action(alert: &Value, out: Out) -> anyhow::Result<()> {
    if out.json {
        return Ok(out::json(alert)?);
    }
    let by = match alert["state"].as_str() {
        Some("resolved") => cell(&alert["resolved"]["by"]),
        _ => cell(&alert["acknowledged"]["by"]),
    };
    out::line(format!(
        "alert {}: {} (by {by})",
        cell(&alert["id"]),
        cell(&alert["state"])
    ))?;
    Ok(())
}
