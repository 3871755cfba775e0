//! `fleetgate registry`: upload bundles and manage releases on a running gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::ApiClient;
use super::client::path;
use super::out::{self, Out, Table, cell};

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

pub fn run(client: &ApiClient, out: Out, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Upload { bundle } => {
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let answer = client.post_bytes("/registry/bundles", &bytes)?;
            if out.json {
                return Ok(out::json(&answer)?);
            }
            let r = &answer["release"];
            let what = if answer["created"] == true {
                "registered"
            } else {
                "already registered"
            };
            out::line(format!(
                "{what}: {} {} {} (release {})",
                cell(&r["kind"]),
                cell(&r["name"]),
                cell(&r["version"]),
                cell(&r["release"])
            ))?;
        }
        RegistryCommand::List => {
            let list = client.get("/registry")?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&[
                "KIND",
                "NAME",
                "VERSION",
                "RELEASE",
                "ALIASES",
                "ARTIFACTS",
                "CLASSES",
                "LINEAGE",
            ]);
            for r in list.as_array().into_iter().flatten() {
                let classes: Vec<String> = r["artifacts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| cell(&a["compat"]["classes"]))
                    .collect();
                t.row(vec![
                    cell(&r["kind"]),
                    cell(&r["name"]),
                    cell(&r["version"]),
                    cell(&r["release"]),
                    cell(&r["aliases"]),
                    r["artifacts"].as_array().map_or(0, Vec::len).to_string(),
                    classes.join(" "),
                    cell(&r["lineage"]),
                ]);
            }
            t.print()?;
        }
        RegistryCommand::Alias {
            kind,
            name,
            alias,
            version,
        } => {
            let answer = client.put(
                &path(&["registry", &kind, &name, "aliases", &alias]),
                &json!({ "version": version }),
            )?;
            if out.json {
                return Ok(out::json(&answer)?);
            }
            out::line(format!("{kind} {name}: {alias} -> {version}"))?;
        }
    }
    Ok(())
}
