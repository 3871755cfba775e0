//! `fleetgate keys`: release signing keys, made and read offline.

use std::path::PathBuf;

use clap::Subcommand;

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
        KeysCommand::Generate { out } => {
            let key = keys::generate()?;
            keys::write(&key, &out)?;
            let public = key.verifying_key().to_bytes();
            println!(
                "private key: {} (keep it offline)",
                out.with_extension("key").display()
            );
            println!("public key:  {}", keys::hex(&public));
            println!(
                "key id:      {}",
                keys::hex(&fleetgate_protocol::sign::key_id(&public))
            );
            println!("(add the public key to registry.trusted_keys and to your devices)");
        }
        KeysCommand::Show { key } => {
            let key = keys::read(&key)?;
            let public = key.verifying_key().to_bytes();
            println!("public key: {}", keys::hex(&public));
            println!(
                "key id:     {}",
                keys::hex(&fleetgate_protocol::sign::key_id(&public))
            );
        }
    }
    Ok(())
}
