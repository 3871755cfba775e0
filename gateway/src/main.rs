//! The `fleetgate` command: runs the gateway and administers a running one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetgate::auth::TokenSource;
use fleetgate::cli::{ApiClient, ClientError};
use fleetgate::{Config, Gateway};
use serde_json::{Value, json};

/// Exit code for a bad config file or bad arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Edge gateway for fleets of TinyML devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Without --config it runs on the embedded default config.
    Serve(ServeArgs),
    /// Print the default config, or check a config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Enroll and manage devices through a running gateway.
    Devices {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Create release signing keys (offline).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign, co-sign and inspect bundles (offline).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Upload bundles and manage releases on a running gateway.
    Registry {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Build a model's drift baseline from reference data (offline), or upload one.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Show drift of model versions on a running gateway.
    Drift {
        #[command(flatten)]
        api: ApiArgs,
        /// Model name; without it, every model version and cohort.
        model: Option<String>,
        version: Option<String>,
        #[arg(long, default_value = "all")]
        cohort: String,
    },
    /// List, acknowledge and resolve alerts (hardware and drift) on a running gateway.
    Alerts {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Staged rollouts with automatic rollback on a running gateway.
    Rollout {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Start, follow and cancel updates on a running gateway.
    Updates {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: UpdatesCommand,
    },
    /// Create, list and revoke operator API tokens (needs an admin token).
    Tokens {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Back up a gateway into one file: a consistent snapshot of the database (taken by the
    /// running gateway, or directly when it is stopped), the rest of the data dir (artifacts,
    /// keys, the API token) and the config file. Run it on the gateway's host (admin token).
    Backup {
        #[command(flatten)]
        api: ApiArgs,
        /// The archive to write (a tar file).
        file: PathBuf,
    },
    /// Restore a backup onto a fresh data dir (the gateway must not be running on it).
    Restore {
        /// The archive from `fleetgate backup`.
        file: PathBuf,
        /// The data dir to fill; it must not hold a database yet.
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the archived config file.
        #[arg(long)]
        config_out: Option<PathBuf>,
    },
    /// Show the audit log: every change made through the API, newest first (admin).
    Audit {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Entries numbered below this (to page back).
        #[arg(long)]
        before: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
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

fn tokens(c: &ApiClient, command: TokensCommand) -> anyhow::Result<()> {
    let answer = match command {
        TokensCommand::Create { name, role } => {
            let answer = c.post(
                "/tokens",
                &serde_json::json!({ "name": name, "role": role }),
            )?;
            eprintln!("The token is shown once; store it now.");
            answer
        }
        TokensCommand::List => c.get("/tokens")?,
        TokensCommand::Revoke { name } => c.delete(&format!("/tokens/{name}"))?,
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Write a new key pair: <out>.key (private, PKCS#8 PEM, mode 0600) and <out>.pub (hex).
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key and key id of a private key file.
    Show { key: PathBuf },
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
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
struct SignArgs {
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

#[derive(Debug, Subcommand)]
enum BaselineCommand {
    /// Build a baseline from a reference CSV (one column per feature, in the model's input
    /// order; optional prediction and confidence columns).
    Build {
        csv: PathBuf,
        #[arg(long)]
        prediction: Option<String>,
        #[arg(long)]
        confidence: Option<String>,
        /// Bins per feature (at reference quantiles).
        #[arg(long, default_value_t = 10)]
        bins: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Set a registered model version's baseline on a running gateway.
    Upload {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        version: String,
        baseline: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Upload a signed bundle.
    Upload { bundle: PathBuf },
    /// List releases.
    List,
    /// Point an alias (e.g. production) at a version.
    Alias {
        kind: String,
        name: String,
        alias: String,
        version: String,
    },
}

#[derive(Debug, Subcommand)]
enum UpdatesCommand {
    /// Offer a release (version or alias) to devices.
    Start {
        kind: String,
        name: String,
        version: String,
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Every enrolled device.
        #[arg(long, conflicts_with = "devices")]
        all: bool,
    },
    /// List transfers, newest first.
    List {
        #[arg(long)]
        device: Option<String>,
    },
    /// Cancel a transfer.
    Cancel { id: u64 },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Roll a release (version or alias) out in stages; the configured policy applies, with
    /// any of its settings overridden by --stages, --bake or --policy.
    Create {
        kind: String,
        name: String,
        version: String,
        /// Every enrolled device (compatible hardware only).
        #[arg(long, conflicts_with_all = ["labels", "devices"])]
        all: bool,
        /// Devices with this label, key=value; repeatable (all must match).
        #[arg(long = "label", value_parser = parse_label, conflicts_with = "devices")]
        labels: Vec<(String, String)>,
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Stage sizes, e.g. 5,10%,50%,100%.
        #[arg(long, value_delimiter = ',')]
        stages: Vec<String>,
        /// Bake time of every stage, e.g. 30m.
        #[arg(long)]
        bake: Option<String>,
        /// A TOML file of [rollouts.policy] settings to override (keys at its top level).
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// List rollouts, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
    },
    /// A rollout's stage, counts and health gates.
    Show { id: u64 },
    /// Stop starting updates and advancing (the health gates still watch).
    Pause {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    Resume {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop the rollout; devices keep what they run.
    Abort {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop the rollout and send every device that took the new version back.
    Rollback {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// A rollout's devices and their states.
    Devices {
        id: u64,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        stage: Option<usize>,
    },
    /// Every decision and operator action, with the numbers.
    Audit { id: u64 },
    /// The public key devices must trust for rollback directives.
    Key,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file; missing settings keep their defaults.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Overrides storage.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides mqtt.listen.
    #[arg(long)]
    mqtt_listen: Option<std::net::SocketAddr>,
    /// Overrides http.listen.
    #[arg(long)]
    http_listen: Option<std::net::SocketAddr>,
    /// How long shutdown may take per phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the default config with a comment on every setting.
    Default,
    /// Check a config file and list every problem in it.
    Check { file: PathBuf },
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// Gateway API address; default from the config's http.listen.
    #[arg(long, env = "FLEETGATE_URL", global = true)]
    url: Option<String>,
    /// Operator token; default from the config or <data_dir>/api-token.
    #[arg(
        long,
        env = "FLEETGATE_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// The gateway's config file, to find its address and token.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Enroll a device and print its credential (shown only this once).
    Enroll {
        id: String,
        /// A label, key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List devices.
    List,
    /// Show one device.
    Show { id: String },
    /// Issue a new credential; the old one stops working at once.
    Rotate { id: String },
    /// Revoke a device's credential and disconnect it; its history is kept.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum AlertsCommand {
    /// List alerts, newest first.
    List {
        /// open, acknowledged or resolved.
        #[arg(long)]
        state: Option<String>,
        /// info, warning or critical.
        #[arg(long)]
        severity: Option<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Acknowledge an alert: someone is on it (it stays open until resolved).
    Ack { id: u64 },
    /// Resolve an alert by hand.
    Resolve { id: u64 },
}

fn alerts(c: &ApiClient, command: AlertsCommand) -> anyhow::Result<()> {
    let answer = match command {
        AlertsCommand::List {
            state,
            severity,
            device,
            limit,
        } => {
            let limit = limit.to_string();
            let mut query = vec![("limit", limit.as_str())];
            for (name, value) in [
                ("state", &state),
                ("severity", &severity),
                ("device", &device),
            ] {
                if let Some(v) = value {
                    query.push((name, v.as_str()));
                }
            }
            c.get_query("/alerts", &query)?
        }
        AlertsCommand::Ack { id } => c.post(&format!("/alerts/{id}/ack"), &Value::Null)?,
        AlertsCommand::Resolve { id } => c.post(&format!("/alerts/{id}/resolve"), &Value::Null)?,
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
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

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", fleetgate_config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Devices { api, command } => devices(api, command),
        Command::Keys(command) => report(keys(command)),
        Command::Bundle(command) => report(bundle(command)),
        Command::Registry { api, command } => match client(&api) {
            Ok(c) => report(registry(&c, command)),
            Err(code) => code,
        },
        Command::Baseline(BaselineCommand::Build {
            csv,
            prediction,
            confidence,
            bins,
            out,
        }) => report((|| {
            let text = std::fs::read_to_string(&csv)
                .with_context(|| format!("reading {}", csv.display()))?;
            let b = fleetgate::drift::baseline::Baseline::from_csv(
                &text,
                prediction.as_deref(),
                confidence.as_deref(),
                bins,
            )?;
            std::fs::write(&out, serde_json::to_string_pretty(&b)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {}: {} features, {} reference rows",
                out.display(),
                b.features.len(),
                b.features[0].n
            );
            Ok(())
        })()),
        Command::Baseline(BaselineCommand::Upload {
            api,
            name,
            version,
            baseline,
        }) => match client(&api) {
            Ok(c) => report((|| {
                let body: Value = serde_json::from_str(&std::fs::read_to_string(&baseline)?)?;
                let answer = c.put(&format!("/registry/model/{name}/{version}/baseline"), &body)?;
                println!(
                    "model {name} {version}: baseline with {} features",
                    answer["features"].as_array().map_or(0, Vec::len)
                );
                Ok(())
            })()),
            Err(code) => code,
        },
        Command::Drift {
            api,
            model,
            version,
            cohort,
        } => match client(&api) {
            Ok(c) => report((|| {
                let answer = match (model, version) {
                    (Some(m), Some(v)) => {
                        c.get_query(&format!("/drift/{m}/{v}"), &[("cohort", &cohort)])?
                    }
                    (None, None) => c.get("/drift")?,
                    _ => anyhow::bail!("give both model and version, or neither"),
                };
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(())
            })()),
            Err(code) => code,
        },
        Command::Alerts { api, command } => match client(&api) {
            Ok(c) => report(alerts(&c, command)),
            Err(code) => code,
        },
        Command::Rollout { api, command } => match client(&api) {
            Ok(c) => report(rollout(&c, command)),
            Err(code) => code,
        },
        Command::Updates { api, command } => match client(&api) {
            Ok(c) => report(updates(&c, command)),
            Err(code) => code,
        },
        Command::Backup { api, file } => backup(&api, &file),
        Command::Restore {
            file,
            data_dir,
            config_out,
        } => report(
            fleetgate::backup::restore(&file, &data_dir, config_out.as_deref())
                .map(|r| {
                    let bytes: u64 = r.manifest.files.iter().map(|f| f.bytes).sum();
                    println!(
                        "restored {} files ({bytes} bytes) from a backup of {} into {}",
                        r.manifest.files.len(),
                        fleetgate::clock::rfc3339(r.manifest.created_ms),
                        data_dir.display()
                    );
                    match r.config {
                        Some(c) => println!("config written to {}", c.display()),
                        None => println!(
                            "the archive's config is at {} inside it; give --config-out to write it",
                            fleetgate::backup::CONFIG_ENTRY
                        ),
                    }
                })
                .map_err(Into::into),
        ),
        Command::Tokens { api, command } => match client(&api) {
            Ok(c) => report(tokens(&c, command)),
            Err(code) => code,
        },
        Command::Audit { api, limit, before } => match client(&api) {
            Ok(c) => report((|| {
                let limit = limit.to_string();
                let before = before.map(|b| b.to_string());
                let mut query = vec![("limit", limit.as_str())];
                if let Some(b) = &before {
                    query.push(("before", b.as_str()));
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&c.get_query("/audit", &query)?)?
                );
                Ok(())
            })()),
            Err(code) => code,
        },
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    use fleetgate::registry::keys;
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

fn bundle(command: BundleCommand) -> anyhow::Result<()> {
    use fleetgate::registry::bundle::BundleFile;
    use fleetgate::registry::keys;
    use fleetgate_protocol::manifest::ManifestSpec;
    match command {
        BundleCommand::Sign(a) => {
            let artifact = std::fs::read(&a.artifact)
                .with_context(|| format!("reading {}", a.artifact.display()))?;
            let signing = a
                .keys
                .iter()
                .map(|k| keys::read(k))
                .collect::<Result<Vec<_>, _>>()?;
            let now = fleetgate::clock::now_ms();
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
                "created": fleetgate::clock::rfc3339(m.created_ms), "expires": fleetgate::clock::rfc3339(m.expires_ms),
                "signed_by": sigs, "lineage": b.lineage, "tags": b.tags,
            });
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
    }
    Ok(())
}

fn registry(client: &ApiClient, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Upload { bundle } => {
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let answer = client.post_bytes("/registry/bundles", &bytes)?;
            let r = &answer["release"];
            let what = if answer["created"] == true {
                "registered"
            } else {
                "already registered"
            };
            println!(
                "{what}: {} {} {} (release {})",
                r["kind"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["version"].as_str().unwrap_or("?"),
                r["release"]
            );
        }
        RegistryCommand::List => {
            let list = client.get("/registry")?;
            println!(
                "{:<9} {:<20} {:<12} {:>8} {:<20} ARTIFACTS",
                "KIND", "NAME", "VERSION", "RELEASE", "ALIASES"
            );
            for r in list.as_array().into_iter().flatten() {
                let aliases: Vec<&str> = r["aliases"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str())
                    .collect();
                println!(
                    "{:<9} {:<20} {:<12} {:>8} {:<20} {}",
                    r["kind"].as_str().unwrap_or("?"),
                    r["name"].as_str().unwrap_or("?"),
                    r["version"].as_str().unwrap_or("?"),
                    r["release"].as_u64().unwrap_or(0),
                    aliases.join(","),
                    r["artifacts"].as_array().map_or(0, Vec::len)
                );
            }
        }
        RegistryCommand::Alias {
            kind,
            name,
            alias,
            version,
        } => {
            client.put(
                &format!("/registry/{kind}/{name}/aliases/{alias}"),
                &json!({ "version": version }),
            )?;
            println!("{kind} {name}: {alias} -> {version}");
        }
    }
    Ok(())
}

fn rollout(c: &ApiClient, command: RolloutCommand) -> anyhow::Result<()> {
    let print = |v: &Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    };
    let act = |id: u64, verb: &str, reason: Option<String>| -> anyhow::Result<Value> {
        let body = match reason {
            Some(r) => json!({ "reason": r }),
            None => json!({}),
        };
        Ok(c.post(&format!("/rollouts/{id}/{verb}"), &body)?)
    };
    match command {
        RolloutCommand::Create {
            kind,
            name,
            version,
            all,
            labels,
            devices,
            stages,
            bake,
            policy,
        } => {
            let mut overrides = serde_json::Map::new();
            if let Some(file) = policy {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let table: toml::Table = text
                    .parse()
                    .with_context(|| format!("{} is not valid TOML", file.display()))?;
                if let Value::Object(m) = serde_json::to_value(table)? {
                    overrides = m;
                }
            }
            if !stages.is_empty() {
                overrides.insert("stages".into(), json!(stages));
            }
            if let Some(b) = bake {
                overrides.insert("bake".into(), json!(b));
            }
            let mut body = json!({ "kind": kind, "name": name, "version": version });
            if all {
                body["all"] = json!(true);
            } else if !labels.is_empty() {
                body["labels"] = json!(
                    labels
                        .into_iter()
                        .collect::<std::collections::BTreeMap<_, _>>()
                );
            } else if !devices.is_empty() {
                body["devices"] = json!(devices);
            } else {
                anyhow::bail!("give a target: --all, --label key=value or --device id");
            }
            if !overrides.is_empty() {
                body["policy"] = Value::Object(overrides);
            }
            let created = c.post("/rollouts", &body)?;
            let r = &created["rollout"];
            println!(
                "rollout {}: {} {} {} to {} devices in {} stages",
                r["id"],
                r["kind"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["version"].as_str().unwrap_or("?"),
                r["planned"],
                r["stages"].as_array().map_or(0, Vec::len)
            );
            for s in created["skipped"].as_array().into_iter().flatten() {
                println!(
                    "skipped  {:<24} {}",
                    s["device"].as_str().unwrap_or("?"),
                    s["reason"].as_str().unwrap_or("?")
                );
            }
        }
        RolloutCommand::List { state } => {
            let query: Vec<(&str, &str)> = state.iter().map(|s| ("state", s.as_str())).collect();
            println!(
                "{:>4} {:<9} {:<20} {:<10} {:<12} {:>7} {:>8}",
                "ID", "KIND", "NAME", "VERSION", "STATE", "STAGE", "DEVICES"
            );
            for r in c
                .get_query("/rollouts", &query)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:>4} {:<9} {:<20} {:<10} {:<12} {:>3}/{:<3} {:>8}",
                    r["id"],
                    r["kind"].as_str().unwrap_or("?"),
                    r["name"].as_str().unwrap_or("?"),
                    r["version"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?"),
                    r["stage"]["number"],
                    r["stage"]["of"],
                    r["planned"]
                );
            }
        }
        RolloutCommand::Show { id } => print(&c.get(&format!("/rollouts/{id}"))?)?,
        RolloutCommand::Pause { id, reason } => print(&act(id, "pause", reason)?)?,
        RolloutCommand::Resume { id, reason } => print(&act(id, "resume", reason)?)?,
        RolloutCommand::Abort { id, reason } => print(&act(id, "abort", reason)?)?,
        RolloutCommand::Rollback { id, reason } => print(&act(id, "rollback", reason)?)?,
        RolloutCommand::Devices { id, state, stage } => {
            let stage = stage.map(|s| s.to_string());
            let mut query = vec![("limit", "10000")];
            if let Some(s) = &state {
                query.push(("state", s));
            }
            if let Some(s) = &stage {
                query.push(("stage", s));
            }
            println!(
                "{:<24} {:>5} {:<16} {:<12} REASON",
                "DEVICE", "STAGE", "STATE", "TRANSFER"
            );
            for d in c
                .get_query(&format!("/rollouts/{id}/devices"), &query)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{:<24} {:>5} {:<16} {:<12} {}",
                    d["device"].as_str().unwrap_or("?"),
                    d["stage"],
                    d["state"].as_str().unwrap_or("?"),
                    d["transfer_state"].as_str().unwrap_or("-"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
        }
        RolloutCommand::Audit { id } => {
            for e in c
                .get_query(&format!("/rollouts/{id}/audit"), &[("limit", "10000")])?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!(
                    "{} {:<16} {:<18} {}",
                    e["at"].as_str().unwrap_or("?"),
                    e["by"].as_str().unwrap_or("?"),
                    e["event"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                );
            }
        }
        RolloutCommand::Key => {
            let k = c.get("/rollouts/signing-key")?;
            println!("{}", k["public_key"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}

fn updates(client: &ApiClient, command: UpdatesCommand) -> anyhow::Result<()> {
    match command {
        UpdatesCommand::Start {
            kind,
            name,
            version,
            devices,
            all,
        } => {
            let body = if all {
                json!({ "kind": kind, "name": name, "version": version, "all": true })
            } else {
                json!({ "kind": kind, "name": name, "version": version, "devices": devices })
            };
            let plan = client.post("/updates", &body)?;
            for s in plan["started"].as_array().into_iter().flatten() {
                println!(
                    "started  {:<24} transfer {}",
                    s["device"].as_str().unwrap_or("?"),
                    s["transfer"]
                );
            }
            for s in plan["skipped"].as_array().into_iter().flatten() {
                println!(
                    "skipped  {:<24} {}",
                    s["device"].as_str().unwrap_or("?"),
                    s["reason"].as_str().unwrap_or("?")
                );
            }
        }
        UpdatesCommand::List { device } => {
            let path =
                device.map_or_else(|| "/updates".to_owned(), |d| format!("/updates?device={d}"));
            println!(
                "{:>6} {:<24} {:<12} {:<12} {:>8} REASON",
                "ID", "DEVICE", "VERSION", "STATE", "PROGRESS"
            );
            for t in client.get(&path)?.as_array().into_iter().flatten() {
                println!(
                    "{:>6} {:<24} {:<12} {:<12} {:>7}% {}",
                    t["id"],
                    t["device"].as_str().unwrap_or("?"),
                    t["version"].as_str().unwrap_or("?"),
                    t["state"].as_str().unwrap_or("?"),
                    t["progress"],
                    t["reason"].as_str().unwrap_or("")
                );
            }
        }
        UpdatesCommand::Cancel { id } => {
            let t = client.post(&format!("/updates/{id}/cancel"), &json!({}))?;
            println!("transfer {id}: {}", t["state"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}

/// `fleetgate backup`: the running gateway writes the database snapshot; a stopped one is
/// read directly.
fn backup(api: &ApiArgs, out: &Path) -> ExitCode {
    let config = match load_config(api.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let data_dir = config.storage.data_dir.clone();
    let config_text = match &api.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let snapshot = match client(api).map(|c| c.post("/backup/snapshot", &Value::Null)) {
        Ok(Ok(answer)) => match answer["path"].as_str() {
            Some(p) => PathBuf::from(p),
            None => {
                eprintln!("unexpected answer from the gateway: {answer}");
                return ExitCode::FAILURE;
            }
        },
        Ok(Err(ClientError::Unreachable { url, .. })) => {
            eprintln!("no gateway answers at {url}; reading the stopped gateway's database");
            let path = data_dir.join(format!(
                "{}{}.redb",
                fleetgate::backup::SNAPSHOT_PREFIX,
                fleetgate::clock::now_ms()
            ));
            let taken = fleetgate::storage::Store::open(&data_dir).and_then(|s| s.snapshot(&path));
            if let Err(e) = taken {
                eprintln!("reading the database in {}: {e}", data_dir.display());
                return ExitCode::FAILURE;
            }
            path
        }
        Ok(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
        Err(code) => return code,
    };
    let written =
        fleetgate::backup::write_archive(out, &snapshot, &data_dir, config_text.as_deref());
    let _ = std::fs::remove_file(&snapshot);
    match written {
        Ok(m) => {
            let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
            println!(
                "wrote {}: {} files, {bytes} bytes{}",
                out.display(),
                m.files.len(),
                if config_text.is_some() {
                    ""
                } else {
                    " (no --config given: the embedded default config applies)"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::default()),
        Some(p) => Config::load(p).map_err(|e| {
            eprintln!("{e}");
            ExitCode::from(EXIT_USAGE)
        }),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(dir) = args.data_dir {
        config.storage.data_dir = dir;
    }
    if let Some(a) = args.mqtt_listen {
        config.mqtt.listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http.listen = a;
    }
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config, args.grace));
    // Everything is flushed by now; do not let a stray blocking task hold the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, grace: Duration) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    println!("fleetgate {} running", env!("CARGO_PKG_VERSION"));
    println!("  MQTT (devices):  {}", gateway.mqtt_addr);
    if let Some(tls) = gateway.mqtt_tls_addr.filter(|a| *a != gateway.mqtt_addr) {
        println!("  MQTT over TLS:   {tls}");
    }
    println!("  HTTP API:        http://{}/api/v1", gateway.http_addr);
    println!("  data dir:        {}", gateway.data_dir.display());
    match &gateway.token_source {
        TokenSource::File(path) => println!("  operator token:  in {}", path.display()),
        TokenSource::Env => println!("  operator token:  from ${}", fleetgate::auth::TOKEN_ENV),
        TokenSource::Config => println!("  operator token:  from the config file (http.token)"),
    }
    tokio::select! {
        signal = wait_for_signal() => signal.context("waiting for a shutdown signal")?,
        why = gateway.failed() => {
            // Nothing is acknowledged without the writer: stop, and let the service manager
            // start a fresh gateway.
            tracing::error!(reason = why, "the gateway cannot go on");
            anyhow::bail!("{why}");
        }
    }
    println!("fleetgate: shutting down");
    gateway.shutdown(grace).await?;
    println!("fleetgate: stopped, all data flushed");
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Builds an API client from flags, environment and the gateway's config.
fn client(api: &ApiArgs) -> Result<ApiClient, ExitCode> {
    let config = load_config(api.config.as_deref())?;
    let url = api.url.clone().unwrap_or_else(|| {
        let mut addr = config.http.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let token = match (&api.token, &config.http.token) {
        (Some(t), _) | (None, Some(t)) => t.clone(),
        (None, None) => {
            let path = config.storage.data_dir.join(fleetgate::auth::TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    eprintln!(
                        "no operator token: give --token or ${}, or run where {} is readable ({e})",
                        fleetgate::auth::TOKEN_ENV,
                        path.display()
                    );
                    return Err(ExitCode::from(EXIT_USAGE));
                }
            }
        }
    };
    Ok(ApiClient::new(&url, &token))
}

fn devices(api: ApiArgs, command: DevicesCommand) -> ExitCode {
    let client = match client(&api) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result: Result<(), ClientError> = (|| {
        match command {
            DevicesCommand::Enroll { id, labels } => {
                let labels: serde_json::Map<String, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                let answer = client.post("/devices", &json!({ "id": id, "labels": labels }))?;
                print_credential(&answer);
            }
            DevicesCommand::List => {
                let list = client.get("/devices")?;
                println!(
                    "{:<24} {:<8} {:<12} {:<10} {:>10} {:>6} {:>6}",
                    "ID", "ONLINE", "FIRMWARE", "CLASS", "TELEMETRY", "LOST", "DUPS"
                );
                for d in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<8} {:<12} {:<10} {:>10} {:>6} {:>6}",
                        d["id"].as_str().unwrap_or("?"),
                        if d["online"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        d["firmware"]["version"].as_str().unwrap_or("-"),
                        d["hardware"]["class"].as_str().unwrap_or("-"),
                        d["counters"]["telemetry"].as_u64().unwrap_or(0),
                        d["counters"]["lost"].as_u64().unwrap_or(0),
                        d["counters"]["duplicates"].as_u64().unwrap_or(0),
                    );
                }
            }
            DevicesCommand::Show { id } => {
                let d = client.get(&format!("/devices/{id}"))?;
                println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
            }
            DevicesCommand::Rotate { id } => {
                let answer = client.post(&format!("/devices/{id}/credential"), &json!({}))?;
                print_credential(&answer);
            }
            DevicesCommand::Revoke { id } => {
                client.delete(&format!("/devices/{id}"))?;
                println!("revoked {id}");
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_credential(answer: &Value) {
    let id = answer["id"].as_str().unwrap_or("?");
    let credential = answer["credential"].as_str().unwrap_or("?");
    println!("device:     {id}");
    println!("credential: {credential}");
    println!("(shown only now; the device connects with username {id:?} and this password)");
}
