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
use crate::registry::spec::{BundleSpec, golden_from_csv};
use sha2::Digest;

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
    /// The model or firmware image (or the spec's `artifact`).
    artifact: Option<PathBuf>,
    /// A bundle spec (TOML, as `fleetgate registry import-mlflow` writes): kind, name,
    /// version, release, artifact, lineage and more; flags given here override its values.
    #[arg(long)]
    spec: Option<PathBuf>,
    #[arg(long, value_parser = ["model", "firmware"])]
    kind: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    version: Option<semver::Version>,
    /// Monotonic release counter; devices install only a release greater than theirs.
    #[arg(long)]
    release: Option<u64>,
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
    /// A requirement the release must meet on bench devices before a rollout's first
    /// production stage, MEASURE<=LIMIT or MEASURE>=LIMIT (latency_p50_us, latency_p90_us,
    /// latency_p95_us, latency_p99_us, latency_max_us, peak_ram_bytes,
    /// energy_per_inference_uj, accuracy); repeatable. Signed with the manifest's keys.
    #[arg(long = "require", value_parser = parse_requirement)]
    require: Vec<fleetgate_protocol::Requirement>,
    /// The golden set bench devices run: a CSV with a header, a column `expected` (the class
    /// each row must get) and the model's inputs in the other columns.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// Private key to sign with; repeatable for several signatures.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

fn parse_requirement(s: &str) -> Result<fleetgate_protocol::Requirement, String> {
    fleetgate_protocol::Requirement::parse(s).map_err(|e| e.to_string())
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
        BundleCommand::Sign(a) => sign(*a)?,
        BundleCommand::Cosign { bundle, key, trust } => cosign(&bundle, &key, &trust)?,
        BundleCommand::Inspect {
            bundle,
            trust,
            json,
        } => inspect(&bundle, &trust, json)?,
    }
    Ok(())
}

