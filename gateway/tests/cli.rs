//! The `fleetgate` command as an operator runs it: checking configs, and the release and drift
//! flow of the README against a running gateway, with the errors a mistyped argument gets.

use std::path::Path;
use std::process::{Command, Output};

use fleetgate::{Config, Gateway};
use serde_json::Value;

const TOKEN: &str = "cli-test-token-0123456789abcdef";

/// Runs `fleetgate args...` with nothing taken from the caller's environment.
async fn fleetgate(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(&args)
            .env_remove("FLEETGATE_API_TOKEN")
            .env_remove("FLEETGATE_URL")
            .env_remove("FLEETGATE_LOG")
            .output()
            .expect("fleetgate runs")
    })
    .await
    .expect("command task")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed and returns its standard output.
async fn ok(args: &[&str]) -> String {
    let o = fleetgate(args).await;
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

#[tokio::test]
async fn a_bad_config_names_every_bad_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[mqtt]\nmax_connections = \"lots\"\n[drift]\npsi_alert = -1.0\n[storage]\nsize = 3\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    for args in [
        vec!["config", "check", file],
        vec!["serve", "--config", file],
    ] {
        let o = fleetgate(&args).await;
        assert_eq!(o.status.code(), Some(64), "{args:?}");
        let err = stderr(&o);
        for field in ["mqtt.max_connections", "drift.psi_alert", "storage.size"] {
            assert!(err.contains(field), "{args:?} does not name {field}: {err}");
        }
    }

    // A TOML syntax error says where it is.
    std::fs::write(file, "[mqtt]\nmax_connections = \"lots\n").unwrap();
    let o = fleetgate(&["config", "check", file]).await;
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("not valid TOML: line 2, column 24: "),
        "{}",
        stderr(&o)
    );

    // The embedded default config is valid and is what `config default` prints.
    let default = ok(&["config", "default"]).await;
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &default).unwrap();
    let checked = ok(&["config", "check", file.to_str().unwrap()]).await;
    assert_eq!(checked.trim(), format!("{}: ok", file.display()));
}

