//! `fleetgate baseline`: build a drift baseline from reference data (offline), or upload one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;

use super::client::path;
use super::out;
use super::{ApiArgs, report, with_client};

#[derive(Debug, Subcommand)]
pub enum BaselineCommand {
    /// Build a baseline from a reference CSV (one column per feature, in the model's input
    /// order; optional prediction and confidence columns).
    Build {
        csv: PathBuf,
        #[arg(long)]
        prediction: Option<String>,
        #[arg(long)]
        confidence: Option<String>,
        /// Bins per feature (at reference quantiles).
        #[arg(long, default_value_t = 10)]
        bins: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Set a registered model version's baseline on a running gateway.
    Upload {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        version: String,
        baseline: PathBuf,
    },
}

pub fn run(command: BaselineCommand) -> ExitCode {
    match command {
        BaselineCommand::Build {
            csv,
            prediction,
            confidence,
            bins,
            out: dest,
        } => report((|| {
            let text = std::fs::read_to_string(&csv)
                .with_context(|| format!("reading {}", csv.display()))?;
            let b = crate::drift::baseline::Baseline::from_csv(
                &text,
                prediction.as_deref(),
                confidence.as_deref(),
                bins,
            )?;
            std::fs::write(&dest, serde_json::to_string_pretty(&b)?)
                .with_context(|| format!("writing {}", dest.display()))?;
            out::line(format!(
                "wrote {}: {} features, {} reference rows",
                dest.display(),
                b.features.len(),
                b.features[0].n
            ))?;
            Ok(())
        })()),
        BaselineCommand::Upload {
            api,
            name,
            version,
            baseline,
        } => with_client(&api, |c, o| {
            let text = std::fs::read_to_string(&baseline)
                .with_context(|| format!("reading {}", baseline.display()))?;
            let body: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a baseline (JSON)", baseline.display()))?;
            let answer = c.put(
                &path(&["registry", "model", &name, &version, "baseline"]),
                &body,
            )?;
            if o.json {
                return Ok(out::json(&answer)?);
            }
            out::line(format!(
                "model {name} {version}: baseline with {} features",
                answer["features"].as_array().map_or(0, Vec::len)
            ))?;
            Ok(())
        }),
    }
}
