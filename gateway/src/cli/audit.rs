//! `fleetgate audit`: the API's audit log (admin).

use clap::Args;

use super::out::{self, Out, Table, cell};
use super::{ApiArgs, ApiClient};

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

pub fn run(c: &ApiClient, out: Out, args: &AuditArgs) -> anyhow::Result<()> {
    let limit = args.limit.to_string();
    let before = args.before.map(|b| b.to_string());
    let mut query = vec![("limit", limit.as_str())];
    if let Some(b) = &before {
        query.push(("before", b.as_str()));
    }
    let answer = c.get_query("/audit", &query)?;
    if out.json {
        return Ok(out::json(&answer)?);
    }
    let mut t = Table::new(&["ID", "AT", "BY", "ROLE", "METHOD", "STATUS", "PATH"]);
    for e in answer["entries"].as_array().into_iter().flatten() {
        t.row(vec![
            cell(&e["id"]),
            cell(&e["at"]),
            cell(&e["by"]),
            cell(&e["role"]),
            cell(&e["method"]),
            cell(&e["status"]),
            cell(&e["path"]),
        ]);
    }
    Ok(t.print()?)
}