/// 2,000 reference rows: two features and a predicted class.
fn reference_csv(path: &Path) {
    let mut csv = String::from("temp,vibration,prediction\n");
    for i in 0..2000u32 {
        let temp = 20.0 + f64::from(i % 100) / 10.0;
        let vibration = f64::from((i * 37) % 1000) / 1000.0;
        csv.push_str(&format!("{temp},{vibration},{}\n", i % 3));
    }
    std::fs::write(path, csv).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_and_drift_flow_of_the_readme_works_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();

    // 1. A release key, offline.
    let printed = ok(&["keys", "generate", "--out", &d("release")]).await;
    let public = std::fs::read_to_string(d("release.pub")).unwrap();
    let public = public.trim();
    assert_eq!(public.len(), 64);
    assert!(printed.contains(public), "{printed}");

    // A gateway that trusts it.
    let mut config = Config::default();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.token = Some(TOKEN.to_owned());
    config.storage.data_dir = dir.path().join("data");
    config.registry.trusted_keys = vec![fleetgate_config::parse_key(public).unwrap()];
    let gateway = Gateway::start(config).await.unwrap();
    let url = format!("http://{}", gateway.http_addr);
    let api = ["--url", url.as_str(), "--token", TOKEN];
    let with_api = |args: &[&'static str]| -> Vec<String> {
        args.iter()
            .map(|a| (*a).to_owned())
            .chain(api.iter().map(|a| (*a).to_owned()))
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fleetgate(&refs).await
    };

    // 2. A signed bundle, 3. registered.
    std::fs::write(d("kws.tflite"), vec![7u8; 10_000]).unwrap();
    // `fleetgate bundle sign` of kws.tflite as kws VERSION (release RELEASE) with KEY into OUT.
    let sign = |version: &'static str, release: &'static str, key: &str, out: &str| {
        let (artifact, key, out) = (d("kws.tflite"), d(key), d(out));
        async move {
            ok(&[
                "bundle",
                "sign",
                &artifact,
                "--kind",
                "model",
                "--name",
                "kws",
                "--version",
                version,
                "--release",
                release,
                "--class",
                "sim-mcu",
                "--key",
                &key,
                "--out",
                &out,
            ])
            .await
        }
    };
    sign("2.0.0", "1", "release.key", "kws.fgb").await;
    let mut args = with_api(&["registry", "upload"]);
    args.push(d("kws.fgb"));
    let o = run(args).await;
    assert!(o.status.success(), "{}", stderr(&o));

    // A bundle signed by a key the gateway does not trust is refused, and says why.
    ok(&["keys", "generate", "--out", &d("stranger")]).await;
    sign("2.0.1", "2", "stranger.key", "stranger.fgb").await;
    let mut args = with_api(&["registry", "upload"]);
    args.push(d("stranger.fgb"));
    let o = run(args).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not signed by any trusted key"),
        "{}",
        stderr(&o)
    );

    // The baseline: built offline from a reference CSV, uploaded to the version.
    reference_csv(Path::new(&d("reference.csv")));
    let built = ok(&[
        "baseline",
        "build",
        &d("reference.csv"),
        "--prediction",
        "prediction",
        "--out",
        &d("baseline.json"),
    ])
    .await;
    assert!(built.contains("2 features, 2000 reference rows"), "{built}");
    let mut args = with_api(&["baseline", "upload", "kws", "2.0.0"]);
    args.push(d("baseline.json"));
    let o = run(args).await;
    assert_eq!(
        stdout(&o).trim(),
        "model kws 2.0.0: baseline with 2 features",
        "{}",
        stderr(&o)
    );

    // Devices with labels, then alerts and drift, with the errors a typo gets.
    let o = run(with_api(&[
        "devices",
        "enroll",
        "pump-1",
        "--label",
        "site=north",
    ]))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(with_api(&["devices", "show", "pump-1", "--json"])).await;
    let device: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(device["labels"]["site"], "north");

    let o = run(with_api(&["alerts", "list", "--state", "open", "--json"])).await;
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        Value::Array(vec![])
    );
    // An update that starts on no device says so and exits 1: pump-1 is not connected.
    let o = run(with_api(&[
        "updates", "start", "model", "kws", "2.0.0", "--device", "pump-1",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(
        stderr(&o).trim(),
        "fleetgate: model kws 2.0.0 started on no device (1 skipped)"
    );
    assert!(stdout(&o).starts_with("SKIPPED"), "{}", stdout(&o));
    assert!(stdout(&o).contains("pump-1"), "{}", stdout(&o));

    let o = run(with_api(&["alerts", "list", "--state", "opened"])).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("state \"opened\": one of open, acknowledged, resolved"),
        "{}",
        stderr(&o)
    );
    let o = run(with_api(&["alerts", "ack", "999"])).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("404"), "{}", stderr(&o));

    // A cohort name that needs encoding reaches the gateway intact.
    let o = run(with_api(&[
        "drift",
        "kws",
        "2.0.0",
        "--cohort",
        "north & south",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no drift data for kws 2.0.0 (cohort north & south)"),
        "{}",
        stderr(&o)
    );
    let o = run(with_api(&["drift", "--json"])).await;
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        Value::Array(vec![])
    );

    gateway
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}

/// Least privilege from the command line: an admin hands out a read-only token, which can
/// read but not start a rollout; without a token nothing is answered; the audit log names who
/// tried what.
#[tokio::test]
async fn a_read_only_token_reads_but_cannot_roll_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.token = Some(TOKEN.to_owned());
    config.storage.data_dir = dir.path().join("data");
    let gateway = Gateway::start(config).await.unwrap();
    let url = format!("http://{}", gateway.http_addr);
    let url = url.as_str();

    let created = ok(&[
        "tokens",
        "create",
        "dashboard",
        "--role",
        "read-only",
        "--json",
        "--url",
        url,
        "--token",
        TOKEN,
    ])
    .await;
    let created: Value = serde_json::from_str(&created).unwrap();
    let viewer = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["role"], "read-only");

    let listed = ok(&["rollout", "list", "--url", url, "--token", &viewer]).await;
    // A table with its header and no rollouts.
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert_eq!(
        listed.split_whitespace().collect::<Vec<_>>(),
        ["ID", "KIND", "NAME", "VERSION", "STATE", "STAGE", "DEVICES"],
        "{listed}"
    );
    let rollout = [
        "rollout", "create", "model", "kws", "2.0.0", "--all", "--url", url,
    ];
    let mut args = rollout.to_vec();
    args.extend(["--token", viewer.as_str()]);
    let refused = fleetgate(&args).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused)
            .contains("403: token `dashboard` has role read-only; POST /rollouts needs operator"),
        "{}",
        stderr(&refused)
    );
    let mut args = rollout.to_vec();
    args.extend(["--token", "not-a-token"]);
    let refused = fleetgate(&args).await;
    assert!(
        stderr(&refused).contains("401: missing or wrong bearer token"),
        "{}",
        stderr(&refused)
    );

    let audit = ok(&["audit", "--json", "--url", url, "--token", TOKEN]).await;
    let audit: Value = serde_json::from_str(&audit).unwrap();
    let entries: Vec<(String, String, u64)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["by"].as_str().unwrap().to_owned(),
                e["path"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("dashboard".to_owned(), "/api/v1/rollouts".to_owned(), 403),
            ("bootstrap".to_owned(), "/api/v1/tokens".to_owned(), 201),
        ]
    );
    gateway
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}

