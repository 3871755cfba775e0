//! `fleetgate config`: print the embedded default config, or check a file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::EXIT_USAGE;
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
        ConfigCommand::Default => {
            print!("{}", fleetgate_config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        ConfigCommand::Check { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
    }
}
