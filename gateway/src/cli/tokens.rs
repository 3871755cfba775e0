//! `fleetgate tokens`: operator API tokens (admin).

use clap::Subcommand;

use super::ApiClient;
use super::client::path;
use super::out::{self, Out, Table, cell};

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

pub fn run(c: &ApiClient, out: Out, command: TokensCommand) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create { name, role } => {
            let answer = c.post(
                "/tokens",
                &serde_json::json!({ "name": name, "role": role }),
            )?;
            eprintln!("The token is shown once; store it now.");
            if out.json {
                return Ok(out::json(&answer)?);
            }
            out::fields(&[
                ("name", cell(&answer["name"])),
                ("role", cell(&answer["role"])),
                ("token", cell(&answer["token"])),
            ])?;
        }
        TokensCommand::List => {
            let answer = c.get("/tokens")?;
            if out.json {
                return Ok(out::json(&answer)?);
            }
            let mut t = Table::new(&["NAME", "ROLE", "CREATED", "BY"]);
            for k in answer["tokens"].as_array().into_iter().flatten() {
                t.row(vec![
                    cell(&k["name"]),
                    cell(&k["role"]),
                    cell(&k["created"]),
                    cell(&k["created_by"]),
                ]);
            }
            t.print()?;
        }
        TokensCommand::Revoke { name } => {
            let answer = c.delete(&path(&["tokens", &name]))?;
            if out.json {
                return Ok(out::json(&answer)?);
            }
            out::line(format!("revoked token {name}"))?;
        }
    }
    Ok(())
}
