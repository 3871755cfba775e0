//! `fleetgate bundle`: sign, co-sign and inspect bundles, offline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetgate_protocol::manifest::ManifestSpec;
use serde_json::json;

use super::parse_label;
use crate::registry::bundle::BundleFile;
use crate::registry::keys;

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build and sign a bundle from an artifact file.
    Sign(Box<SignArgs>),
    /// Add a signature by another key to a bundle (for k-of-n signing).
    Cosign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Print a bundle's manifest and signatures.
    Inspect { bundle: PathBuf },
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The model or firmware image.
    artifact: PathBuf,
    #[arg(long, value_parser = ["model", "firmware"])]
    kind: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    version: semver::Version,
    /// Monotonic release counter; devices install only a release greater than theirs.
    #[arg(long)]
    release: u64,
    /// Device class it runs on; repeatable; none: any class.
    #[arg(long = "class")]
    classes: Vec<String>,
    #[arg(long)]
    arch: Option<String>,
    #[arg(long, default_value_t = 0)]
    min_ram: u64,
    #[arg(long, default_value_t = 0)]
    min_flash: u64,
    /// Required runtime, NAME>=VERSION (e.g. tflm>=2.14.0).
    #[arg(long, value_parser = parse_runtime)]
    runtime: Option<fleetgate_protocol::manifest::RuntimeReq>,
    #[arg(long, default_value_t = 16384)]
    chunk_size: u32,
    /// How long devices accept the manifest.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    expires_in: Duration,
    /// Provenance, key=value (training run, dataset hash, accuracy...); repeatable.
    #[arg(long = "lineage", value_parser = parse_label)]
    lineage: Vec<(String, String)>,
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Private key to sign with; repeatable for several signatures.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

fn parse_runtime(s: &str) -> Result<fleetgate_protocol::manifest::RuntimeReq, String> {
    let (name, version) = s
        .split_once(">=")
        .ok_or_else(|| format!("{s:?} is not NAME>=VERSION"))?;
    let min_version =
        semver::Version::parse(version.trim()).map_err(|e| format!("{version}: {e}"))?;
    Ok(fleetgate_protocol::manifest::RuntimeReq {
        name: name.trim().to_owned(),
        min_version,
    })
}

pub fn run(command: BundleCommand) -> anyhow::Result<()> {
    match command {
        BundleCommand::Sign(a) => {
            let artifact = std::fs::read(&a.artifact)
                .with_context(|| format!("reading {}", a.artifact.display()))?;
            let signing = a
                .keys
                .iter()
                .map(|k| keys::read(k))
                .collect::<Result<Vec<_>, _>>()?;
            let now = crate::clock::now_ms();
            let kind = fleetgate_protocol::ArtifactKind::from_name(&a.kind)
                .context("kind is model or firmware")?;
            let spec = ManifestSpec {
                kind,
                name: a.name,
                version: a.version,
                release: a.release,
                compat: fleetgate_protocol::Compat {
                    classes: a.classes,
                    arch: a.arch,
                    min_ram_bytes: a.min_ram,
                    min_flash_bytes: a.min_flash,
                    runtime: a.runtime,
                },
                chunk_size: a.chunk_size,
                created_ms: now,
                expires_ms: now + a.expires_in.as_millis() as u64,
            };
            let b = BundleFile::sign(
                artifact,
                spec,
                &signing,
                a.lineage.into_iter().collect(),
                a.tags,
            );
            let manifest: fleetgate_protocol::Manifest = fleetgate_protocol::decode(
                &b.manifest.body,
                fleetgate_protocol::Encoding::Postcard,
            )
            .context("the manifest is not valid")?;
            std::fs::write(&a.out, b.encode())
                .with_context(|| format!("writing {}", a.out.display()))?;
            println!(
                "wrote {} ({} {} {}, release {}, {} bytes in {} chunks, {} signature(s))",
                a.out.display(),
                manifest.kind.name(),
                manifest.name,
                manifest.version,
                manifest.release,
                manifest.size,
                manifest.chunk_count(),
                b.manifest.signatures.len()
            );
        }
        BundleCommand::Cosign { bundle, key } => {
            let mut b = BundleFile::decode(&std::fs::read(&bundle)?)?;
            b.manifest
                .add_signature(fleetgate_protocol::Domain::Manifest, &keys::read(&key)?);
            std::fs::write(&bundle, b.encode())?;
            println!(
                "{}: now {} signature(s)",
                bundle.display(),
                b.manifest.signatures.len()
            );
        }
        BundleCommand::Inspect { bundle } => {
            let b = BundleFile::decode(&std::fs::read(&bundle)?)?;
            let m: fleetgate_protocol::Manifest = fleetgate_protocol::decode(
                &b.manifest.body,
                fleetgate_protocol::Encoding::Postcard,
            )?;
            let sigs: Vec<String> = b
                .manifest
                .signatures
                .iter()
                .map(|s| keys::hex(&s.key_id))
                .collect();
            let view = json!({
                "kind": m.kind.name(), "name": m.name, "version": m.version.to_string(), "release": m.release,
                "compat": m.compat, "size": m.size, "sha256": keys::hex(&m.sha256), "chunk_size": m.chunk_size,
                "chunks": m.chunk_count(), "merkle_root": keys::hex(&m.merkle_root),
                "created": crate::clock::rfc3339(m.created_ms), "expires": crate::clock::rfc3339(m.expires_ms),
                "signed_by": sigs, "lineage": b.lineage, "tags": b.tags,
            });
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
    }
    Ok(())
}
