//! `fleetgate registry`: upload bundles and manage releases on a running gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::ApiClient;
use super::client::path;

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Upload a signed bundle.
    Upload { bundle: PathBuf },
    /// List releases.
    List,
    /// Point an alias (e.g. production) at a version.
    Alias {
        kind: String,
        name: String,
        alias: String,
        version: String,
    },
}

pub fn run(client: &ApiClient, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Upload { bundle } => {
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let answer = client.post_bytes("/registry/bundles", &bytes)?;
            let r = &answer["release"];
            let what = if answer["created"] == true {
                "registered"
            } else {
                "already registered"
            };
            println!(
                "{what}: {} {} {} (release {})",
                r["kind"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["version"].as_str().unwrap_or("?"),
                r["release"]
            );
        }
        RegistryCommand::List => {
            let list = client.get("/registry")?;
            println!(
                "{:<9} {:<20} {:<12} {:>8} {:<20} ARTIFACTS",
                "KIND", "NAME", "VERSION", "RELEASE", "ALIASES"
            );
            for r in list.as_array().into_iter().flatten() {
                let aliases: Vec<&str> = r["aliases"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str())
                    .collect();
                println!(
                    "{:<9} {:<20} {:<12} {:>8} {:<20} {}",
                    r["kind"].as_str().unwrap_or("?"),
                    r["name"].as_str().unwrap_or("?"),
                    r["version"].as_str().unwrap_or("?"),
                    r["release"].as_u64().unwrap_or(0),
                    aliases.join(","),
                    r["artifacts"].as_array().map_or(0, Vec::len)
                );
            }
        }
        RegistryCommand::Alias {
            kind,
            name,
            alias,
            version,
        } => {
            client.put(
                &path(&["registry", &kind, &name, "aliases", &alias]),
                &json!({ "version": version }),
            )?;
            println!("{kind} {name}: {alias} -> {version}");
        }
    }
    Ok(())
}