/// A gateway on free loopback ports with the test token, in `dir`.
async fn gateway_in(dir: &Path) -> Gateway {
    let mut config = Config::default();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.token = Some(TOKEN.to_owned());
    config.storage.data_dir = dir.join("data");
    Gateway::start(config).await.unwrap()
}

/// `devices revoke 'arr1?oops'` once revoked `arr1`: the id was put into the URL as it was,
/// so `?oops` became a query. Every id is one percent-encoded path segment now.
#[tokio::test]
async fn an_id_with_url_characters_never_reaches_another_device() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_in(dir.path()).await;
    let url = format!("http://{}", gateway.http_addr);
    let api = ["--url", url.as_str(), "--token", TOKEN];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(api);
        let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            fleetgate(&refs).await
        }
    };
    assert!(run(&["devices", "enroll", "arr1"]).await.status.success());
    for id in [
        "arr1?oops",
        "arr1#x",
        "arr1/credential",
        "../devices/arr1",
        "arr1%3F",
    ] {
        let o = run(&["devices", "revoke", id]).await;
        assert_eq!(o.status.code(), Some(1), "{id}: {}", stdout(&o));
        assert_eq!(
            stderr(&o).trim(),
            format!("fleetgate: 404: device {id} not found"),
            "{id}"
        );
    }
    let o = run(&["devices", "show", "arr1", "--json"]).await;
    let device: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(device["revoked"], false);
    let o = run(&["tokens", "revoke", "x?y"]).await;
    assert!(
        stderr(&o).contains("404: no token named `x?y`"),
        "{}",
        stderr(&o)
    );
    gateway
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}

/// `fleetgate bundle sign` of `artifact` as kws 1.0.0 with `keys` into `out`.
async fn sign_bundle(artifact: &str, keys: &[&str], out: &str) {
    let mut args = vec![
        "bundle",
        "sign",
        artifact,
        "--kind",
        "model",
        "--name",
        "kws",
        "--version",
        "1.0.0",
        "--release",
        "1",
        "--chunk-size",
        "1024",
    ];
    for k in keys {
        args.extend(["--key", k]);
    }
    args.extend(["--out", out]);
    ok(&args).await;
}

