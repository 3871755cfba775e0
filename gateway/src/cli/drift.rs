//! `fleetgate drift`: drift of model versions on a running gateway.

use clap::Args;

use super::client::path;
use super::{ApiArgs, ApiClient, print_json};

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

pub fn run(c: &ApiClient, args: &DriftArgs) -> anyhow::Result<()> {
    let answer = match (&args.model, &args.version) {
        (Some(m), Some(v)) => c.get_query(&path(&["drift", m, v]), &[("cohort", &args.cohort)])?,
        (None, None) => c.get("/drift")?,
        _ => anyhow::bail!("give both model and version, or neither"),
    };
    print_json(&answer)
}
