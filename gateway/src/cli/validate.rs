//! `fleetgate validate`: run a release on bench devices, show its results, compare two
//! versions requirement by requirement per hardware class.

use clap::Subcommand;
use serde_json::{Value, json};

use super::client::path;
use super::out::{self, Out, Table, cell};
use super::{ApiClient, Unsuccessful};

#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a release (version or alias) on bench devices: each downloads it into its
    /// spare slot, runs the golden set and reports what it measured. Exits 1 if it started on
    /// no device.
    Run {
        kind: String,
        name: String,
        version: String,
        /// Only these bench devices (default: every bench device); repeatable.
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Golden set runs per device (default: the gateway's validation.repeat).
        #[arg(long)]
        repeat: Option<u32>,
    },
    /// A release's requirements and each bench device's latest result, per hardware class.
    /// Exits 1 if a result fails a requirement.
    Show {
        kind: String,
        name: String,
        version: String,
    },
    /// Each requirement's value in two versions and the difference, per hardware class (the
    /// worst bench device of the class).
    Compare {
        kind: String,
        name: String,
        old: String,
        new: String,
    },
}

/// A number as people read it: integers without decimals, shares to four places.
fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => crate::validation::show(x),
        None => "-".to_owned(),
    }
}

fn signed(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x > 0.0 => format!("+{}", crate::validation::show(x)),
        Some(x) => crate::validation::show(x),
        None => "-".to_owned(),
    }
}

pub fn run(client: &ApiClient, out: Out, command: ValidateCommand) -> anyhow::Result<()> {
    match command {
        ValidateCommand::Run {
            kind,
            name,
            version,
            devices,
            repeat,
        } => {
            let mut body = json!({ "kind": kind, "name": name, "version": version });
            if !devices.is_empty() {
                body["devices"] = json!(devices);
            }
            if let Some(r) = repeat {
                body["repeat"] = json!(r);
            }
            let plan = client.post("/validations", &body)?;
            let started = plan["started"].as_array().map_or(0, Vec::len);
            if out.json {
                out::json(&plan)?;
            } else {
                let mut t = Table::new(&["BENCH DEVICE", "TRANSFER"]);
                for s in plan["started"].as_array().into_iter().flatten() {
                    t.row(vec![cell(&s["device"]), cell(&s["transfer"])]);
                }
                if started > 0 {
                    t.print()?;
                }
                super::rollout::skipped(&plan["skipped"])?;
            }
            if started == 0 {
                return Err(Unsuccessful(format!(
                    "{kind} {name} {version}: validation started on no bench device"
                ))
                .into());
            }
        }
        ValidateCommand::Show {
            kind,
            name,
            version,
        } => {
            let v = client.get(&path(&["validations", &kind, &name, &version]))?;
            let failed: u64 = v["classes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, c)| c["failed"].as_u64().unwrap_or(0))
                .sum();
            if out.json {
                out::json(&v)?;
            } else {
                show(&v)?;
            }
            if failed > 0 {
                return Err(Unsuccessful(format!(
                    "{kind} {name} {version}: {failed} bench device(s) fail a requirement"
                ))
                .into());
            }
        }
        ValidateCommand::Compare {
            kind,
            name,
            old,
            new,
        } => {
            let v = client.get(&path(&["validations", &kind, &name, "compare", &old, &new]))?;
            if out.json {
                return Ok(out::json(&v)?);
            }
            let old_v = cell(&v["old"]);
            let new_v = cell(&v["new"]);
            let mut t = Table::new(&[
                "CLASS",
                "MEASURE",
                "REQUIREMENT",
                &old_v,
                &new_v,
                "DIFFERENCE",
                "MET",
            ]);
            for r in v["rows"].as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&r["class"]),
                    cell(&r["measure"]),
                    cell(&r["requirement"]),
                    num(&r["old"]),
                    num(&r["new"]),
                    signed(&r["difference"]),
                    match r["met"].as_bool() {
                        Some(true) => "yes".to_owned(),
                        Some(false) => "NO".to_owned(),
                        None => "-".to_owned(),
                    },
                ]);
            }
            t.print()?;
        }
    }
    Ok(())
}

fn show(v: &Value) -> anyhow::Result<()> {
    out::line(format!(
        "{} {} {} (release {})",
        cell(&v["kind"]),
        cell(&v["name"]),
        cell(&v["version"]),
        cell(&v["release"])
    ))?;
    let reqs = v["requirements"].as_array().cloned().unwrap_or_default();
    if reqs.is_empty() {
        out::line("requirements: none (results are measured, nothing is judged)")?;
    }
    for r in &reqs {
        let classes = r["classes"]
            .as_array()
            .filter(|c| !c.is_empty())
            .map_or("any class".to_owned(), |c| {
                c.iter().map(cell).collect::<Vec<_>>().join(", ")
            });
        let rules: Vec<String> = r["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(cell)
            .collect();
        out::line(format!(
            "requirements for {classes}: {} (golden set: {} cases; signed by {})",
            rules.join(", "),
            cell(&r["golden_cases"]),
            cell(&r["signed_by"])
        ))?;
    }
    let mut t = Table::new(&[
        "CLASS", "DEVICE", "VERDICT", "P50 US", "P95 US", "P99 US", "PEAK RAM", "UJ/INF",
        "ACCURACY", "MISSED",
    ]);
    for r in v["results"].as_array().into_iter().flatten() {
        let vals = &r["values"];
        let missed: Vec<String> = r["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["met"] == json!(false))
            .map(|c| format!("{} ({})", cell(&c["requirement"]), num(&c["value"])))
            .chain(r["error"].as_str().map(str::to_owned))
            .collect();
        t.row(vec![
            cell(&r["class"]),
            cell(&r["device"]),
            cell(&r["verdict"]),
            num(&vals["latency_p50_us"]),
            num(&vals["latency_p95_us"]),
            num(&vals["latency_p99_us"]),
            num(&vals["peak_ram_bytes"]),
            num(&vals["energy_per_inference_uj"]),
            num(&vals["accuracy"]),
            if missed.is_empty() {
                "-".to_owned()
            } else {
                missed.join("; ")
            },
        ]);
    }
    t.print()?;
    Ok(())
}
