//! `fleetgate rollout`: staged rollouts with automatic rollback on a running gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Value, json};

use super::out::{self, Out, Table, cell};
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
        /// Start with a validate stage: stage 1 waits until every targeted hardware class has
        /// passing results from K bench devices (default: the gateway's
        /// validation.min_devices); a failing requirement ends the rollout.
        #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "0")]
        validate: Option<u32>,
        /// How long the validate stage waits, e.g. 30m (default: validation.timeout).
        #[arg(long, requires = "validate")]
        validate_timeout: Option<String>,
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

pub fn run(c: &ApiClient, out: Out, command: RolloutCommand) -> anyhow::Result<()> {
    let act = |id: u64, verb: &str, reason: Option<String>| -> anyhow::Result<()> {
        let body = match reason {
            Some(r) => json!({ "reason": r }),
            None => json!({}),
        };
        let r = c.post(&format!("/rollouts/{id}/{verb}"), &body)?;
        if out.json {
            return Ok(out::json(&r)?);
        }
        let why = match (r["reason"].as_str(), r["by"].as_str()) {
            (Some(reason), Some(by)) => format!(" by {by}: {reason}"),
            (None, Some(by)) => format!(" by {by}"),
            _ => String::new(),
        };
        Ok(out::line(format!(
            "rollout {id}: {}{why}",
            cell(&r["state"])
        ))?)
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
            validate,
            validate_timeout,
        } => {
            let mut overrides = serde_json::Map::new();
            if let Some(file) = policy {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                    anyhow::anyhow!(
                        "{}: {}",
                        file.display(),
                        fleetgate_config::toml_error(&text, &e)
                    )
                })?;
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
            if let Some(k) = validate {
                let mut v = json!({});
                if k > 0 {
                    v["min_devices"] = json!(k);
                }
                if let Some(t) = &validate_timeout {
                    v["timeout"] = json!(t);
                }
                body["validate"] = v;
            }
            let created = c.post("/rollouts", &body)?;
            if out.json {
                return Ok(out::json(&created)?);
            }
            let r = &created["rollout"];
            out::line(format!(
                "rollout {}: {} {} {} to {} devices in {} stages",
                cell(&r["id"]),
                cell(&r["kind"]),
                cell(&r["name"]),
                cell(&r["version"]),
                cell(&r["planned"]),
                r["stages"].as_array().map_or(0, Vec::len)
            ))?;
            skipped(&created["skipped"])?;
        }
        RolloutCommand::List { state } => {
            let query: Vec<(&str, &str)> = state.iter().map(|s| ("state", s.as_str())).collect();
            let list = c.get_query("/rollouts", &query)?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&["ID", "KIND", "NAME", "VERSION", "STATE", "STAGE", "DEVICES"]);
            for r in list.as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&r["id"]),
                    cell(&r["kind"]),
                    cell(&r["name"]),
                    cell(&r["version"]),
                    cell(&r["state"]),
                    format!(
                        "{}/{}",
                        cell(&r["stage"]["number"]),
                        cell(&r["stage"]["of"])
                    ),
                    cell(&r["planned"]),
                ]);
            }
            t.print()?;
        }
        RolloutCommand::Show { id } => {
            let r = c.get(&format!("/rollouts/{id}"))?;
            if out.json {
                return Ok(out::json(&r)?);
            }
            show(&r)?;
        }
        RolloutCommand::Pause { id, reason } => act(id, "pause", reason)?,
        RolloutCommand::Resume { id, reason } => act(id, "resume", reason)?,
        RolloutCommand::Abort { id, reason } => act(id, "abort", reason)?,
        RolloutCommand::Rollback { id, reason } => act(id, "rollback", reason)?,
        RolloutCommand::Devices { id, state, stage } => {
            let stage = stage.map(|s| s.to_string());
            let mut query = vec![("limit", "10000")];
            if let Some(s) = &state {
                query.push(("state", s));
            }
            if let Some(s) = &stage {
                query.push(("stage", s));
            }
            let list = c.get_query(&format!("/rollouts/{id}/devices"), &query)?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&["DEVICE", "STAGE", "STATE", "TRANSFER", "REASON"]);
            for d in list.as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&d["device"]),
                    cell(&d["stage"]),
                    cell(&d["state"]),
                    cell(&d["transfer_state"]),
                    cell(&d["reason"]),
                ]);
            }
            t.print()?;
        }
        RolloutCommand::Audit { id } => {
            let list = c.get_query(&format!("/rollouts/{id}/audit"), &[("limit", "10000")])?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&["AT", "BY", "EVENT", "MESSAGE"]);
            for e in list.as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&e["at"]),
                    cell(&e["by"]),
                    cell(&e["event"]),
                    cell(&e["message"]),
                ]);
            }
            t.print()?;
        }
        RolloutCommand::Key => {
            let k = c.get("/rollouts/signing-key")?;
            if out.json {
                return Ok(out::json(&k)?);
            }
            out::line(cell(&k["public_key"]))?;
        }
    }
    Ok(())
}

