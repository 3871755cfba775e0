//! `fleetgate bundle`: sign, co-sign and inspect bundles, offline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetgate_protocol::manifest::ManifestSpec;
use serde_json::json;

use super::out::{self, cell};
use super::parse_label;
use crate::registry::bundle::{BundleFile, SignatureStatus};
use crate::registry::keys;

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build and sign a bundle from an artifact file.
    Sign(Box<SignArgs>),
    /// Add a signature by another key to a bundle (for k-of-n signing). The artifact, the
    /// expiry and every signature already on the bundle are checked first: give the public
    /// keys of the earlier signers with --trust (or the gateway config with --config).
    Cosign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Print a bundle's manifest, check its artifact and expiry, and verify its signatures
    /// against the keys given with --trust or --config (exit 1 if anything is wrong).
    Inspect {
        bundle: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The public keys signatures are checked against.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// A public key to check signatures with: 64 hex characters or a .pub file; repeatable.
    #[arg(long = "trust")]
    trust: Vec<String>,
    /// A gateway config: its registry.trusted_keys are trusted, and its threshold applies.
    #[arg(short, long)]
    config: Option<PathBuf>,
}

impl TrustArgs {
    /// The trusted keys, and the threshold when a config gave one.
    fn keys(&self) -> anyhow::Result<(Vec<[u8; 32]>, Option<usize>)> {
        let mut keys = Vec::new();
        for k in &self.trust {
            keys.push(keys::read_public(k)?);
        }
        let mut threshold = None;
        if let Some(path) = &self.config {
            let config = crate::Config::load(path)?;
            keys.extend(config.registry.trusted_keys);
            threshold = Some(config.registry.threshold);
        }
        keys.sort_unstable();
        keys.dedup();
        Ok((keys, threshold))
    }
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
            out::line(format!(
                "wrote {} ({} {} {}, release {}, {} bytes in {} chunks, {} signature(s))",
                a.out.display(),
                manifest.kind.name(),
                manifest.name,
                manifest.version,
                manifest.release,
                manifest.size,
                manifest.chunk_count(),
                b.manifest.signatures.len()
            ))?;
        }
        BundleCommand::Cosign { bundle, key, trust } => cosign(&bundle, &key, &trust)?,
        BundleCommand::Inspect {
            bundle,
            trust,
            json,
        } => inspect(&bundle, &trust, json)?,
    }
    Ok(())
}

fn read_bundle(path: &Path) -> anyhow::Result<BundleFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    BundleFile::decode(&bytes).with_context(|| path.display().to_string())
}

/// Adds a signature only to a bundle that is whole, unexpired, and whose every signature
/// verifies: co-signing vouches for the bundle as it is.
fn cosign(bundle: &Path, key: &Path, trust: &TrustArgs) -> anyhow::Result<()> {
    let name = bundle.display().to_string();
    let mut b = read_bundle(bundle)?;
    let signing = keys::read(key)?;
    let m = b.check_artifact().context(name.clone())?;
    let now = crate::clock::now_ms();
    if now >= m.expires_ms {
        anyhow::bail!(
            "{name}: the manifest expired at {}; sign a new bundle instead",
            crate::clock::rfc3339(m.expires_ms)
        );
    }
    let (mut trusted, _) = trust.keys()?;
    // The co-signer's own earlier signature is checked too (and then replaced).
    trusted.push(signing.verifying_key().to_bytes());
    for (id, status) in b.signatures(&trusted) {
        match status {
            SignatureStatus::Valid => {}
            SignatureStatus::Invalid => anyhow::bail!(
                "{name}: the signature by key {} does not verify: the bundle was changed after it was signed",
                keys::hex(&id)
            ),
            SignatureStatus::Unknown => anyhow::bail!(
                "{name}: the signature by key {} cannot be checked; give its public key with --trust (or the gateway config with --config)",
                keys::hex(&id)
            ),
        }
    }
    b.manifest
        .add_signature(fleetgate_protocol::Domain::Manifest, &signing);
    if b.manifest.signatures.len() > fleetgate_protocol::sign::MAX_SIGNATURES {
        anyhow::bail!(
            "{name}: a manifest carries at most {} signatures",
            fleetgate_protocol::sign::MAX_SIGNATURES
        );
    }
    // Written aside and renamed, so a failure never leaves half a bundle.
    let tmp = bundle.with_extension("fgb.tmp");
    std::fs::write(&tmp, b.encode()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, bundle).with_context(|| format!("writing {name}"))?;
    out::line(format!(
        "{name}: now {} signature(s), each checked",
        b.manifest.signatures.len()
    ))?;
    Ok(())
}