/// `bundle sign`: the spec's values, overridden by the flags given.
fn sign(a: SignArgs) -> anyhow::Result<()> {
    let spec = match &a.spec {
        Some(p) => Some((p.clone(), BundleSpec::load(p)?)),
        None => None,
    };
    let from_spec =
        |f: &dyn Fn(&BundleSpec) -> Option<String>| spec.as_ref().and_then(|(_, s)| f(s));
    let missing = |what: &str| anyhow::anyhow!("give --{what} (or a --spec that has it)");
    let artifact_path = match (&a.artifact, &spec) {
        (Some(p), _) => p.clone(),
        (None, Some((path, s))) => BundleSpec::resolve(path, &s.artifact),
        (None, None) => anyhow::bail!("give the artifact file (or a --spec that names it)"),
    };
    let kind_name = a
        .kind
        .clone()
        .or_else(|| from_spec(&|s| Some(s.kind.clone())))
        .ok_or_else(|| missing("kind"))?;
    let kind = fleetgate_protocol::ArtifactKind::from_name(&kind_name)
        .with_context(|| format!("kind {kind_name:?} is not model or firmware"))?;
    let name = a
        .name
        .clone()
        .or_else(|| from_spec(&|s| Some(s.name.clone())))
        .ok_or_else(|| missing("name"))?;
    let version = match &a.version {
        Some(v) => v.clone(),
        None => {
            let text = from_spec(&|s| Some(s.version.clone())).ok_or_else(|| missing("version"))?;
            semver::Version::parse(&text)
                .with_context(|| format!("the spec's version {text:?} is not a semantic version"))?
        }
    };
    let release = a
        .release
        .or_else(|| spec.as_ref().and_then(|(_, s)| s.release))
        .ok_or_else(|| missing("release"))?;
    let runtime = match (&a.runtime, from_spec(&|s| s.runtime.clone())) {
        (Some(r), _) => Some(r.clone()),
        (None, Some(text)) => Some(parse_runtime(&text).map_err(anyhow::Error::msg)?),
        (None, None) => None,
    };
    let mut classes = a.classes.clone();
    let mut lineage: std::collections::BTreeMap<String, String> = Default::default();
    let mut tags = Vec::new();
    let mut require = Vec::new();
    let mut golden_path = a.golden.clone();
    let mut arch = a.arch.clone();
    if let Some((path, s)) = &spec {
        if classes.is_empty() {
            classes = s.classes.clone();
        }
        arch = arch.or_else(|| s.arch.clone());
        lineage = s.lineage.clone();
        tags = s.tags.clone();
        for r in &s.requirements {
            require.push(
                parse_requirement(r)
                    .map_err(|e| anyhow::anyhow!("the spec's requirement {r:?}: {e}"))?,
            );
        }
        if golden_path.is_none() {
            golden_path = s.golden.as_ref().map(|g| BundleSpec::resolve(path, g));
        }
    }
    lineage.extend(a.lineage.iter().cloned());
    for t in &a.tags {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    if !a.require.is_empty() {
        require = a.require.clone();
    }
    let artifact = std::fs::read(&artifact_path)
        .with_context(|| format!("reading {}", artifact_path.display()))?;
    if let Some(want) = spec.as_ref().and_then(|(_, s)| s.artifact_sha256.clone()) {
        let got = keys::hex(&<[u8; 32]>::from(sha2::Sha256::digest(&artifact)));
        if !got.eq_ignore_ascii_case(&want) {
            anyhow::bail!(
                "{}: its SHA-256 is {got}, the spec says {want}: it changed since the spec was written",
                artifact_path.display()
            );
        }
    }
    let golden = match &golden_path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(golden_from_csv(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    if golden.is_some() && require.is_empty() {
        anyhow::bail!("a golden set goes with requirements: give at least one --require");
    }
    let signing = a
        .keys
        .iter()
        .map(|k| keys::read(k))
        .collect::<Result<Vec<_>, _>>()?;
    let now = crate::clock::now_ms();
    let spec = ManifestSpec {
        kind,
        name,
        version,
        release,
        compat: fleetgate_protocol::Compat {
            classes,
            arch,
            min_ram_bytes: a.min_ram,
            min_flash_bytes: a.min_flash,
            runtime,
        },
        chunk_size: a.chunk_size,
        created_ms: now,
        expires_ms: now + a.expires_in.as_millis() as u64,
    };
    let mut b = BundleFile::sign(artifact, spec, &signing, lineage, tags);
    let manifest: fleetgate_protocol::Manifest =
        fleetgate_protocol::decode(&b.manifest.body, fleetgate_protocol::Encoding::Postcard)
            .context("the manifest is not valid")?;
    if !require.is_empty() {
        b.require(require, golden.as_ref(), &signing)?;
    }
    std::fs::write(&a.out, b.encode()).with_context(|| format!("writing {}", a.out.display()))?;
    let extra = match b.requirements_unchecked()? {
        Some(c) => format!(
            ", {} requirement(s){}",
            c.requirements.rules.len(),
            c.golden
                .map(|g| format!(" and a golden set of {} cases", g.cases.len()))
                .unwrap_or_default()
        ),
        None => String::new(),
    };
    out::line(format!(
        "wrote {} ({} {} {}, release {}, {} bytes in {} chunks, {} signature(s){extra})",
        a.out.display(),
        manifest.kind.name(),
        manifest.name,
        manifest.version,
        manifest.release,
        manifest.size,
        manifest.chunk_count(),
        b.manifest.signatures.len()
    ))?;
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
    if b.validation.is_some() {
        // Requirements are vouched for with the manifest: every signature on them checked too.
        let all = b
            .validation
            .as_ref()
            .map_or(1, |v| v.requirements.signatures.len());
        b.check_requirements(&trusted, all).context(name.clone())?;
    }
    b.manifest
        .add_signature(fleetgate_protocol::Domain::Manifest, &signing);
    if let Some(v) = b.validation.as_mut() {
        v.requirements
            .add_signature(fleetgate_protocol::Domain::Requirements, &signing);
    }
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
    let requirements = match &b.validation {
        None => serde_json::Value::Null,
        Some(_) => {
            let checked = if trusted.is_empty() {
                b.requirements_unchecked()
            } else {
                b.check_requirements(&trusted, threshold.unwrap_or(1))
            };
            match checked {
                Ok(Some(c)) => json!({
                    "rules": c.requirements.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "golden_cases": c.golden.map_or(0, |g| g.cases.len()),
                }),
                Ok(None) => serde_json::Value::Null,
                Err(e) => {
                    problems.push(e.to_string());
                    json!({ "problem": e.to_string() })
                }
            }
        }
    };
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
        "requirements": requirements,
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
            ("requirements", cell(&view["requirements"])),
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