/// Devices left out of a rollout or an update, and why.
pub(crate) fn skipped(list: &Value) -> anyhow::Result<()> {
    let list = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return Ok(());
    }
    let mut t = Table::new(&["SKIPPED", "REASON"]);
    for s in list {
        t.row(vec![cell(&s["device"]), cell(&s["reason"])]);
    }
    Ok(t.print()?)
}

/// A rollout: where it is, its stages and the latest gate verdicts.
fn show(r: &Value) -> anyhow::Result<()> {
    let stage = &r["stage"];
    let mut fields = vec![
        (
            "rollout",
            format!(
                "{} {} {} {} (release {})",
                cell(&r["id"]),
                cell(&r["kind"]),
                cell(&r["name"]),
                cell(&r["version"]),
                cell(&r["release"])
            ),
        ),
        ("target", cell(&r["target"])),
        ("state", cell(&r["state"])),
    ];
    if !r["reason"].is_null() {
        fields.push((
            "reason",
            format!("{} (by {})", cell(&r["reason"]), cell(&r["by"])),
        ));
    }
    let v = &r["validation"];
    if !v.is_null() {
        let classes: Vec<String> = v["classes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(c, n)| {
                format!(
                    "{c}: {} passed, {} failed, {} errors",
                    cell(&n["passed"]),
                    cell(&n["failed"]),
                    cell(&n["errors"])
                )
            })
            .collect();
        fields.push((
            "validation",
            format!(
                "{} ({} bench device(s) per class within {}): {}",
                cell(&v["state"]),
                cell(&v["min_devices"]),
                cell(&v["timeout"]),
                classes.join("; ")
            ),
        ));
    }
    fields.extend([
        ("devices", cell(&r["planned"])),
        (
            "stage",
            format!(
                "{} of {} ({} devices), started {}",
                cell(&stage["number"]),
                cell(&stage["of"]),
                cell(&stage["devices"]),
                cell(&stage["started_at"])
            ),
        ),
        ("baking since", cell(&stage["baking_since"])),
        ("bake ends", cell(&stage["bake_ends_at"])),
        ("devices by state", cell(&r["counts"])),
        (
            "created",
            format!(
                "{} by {}",
                cell(&r["created"]["at"]),
                cell(&r["created"]["by"])
            ),
        ),
        ("finished", cell(&r["finished_at"])),
    ]);
    out::fields(&fields)?;
    out::line("")?;
    let mut t = Table::new(&["STAGE", "SIZE", "DEVICES", "STATES"]);
    for s in r["stages"].as_array().into_iter().flatten() {
        t.row(vec![
            cell(&s["number"]),
            cell(&s["size"]),
            cell(&s["devices"]),
            cell(&s["counts"]),
        ]);
    }
    t.print()?;
    let gates = r["gates"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !gates.is_empty() {
        out::line("")?;
        let mut t = Table::new(&[
            "GATE",
            "VERDICT",
            "UPDATED",
            "CONTROL",
            "THRESHOLD",
            "SAMPLES",
            "DEVICES",
            "AT",
        ]);
        for g in gates {
            t.row(vec![
                cell(&g["gate"]),
                cell(&g["verdict"]),
                cell(&g["updated"]),
                cell(&g["control"]),
                cell(&g["threshold"]),
                format!(
                    "{}/{}",
                    cell(&g["updated_samples"]),
                    cell(&g["control_samples"])
                ),
                format!(
                    "{}/{}",
                    cell(&g["updated_devices"]),
                    cell(&g["control_devices"])
                ),
                cell(&g["at"]),
            ]);
        }
        t.print()?;
    }
    Ok(())
}
