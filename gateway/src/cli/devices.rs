//! `fleetgate devices`: enroll, list, show, rotate and revoke devices, and see why a
//! device's messages were refused.

use clap::Subcommand;
use serde_json::{Value, json};

use super::client::path;
use super::out::{self, Out, Table, cell};
use super::{ApiClient, parse_label};

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
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
    /// Why the device's latest messages were refused (newest first).
    Refusals { id: String },
}

pub fn run(client: &ApiClient, out: Out, command: DevicesCommand) -> anyhow::Result<()> {
    match command {
        DevicesCommand::Enroll { id, labels } => {
            let labels: serde_json::Map<String, Value> = labels
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let answer = client.post("/devices", &json!({ "id": id, "labels": labels }))?;
            credential(&answer, out)?;
        }
        DevicesCommand::List => {
            let list = client.get("/devices")?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&[
                "ID",
                "ONLINE",
                "FIRMWARE",
                "CLASS",
                "TELEMETRY",
                "LOST",
                "DUPS",
                "REJECTED",
            ]);
            for d in list.as_array().into_iter().flatten() {
                let n = |k: &str| d["counters"][k].as_u64().unwrap_or(0).to_string();
                t.row(vec![
                    cell(&d["id"]),
                    cell(&d["online"]),
                    cell(&d["firmware"]["version"]),
                    cell(&d["hardware"]["class"]),
                    n("telemetry"),
                    n("lost"),
                    n("duplicates"),
                    n("rejected"),
                ]);
            }
            t.print()?;
        }
        DevicesCommand::Show { id } => {
            let d = client.get(&path(&["devices", &id]))?;
            if out.json {
                return Ok(out::json(&d)?);
            }
            let models: Vec<String> = d["models"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| format!("{} {}", cell(&m["name"]), cell(&m["version"])))
                .collect();
            let hw = &d["hardware"];
            let c = &d["counters"];
            out::fields(&[
                ("device", cell(&d["id"])),
                ("labels", cell(&d["labels"])),
                ("revoked", cell(&d["revoked"])),
                ("online", cell(&d["online"])),
                ("enrolled", cell(&d["enrolled_at"])),
                ("last seen", cell(&d["last_seen"])),
                ("protocol", cell(&d["protocol"])),
                ("peer", cell(&d["peer"])),
                (
                    "firmware",
                    format!(
                        "{} {}",
                        cell(&d["firmware"]["name"]),
                        cell(&d["firmware"]["version"])
                    ),
                ),
                (
                    "models",
                    if models.is_empty() {
                        "-".to_owned()
                    } else {
                        models.join(", ")
                    },
                ),
                (
                    "hardware",
                    format!(
                        "class {}, arch {}, {} bytes RAM, {} bytes flash",
                        cell(&hw["class"]),
                        cell(&hw["arch"]),
                        cell(&hw["ram_bytes"]),
                        cell(&hw["flash_bytes"])
                    ),
                ),
                (
                    "messages",
                    format!(
                        "{} telemetry, {} lost, {} duplicates, {} rejected",
                        cell(&c["telemetry"]),
                        cell(&c["lost"]),
                        cell(&c["duplicates"]),
                        cell(&c["rejected"])
                    ),
                ),
                (
                    "stored",
                    format!(
                        "{} telemetry rows, {} log lines",
                        cell(&d["stored"]["telemetry"]),
                        cell(&d["stored"]["logs"])
                    ),
                ),
            ])?;
        }
        DevicesCommand::Rotate { id } => {
            let answer = client.post(&path(&["devices", &id, "credential"]), &json!({}))?;
            credential(&answer, out)?;
        }
        DevicesCommand::Revoke { id } => {
            client.delete(&path(&["devices", &id]))?;
            if out.json {
                out::json(&json!({ "revoked": id }))?;
            } else {
                out::line(format!("revoked {id}"))?;
            }
        }
        DevicesCommand::Refusals { id } => {
            let r = client.get(&path(&["devices", &id, "refusals"]))?;
            if out.json {
                return Ok(out::json(&r)?);
            }
            out::line(format!(
                "{}: {} messages refused since the gateway started",
                cell(&r["device"]),
                cell(&r["total"])
            ))?;
            let mut t = Table::new(&["LAST", "REASON", "COUNT", "DETAIL"]);
            for e in r["refusals"].as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&e["last_at"]),
                    cell(&e["reason"]),
                    cell(&e["count"]),
                    cell(&e["detail"]),
                ]);
            }
            t.print()?;
        }
    }
    Ok(())
}

fn credential(answer: &Value, out: Out) -> anyhow::Result<()> {
    if out.json {
        return Ok(out::json(answer)?);
    }
    let id = answer["id"].as_str().unwrap_or("?");
    let credential = answer["credential"].as_str().unwrap_or("?");
    out::line(format!("device:     {id}"))?;
    out::line(format!("credential: {credential}"))?;
    out::line(format!(
        "(shown only now; the device connects with username {id:?} and this password)"
    ))?;
    Ok(())
}