fn inspect(bundle: &Path, trust: &TrustArgs, json: bool) -> anyhow::Result<()> {
    let name = bundle.display().to_string();
    let b = read_bundle(bundle)?;
    let m = b.manifest().context(name.clone())?;
    let (trusted, threshold) = trust.keys()?;
    let mut problems: Vec<String> = Vec::new();
    let artifact = match b.check_artifact() {
        Ok(_) => "matches the manifest".to_owned(),
        Err(e) => {
            problems.push(e.to_string());
            e.to_string()
        }
    };
    let now = crate::clock::now_ms();
    let expired = now >= m.expires_ms;
    if expired {
        problems.push(format!(
            "the manifest expired at {}",
            crate::clock::rfc3339(m.expires_ms)
        ));
    }
    let signatures = b.signatures(&trusted);
    let valid = signatures
        .iter()
        .filter(|(_, s)| *s == SignatureStatus::Valid)
        .count();
    for (id, status) in &signatures {
        if *status == SignatureStatus::Invalid {
            problems.push(format!(
                "the signature by key {} does not verify",
                keys::hex(id)
            ));
        }
    }
    if !trusted.is_empty() {
        let needed = threshold.unwrap_or(1);
        if valid < needed {
            problems.push(format!(
                "{valid} valid signature(s) by trusted keys, {needed} needed"
            ));
        }
    }
    let view = json!({
        "kind": m.kind.name(), "name": m.name, "version": m.version.to_string(), "release": m.release,
        "compat": m.compat, "size": m.size, "sha256": keys::hex(&m.sha256), "chunk_size": m.chunk_size,
        "chunks": m.chunk_count(), "merkle_root": keys::hex(&m.merkle_root),
        "created": crate::clock::rfc3339(m.created_ms), "expires": crate::clock::rfc3339(m.expires_ms),
        "expired": expired,
        "artifact": artifact,
        "signatures": signatures.iter().map(|(id, s)| json!({ "key_id": keys::hex(id), "status": s.name() })).collect::<Vec<_>>(),
        "valid_signatures": valid,
        "lineage": b.lineage, "tags": b.tags,
        "problems": problems,
    });
    if json {
        out::json(&view)?;
    } else {
        let sigs: Vec<String> = signatures
            .iter()
            .map(|(id, s)| format!("{} {}", keys::hex(id), s.name()))
            .collect();
        out::fields(&[
            (
                "release",
                format!(
                    "{} {} {} (release {})",
                    m.kind.name(),
                    m.name,
                    m.version,
                    m.release
                ),
            ),
            ("compat", cell(&view["compat"])),
            (
                "artifact",
                format!(
                    "{} bytes, sha256 {}, {} chunks of {} bytes: {artifact}",
                    m.size,
                    keys::hex(&m.sha256),
                    m.chunk_count(),
                    m.chunk_size
                ),
            ),
            ("merkle root", keys::hex(&m.merkle_root)),
            ("created", crate::clock::rfc3339(m.created_ms)),
            (
                "expires",
                format!(
                    "{}{}",
                    crate::clock::rfc3339(m.expires_ms),
                    if expired { " (expired)" } else { "" }
                ),
            ),
            ("signatures", sigs.join(", ")),
            ("lineage", cell(&view["lineage"])),
            ("tags", cell(&view["tags"])),
        ])?;
    }
    if trusted.is_empty() && !b.manifest.signatures.is_empty() {
        eprintln!(
            "(signatures not checked: give the signers' public keys with --trust or --config)"
        );
    }
    match problems.len() {
        0 => Ok(()),
        n => anyhow::bail!("{name}: {n} problem(s): {}", problems.join("; ")),
    }
}
