//! `fleetgate keys`: release signing keys, made and read offline.

use std::path::PathBuf;

use clap::Subcommand;

use super::out;
use crate::registry::keys;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new key pair: <out>.key (private, PKCS#8 PEM, mode 0600) and <out>.pub (hex).
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key and key id of a private key file.
    Show { key: PathBuf },
}

pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate { out: stem } => {
            let key = keys::generate()?;
            keys::write(&key, &stem)?;
            let public = key.verifying_key().to_bytes();
            out::line(format!(
                "private key: {} (keep it offline)",
                stem.with_extension("key").display()
            ))?;
            out::line(format!("public key:  {}", keys::hex(&public)))?;
            out::line(format!(
                "key id:      {}",
                keys::hex(&fleetgate_protocol::sign::key_id(&public))
            ))?;
            out::line("(add the public key to registry.trusted_keys and to your devices)")?;
        }
        KeysCommand::Show { key } => {
            let key = keys::read(&key)?;
            let public = key.verifying_key().to_bytes();
            out::line(format!("public key: {}", keys::hex(&public)))?;
            out::line(format!(
                "key id:     {}",
                keys::hex(&fleetgate_protocol::sign::key_id(&public))
            ))?;
        }
    }
    Ok(())
}
