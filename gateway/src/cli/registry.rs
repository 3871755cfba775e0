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
    /// Import a registered model version from MLflow (offline from the gateway): its run's
    /// parameters, metrics and tags become the release's lineage, its artifact is downloaded,
    /// and a bundle spec is written that `fleetgate bundle sign --spec` completes where the
    /// release key is.
    ImportMlflow(ImportMlflowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportMlflowArgs {
    /// The tracking server, e.g. http://127.0.0.1:5000.
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    tracking_uri: String,
    /// models:/NAME/VERSION
    model: String,
    /// Where to write the artifact and the spec.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// The fleetgate model name (default: the registered model's).
    #[arg(long)]
    name: Option<String>,
    /// The release's semantic version (default: VERSION.0.0).
    #[arg(long)]
    version: Option<semver::Version>,
    /// The release counter (default: the MLflow version number).
    #[arg(long)]
    release: Option<u64>,
    /// The file of the model's artifact directory to ship (when it holds several).
    #[arg(long)]
    file: Option<String>,
}

/// `registry import-mlflow`: talks to MLflow only, never to the gateway.
pub fn import_mlflow(a: &ImportMlflowArgs, out: Out) -> anyhow::Result<()> {
    let client = crate::registry::mlflow::Mlflow::new(&a.tracking_uri);
    let opts = crate::registry::mlflow::ImportOptions {
        name: a.name.clone(),
        version: a.version.clone(),
        release: a.release,
        file: a.file.clone(),
    };
    let imported = client.import(&a.model, &a.out_dir, &opts)?;
    if out.json {
        return Ok(out::json(&json!({
            "spec": imported.spec_path,
            "artifact": imported.artifact_path,
            "bytes": imported.artifact_bytes,
            "name": imported.spec.name,
            "version": imported.spec.version,
            "release": imported.spec.release,
            "lineage": imported.spec.lineage,
        }))?);
    }
    out::line(format!(
        "imported {} as model {} {} (release {}): {} ({} bytes), {} lineage entries",
        a.model,
        imported.spec.name,
        imported.spec.version,
        imported
            .spec
            .release
            .map_or("-".to_owned(), |r| r.to_string()),
        imported.artifact_path.display(),
        imported.artifact_bytes,
        imported.spec.lineage.len()
    ))?;
    out::line(format!(
        "next, where the release key is: fleetgate bundle sign --spec {} --class CLASS --key release.key --out {}-{}.fgb",
        imported.spec_path.display(),
        imported.spec.name,
        imported.spec.version
    ))?;
    Ok(())
}

pub fn run(client: &ApiClient, out: Out, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::ImportMlflow(a) => import_mlflow(&a, out)?,
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