/// Co-signing vouches for a bundle: it refused nothing before (a changed artifact, a forged
/// signature, an expired manifest, a signer nobody can check). Inspect lists signers only
/// with what their signatures are worth.
#[tokio::test]
async fn cosign_checks_the_bundle_first_and_inspect_verifies_its_signers() {
    use fleetgate::registry::bundle::BundleFile;
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    for k in ["alice", "bob"] {
        ok(&["keys", "generate", "--out", &d(k)]).await;
    }
    let key_id = |name: &str| {
        let public = fleetgate_config::parse_key(
            &std::fs::read_to_string(d(&format!("{name}.pub"))).unwrap(),
        )
        .unwrap();
        fleetgate::registry::keys::hex(&fleetgate_protocol::sign::key_id(&public))
    };
    std::fs::write(d("kws.tflite"), vec![5u8; 5000]).unwrap();
    sign_bundle(&d("kws.tflite"), &[&d("alice.key")], &d("kws.fgb")).await;
    let signed = std::fs::read(d("kws.fgb")).unwrap();

    // Nobody vouched for alice's key: refused, and the file is as it was.
    let o = fleetgate(&["bundle", "cosign", &d("kws.fgb"), "--key", &d("bob.key")]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "fleetgate: {}: the signature by key {} cannot be checked; give its public key with --trust (or the gateway config with --config)",
            d("kws.fgb"),
            key_id("alice")
        )
    );
    assert_eq!(std::fs::read(d("kws.fgb")).unwrap(), signed);

    // A changed artifact, a forged signature, an expired manifest: refused, each saying why.
    let mut b = BundleFile::decode(&signed).unwrap();
    b.artifact[100] ^= 1;
    std::fs::write(d("changed.fgb"), b.encode()).unwrap();
    let mut b = BundleFile::decode(&signed).unwrap();
    b.manifest.signatures[0].signature[5] ^= 1;
    std::fs::write(d("forged.fgb"), b.encode()).unwrap();
    let alice = fleetgate::registry::keys::read(Path::new(&d("alice.key"))).unwrap();
    let spec = fleetgate_protocol::manifest::ManifestSpec {
        kind: fleetgate_protocol::ArtifactKind::Model,
        name: "kws".into(),
        version: semver::Version::new(1, 0, 0),
        release: 1,
        compat: fleetgate_protocol::Compat::default(),
        chunk_size: 1024,
        created_ms: 1_000,
        expires_ms: 2_000,
    };
    let old = BundleFile::sign(vec![5u8; 5000], spec, &[alice], Default::default(), vec![]);
    std::fs::write(d("old.fgb"), old.encode()).unwrap();
    for (file, error) in [
        (
            "changed.fgb",
            "the artifact does not match the manifest: its SHA-256 differs".to_owned(),
        ),
        (
            "forged.fgb",
            format!(
                "the signature by key {} does not verify: the bundle was changed after it was signed",
                key_id("alice")
            ),
        ),
        (
            "old.fgb",
            "the manifest expired at 1970-01-01T00:00:02.000Z; sign a new bundle instead"
                .to_owned(),
        ),
    ] {
        let before = std::fs::read(d(file)).unwrap();
        let o = fleetgate(&[
            "bundle",
            "cosign",
            &d(file),
            "--key",
            &d("bob.key"),
            "--trust",
            &d("alice.pub"),
        ])
        .await;
        assert_eq!(o.status.code(), Some(1), "{file}");
        assert_eq!(
            stderr(&o).trim(),
            format!("fleetgate: {}: {error}", d(file)),
            "{file}"
        );
        assert_eq!(std::fs::read(d(file)).unwrap(), before, "{file}");
    }

    // With alice's public key (hex or file), bob co-signs.
    let o = ok(&[
        "bundle",
        "cosign",
        &d("kws.fgb"),
        "--key",
        &d("bob.key"),
        "--trust",
        &d("alice.pub"),
    ])
    .await;
    assert_eq!(
        o.trim(),
        format!("{}: now 2 signature(s), each checked", d("kws.fgb"))
    );

    // Inspect: signers are shown with what their signatures are worth.
    let inspect = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = fleetgate(&refs).await;
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        (o.status.code(), v)
    };
    let base = |file: &str| {
        vec![
            "bundle".to_owned(),
            "inspect".to_owned(),
            "--json".to_owned(),
            d(file),
        ]
    };
    let (code, v) = inspect(base("kws.fgb")).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        v["signatures"],
        serde_json::json!([
            { "key_id": key_id("alice"), "status": "unknown key" },
            { "key_id": key_id("bob"), "status": "unknown key" },
        ])
    );
    let mut args = base("kws.fgb");
    args.extend(["--trust".to_owned(), d("alice.pub")]);
    let (code, v) = inspect(args).await;
    assert_eq!(code, Some(0));
    assert_eq!(v["signatures"][0]["status"], "valid");
    assert_eq!(v["signatures"][1]["status"], "unknown key");
    assert_eq!(
        (v["valid_signatures"].as_u64(), v["artifact"].as_str()),
        (Some(1), Some("matches the manifest"))
    );
    let mut args = base("forged.fgb");
    args.extend(["--trust".to_owned(), d("alice.pub")]);
    let (code, v) = inspect(args).await;
    assert_eq!(code, Some(1));
    assert_eq!(v["signatures"][0]["status"], "invalid");
    assert_eq!(
        v["problems"],
        serde_json::json!([
            format!("the signature by key {} does not verify", key_id("alice")),
            "0 valid signature(s) by trusted keys, 1 needed",
        ])
    );
    let (code, v) = inspect(base("changed.fgb")).await;
    assert_eq!(code, Some(1));
    assert_eq!(
        v["artifact"],
        "the artifact does not match the manifest: its SHA-256 differs"
    );
}

