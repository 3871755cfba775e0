//! `fleetgate config`: print the embedded default config, or check a file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use std::io::Write;

use super::{EXIT_USAGE, report};
use crate::Config;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the default config with a comment on every setting.
    Default,
    /// Check a config file and list every problem in it.
    Check { file: PathBuf },
}

pub fn run(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Default => report(
            std::io::stdout()
                .lock()
                .write_all(fleetgate_config::DEFAULT_TOML.as_bytes())
                .map_err(Into::into),
        ),
        ConfigCommand::Check { file } => match Config::load(&file) {
            Ok(_) => {
                report(super::out::line(format!("{}: ok", file.display())).map_err(Into::into))
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
    }
}
