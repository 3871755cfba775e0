//! `fleetgate drift`: drift of model versions on a running gateway.

use clap::Args;
use serde_json::Value;

use super::client::path;
use super::out::{self, Out, Table, cell};
use super::{ApiArgs, ApiClient};

#[derive(Debug, Args)]
pub struct DriftArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Model name; without it, every model version and cohort.
    model: Option<String>,
    version: Option<String>,
    #[arg(long, default_value = "all")]
    cohort: String,
}

/// A number to four decimals, or `-`.
fn num(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.4}"))
}

pub fn run(c: &ApiClient, out: Out, args: &DriftArgs) -> anyhow::Result<()> {
    match (&args.model, &args.version) {
        (Some(m), Some(v)) => {
            let d = c.get_query(&path(&["drift", m, v]), &[("cohort", &args.cohort)])?;
            if out.json {
                return Ok(out::json(&d)?);
            }
            out::fields(&[
                (
                    "model",
                    format!(
                        "{} {} (cohort {})",
                        cell(&d["model"]),
                        cell(&d["version"]),
                        cell(&d["cohort"])
                    ),
                ),
                ("samples", cell(&d["samples"])),
            ])?;
            let mut t = Table::new(&[
                "FEATURE", "STATUS", "OPEN", "N", "PSI", "JS", "KS", "W1", "WARN AT", "ALERT AT",
            ]);
            for f in d["features"].as_array().into_iter().flatten() {
                let w = &f["last_window"];
                t.row(vec![
                    cell(&f["feature"]),
                    cell(&f["status"]),
                    cell(&f["open_window"]["samples"]),
                    cell(&w["n"]),
                    num(&w["psi"]),
                    num(&w["js"]),
                    num(&w["ks"]),
                    num(&w["wasserstein"]),
                    num(&w["warn_threshold"]),
                    num(&w["alert_threshold"]),
                ]);
            }
            // Null when the baseline has no predictions.
            let p = &d["prediction"];
            if !p.is_null() {
                let w = &p["last_window"];
                t.row(vec![
                    "(predictions)".to_owned(),
                    cell(&p["status"]),
                    cell(&p["open_window"]["samples"]),
                    cell(&w["n"]),
                    "-".to_owned(),
                    num(&w["js"]),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    num(&w["js_threshold"]),
                ]);
            }
            t.print()?;
        }
        (None, None) => {
            let list = c.get("/drift")?;
            if out.json {
                return Ok(out::json(&list)?);
            }
            let mut t = Table::new(&[
                "MODEL",
                "VERSION",
                "COHORT",
                "STATUS",
                "PREDICTIONS",
                "ALERTING",
                "WARNING",
                "OPEN WINDOW",
                "LAST WINDOW",
            ]);
            for s in list.as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&s["model"]),
                    cell(&s["version"]),
                    cell(&s["cohort"]),
                    cell(&s["status"]),
                    cell(&s["prediction_status"]),
                    cell(&s["features_alerting"]),
                    cell(&s["features_warning"]),
                    cell(&s["open_window_samples"]),
                    cell(&s["last_window_closed_at"]),
                ]);
            }
            t.print()?;
        }
        _ => anyhow::bail!("give both model and version, or neither"),
    }
    Ok(())
}
