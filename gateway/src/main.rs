//! The `fleetgate` command: runs the gateway and administers a running one. Each command
//! group lives in its own module under `fleetgate::cli`; this only parses and dispatches.

use std::process::ExitCode;

use clap::Parser;
use fleetgate::cli::{self, Cli, Command, report, with_client};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => cli::serve::run(args),
        Command::Config(command) => cli::config::run(command),
        Command::Devices { api, command } => {
            with_client(&api, |c, o| cli::devices::run(c, o, command))
        }
        Command::Keys(command) => report(cli::keys::run(command)),
        Command::Bundle(command) => report(cli::bundle::run(command)),
        Command::Registry {
            api,
            command: cli::registry::RegistryCommand::ImportMlflow(a),
        } => report(cli::registry::import_mlflow(&a, api.out())),
        Command::Registry { api, command } => {
            with_client(&api, |c, o| cli::registry::run(c, o, command))
        }
        Command::Baseline(command) => cli::baseline::run(command),
        Command::Drift(args) => with_client(&args.api, |c, o| cli::drift::run(c, o, &args)),
        Command::Alerts { api, command } => {
            with_client(&api, |c, o| cli::alerts::run(c, o, command))
        }
        Command::Rollout { api, command } => {
            with_client(&api, |c, o| cli::rollout::run(c, o, command))
        }
        Command::Validate { api, command } => {
            with_client(&api, |c, o| cli::validate::run(c, o, command))
        }
        Command::Updates { api, command } => {
            with_client(&api, |c, o| cli::updates::run(c, o, command))
        }
        Command::Tokens { api, command } => {
            with_client(&api, |c, o| cli::tokens::run(c, o, command))
        }
        Command::Backup(args) => cli::backup::run_backup(&args),
        Command::Restore(args) => cli::backup::run_restore(args),
        Command::Audit(args) => with_client(&args.api, |c, o| cli::audit::run(c, o, &args)),
        Command::Uplink(command) => cli::uplink::run(command),
    }
}
