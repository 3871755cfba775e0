//! `fleetgate rollout`: staged rollouts with automatic rollback on a running gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Value, json};

use super::{ApiClient, parse_label};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Roll a release (version or alias) out in stages; the configured policy applies, with
    /// any of its settings overridden by --stages, --bake or --policy.
    Create {
        kind: String,
        name: String,
        version: String,
        /// Every enrolled device (compatible hardware only).
        #[arg(long, conflicts_with_all = ["labels", "devices"])]
        all: bool,
        /// Devices with this label, key=value; repeatable (all must match).
        #[arg(long = "label", value_parser = parse_label, conflicts_with = "devices")]
        labels: Vec<(String, String)>,
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Stage sizes, e.g. 5,10%,50%,100%.
        #[arg(long, value_delimiter = ',')]
        stages: Vec<String>,
        /// Bake time of every stage, e.g. 30m.
        #[arg(long)]
        bake: Option<String>,
        /// A TOML file of [rollouts.policy] settings to override (keys at its top level).
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// List rollouts, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
    },
    /// A rollout's stage, counts and health gates.
    Show { id: u64 },
    /// Stop starting updates and advancing (the health gates still watch).
    Pause {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    Resume {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop the rollout; devices keep what they run.
    Abort {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop the rollout and send every device that took the new version back.
    Rollback {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// A rollout's devices and their states.
    Devices {
        id: u64,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        stage: Option<usize>,
    },
    /// Every decision and operator action, with the numbers.
    Audit { id: u64 },
    /// The public key devices must trust for rollback directives.
    Key,
}

pub fn run(c: &ApiClient, command: RolloutCommand) -> anyhow::Result<()> {
    let print = |v: &Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    };
    let act = |id: u64, verb: &str, reason: Option<String>| -> anyhow::Result<Value> {
        let body = match reason {
            Some(r) => json!({ "reason": r }),
            None => json!({}),
        };
        Ok(c.post(&format!("/rollouts/{id}/{verb}"), &body)?)
    };
    match command {
        RolloutCommand::Create {
            kind,
            name,
            version,
            all,
            labels,
            devices,
            stages,
            bake,
            policy,
        } => {
            let mut overrides = serde_json::Map::new();
            if let Some(file) = policy {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let table: toml::Table = text
                    .parse()
                    .with_context(|| format!("{} is not valid TOML", file.display()))?;
                if let Value::Object(m) = serde_json::to_value(table)? {
                    overrides = m;
                }
            }
            if !stages.is_empty() {
                overrides.insert("stages".into(), json!(stages));
            }
            if let Some(b) = bake {
                overrides.insert("bake".into(), json!(b));
            }
            let mut body = json!({ "kind": kind, "name": name, "version": version });
            if all {
                body["all"] = json!(true);
            } else if !labels.is_empty() {
                body["labels"] = json!(
                    labels
                        .into_iter()
                        .collect::<std::collections::BTreeMap<_, _>>()
                );
            } else if !devices.is_empty() {
                body["devices"] = json!(devices);
            } else {
                anyhow::bail!("give a target: --all, --label key=value or --device id");
            }
            if !overrides.is_empty() {
                body["policy"] = Value::Object(overrides);
            }
            let created = c.post("/rollouts", &body)?;
            let r = &created["rollout"];
            println!(
                "rollout {}: {} {} {} to {} devices in {} stages",
                r["id"],
                r["kind"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["version"].as_str().unwrap_or("?"),
                r["planned"],
                r["stages"].as_array().map_or(0, Vec::len)
            );
            for s in created["skipped"].as_array().into_iter().flatten() {
                println!(
                    "skipped  {:<24} {}",
                    s["device"].as_str().unwrap_or("?"),
                    s["reason"].as_str().unwrap_or("?")
                );
            }
        }
        RolloutCommand::List { state } => {
            let query: Vec<(&str, &str)> = state.iter().map(|s| ("state", s.as_str())).collect();
            println!(
                "{:>4} {:<9} {:<20} {:<10} {:<12} {:>7} {:>8}",
                "ID", "KIND", "NAME", "VERSION", "STATE", "STAGE", "DEVICES"
            );
            for r in c
                .get_query("/rollouts", &query)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:>4} {:<9} {:<20} {:<10} {:<12} {:>3}/{:<3} {:>8}",
                    r["id"],
                    r["kind"].as_str().unwrap_or("?"),
                    r["name"].as_str().unwrap_or("?"),
                    r["version"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?"),
                    r["stage"]["number"],
                    r["stage"]["of"],
                    r["planned"]
                );
            }
        }
        RolloutCommand::Show { id } => print(&c.get(&format!("/rollouts/{id}"))?)?,
        RolloutCommand::Pause { id, reason } => print(&act(id, "pause", reason)?)?,
        RolloutCommand::Resume { id, reason } => print(&act(id, "resume", reason)?)?,
        RolloutCommand::Abort { id, reason } => print(&act(id, "abort", reason)?)?,
        RolloutCommand::Rollback { id, reason } => print(&act(id, "rollback", reason)?)?,
        RolloutCommand::Devices { id, state, stage } => {
            let stage = stage.map(|s| s.to_string());
            let mut query = vec![("limit", "10000")];
            if let Some(s) = &state {
                query.push(("state", s));
            }
            if let Some(s) = &stage {
                query.push(("stage", s));
            }
            println!(
                "{:<24} {:>5} {:<16} {:<12} REASON",
                "DEVICE", "STAGE", "STATE", "TRANSFER"
            );
            for d in c
                .get_query(&format!("/rollouts/{id}/devices"), &query)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:<24} {:>5} {:<16} {:<12} {}",
                    d["device"].as_str().unwrap_or("?"),
                    d["stage"],
                    d["state"].as_str().unwrap_or("?"),
                    d["transfer_state"].as_str().unwrap_or("-"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
        }
        RolloutCommand::Audit { id } => {
            for e in c
                .get_query(&format!("/rollouts/{id}/audit"), &[("limit", "10000")])?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{} {:<16} {:<18} {}",
                    e["at"].as_str().unwrap_or("?"),
                    e["by"].as_str().unwrap_or("?"),
                    e["event"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                );
            }
        }
        RolloutCommand::Key => {
            let k = c.get("/rollouts/signing-key")?;
            println!("{}", k["public_key"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}