/// `fleetgate devices list | head -1` exited 101 with a panic when `head` closed the pipe.
#[tokio::test]
async fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_in(dir.path()).await;
    let url = format!("http://{}", gateway.http_addr);
    for args in [
        vec!["config", "default"],
        vec!["devices", "list", "--url", &url, "--token", TOKEN],
        vec!["tokens", "list", "--url", &url, "--token", TOKEN],
    ] {
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let o = tokio::task::spawn_blocking(move || {
            // A pipe whose reader is already gone: every write to it fails with EPIPE.
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            Command::new(env!("CARGO_BIN_EXE_fleetgate"))
                .args(&args)
                .env_remove("FLEETGATE_API_TOKEN")
                .stdout(writer)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!((o.status.code(), stderr(&o)), (Some(0), String::new()),);
    }
    gateway
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}

/// The first line `fleetgate serve ARGS` writes to stderr, then the gateway is killed.
async fn first_log_line(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "serve".to_owned(),
        "--data-dir".to_owned(),
        dir.to_str().unwrap().to_owned(),
        "--mqtt-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(&args)
            .env_remove("FLEETGATE_API_TOKEN")
            .env_remove("FLEETGATE_LOG")
            .env_remove("NO_COLOR")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        line
    })
    .await
    .unwrap()
}

/// Log lines carried ANSI colour codes into files and the journal.
#[tokio::test]
async fn logs_are_plain_off_a_terminal_and_json_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let text = first_log_line(&dir.path().join("a"), &[]).await;
    assert!(text.contains(" INFO "), "{text:?}");
    assert!(text.contains("gateway started"), "{text:?}");
    assert!(!text.contains('\x1b'), "{text:?}");

    let json = first_log_line(&dir.path().join("b"), &["--log-format", "json"]).await;
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    assert_eq!(
        (v["level"].as_str(), v["message"].as_str()),
        (Some("INFO"), Some("gateway started"))
    );
    assert!(v["http"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
    assert!(v["timestamp"].is_string(), "{v}");
}
