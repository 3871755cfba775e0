//! The `fleetgate` command: runs the gateway and administers a running one. Each command
//! group lives in its own module under `fleetgate::cli`; this only parses and dispatches.

use std::process::ExitCode;

use clap::Parser;
use fleetgate::cli::{self, Cli, Command, report, with_client};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => cli::serve::run(args),
        Command::Config(command) => cli::config::run(command),
        Command::Devices { api, command } => cli::devices::run(&api, command),
        Command::Keys(command) => report(cli::keys::run(command)),
        Command::Bundle(command) => report(cli::bundle::run(command)),
        Command::Registry { api, command } => with_client(&api, |c| cli::registry::run(c, command)),
        Command::Baseline(command) => cli::baseline::run(command),
        Command::Drift(args) => with_client(&args.api, |c| cli::drift::run(c, &args)),
        Command::Alerts { api, command } => with_client(&api, |c| cli::alerts::run(c, command)),
        Command::Rollout { api, command } => with_client(&api, |c| cli::rollout::run(c, command)),
        Command::Updates { api, command } => with_client(&api, |c| cli::updates::run(c, command)),
        Command::Tokens { api, command } => with_client(&api, |c| cli::tokens::run(c, command)),
        Command::Backup(args) => cli::backup::run_backup(&args),
        Command::Restore(args) => cli::backup::run_restore(args),
        Command::Audit(args) => with_client(&args.api, |c| cli::audit::run(c, &args)),
    }
}
