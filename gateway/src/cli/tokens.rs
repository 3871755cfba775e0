//! `fleetgate tokens`: operator API tokens (admin).

use clap::Subcommand;

use super::client::path;
use super::{ApiClient, print_json};

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token and print it once. Roles: read-only (every read), operator (also
    /// rollouts, updates, commands, alerts), admin (also enrollment, registry, tokens, audit).
    Create {
        name: String,
        #[arg(long)]
        role: String,
    },
    /// List tokens created through the API (names and roles; never the secrets).
    List,
    /// Revoke a token; it stops working at once.
    Revoke { name: String },
}

pub fn run(c: &ApiClient, command: TokensCommand) -> anyhow::Result<()> {
    let answer = match command {
        TokensCommand::Create { name, role } => {
            let answer = c.post(
                "/tokens",
                &serde_json::json!({ "name": name, "role": role }),
            )?;
            eprintln!("The token is shown once; store it now.");
            answer
        }
        TokensCommand::List => c.get("/tokens")?,
        TokensCommand::Revoke { name } => c.delete(&path(&["tokens", &name]))?,
    };
    print_json(&answer)
}
