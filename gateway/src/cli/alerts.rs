//! `fleetgate alerts`: list, acknowledge and resolve alerts.

use clap::Subcommand;
use serde_json::json;

use super::{ApiClient, print_json};

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

pub fn run(c: &ApiClient, command: AlertsCommand) -> anyhow::Result<()> {
    let answer = match command {
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
            c.get_query("/alerts", &query)?
        }
        AlertsCommand::Ack { id } => c.post(&format!("/alerts/{id}/ack"), &json!({}))?,
        AlertsCommand::Resolve { id } => c.post(&format!("/alerts/{id}/resolve"), &json!({}))?,
    };
    print_json(&answer)
}
