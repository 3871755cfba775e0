//! `fleetgate devices`: enroll, list, show, rotate and revoke devices.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::client::path;
use super::{ApiArgs, ClientError, client, parse_label};

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
}

pub fn run(api: &ApiArgs, command: DevicesCommand) -> ExitCode {
    let client = match client(api) {
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
                let d = client.get(&path(&["devices", &id]))?;
                println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
            }
            DevicesCommand::Rotate { id } => {
                let answer = client.post(&path(&["devices", &id, "credential"]), &json!({}))?;
                print_credential(&answer);
            }
            DevicesCommand::Revoke { id } => {
                client.delete(&path(&["devices", &id]))?;
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
