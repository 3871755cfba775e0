//! `fleetgate audit`: the API's audit log (admin).

use clap::Args;

use super::{ApiArgs, ApiClient, print_json};

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Entries numbered below this (to page back).
    #[arg(long)]
    before: Option<u64>,
}

pub fn run(c: &ApiClient, args: &AuditArgs) -> anyhow::Result<()> {
    let limit = args.limit.to_string();
    let before = args.before.map(|b| b.to_string());
    let mut query = vec![("limit", limit.as_str())];
    if let Some(b) = &before {
        query.push(("before", b.as_str()));
    }
    print_json(&c.get_query("/audit", &query)?)
}
