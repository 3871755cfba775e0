//! Model lineage from a live MLflow tracking server: `mlflow server` (from PyPI, pinned and
//! installed by `scripts/mlflow-venv.sh` into a venv in ~/.cache) runs on a free loopback
//! port; the test logs a run with parameters, metrics and tags, uploads a model file through
//! the server's artifact proxy and registers a model version, all through MLflow's REST API.
//! Then, as an operator would: `fleetgate registry import-mlflow`, `fleetgate bundle sign
//! --spec` with requirements and a golden set (offline), upload to a gateway, and the
//! registry's view of the version carries the run's metrics as lineage.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleetgate::{Config, Gateway};
use serde_json::{Value, json};

const TOKEN: &str = "mlflow-test-token-0123456789abcdef";

/// The `mlflow` executable: $FLEETGATE_MLFLOW, or the pinned venv (installed on first use).
fn mlflow_executable() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETGATE_MLFLOW") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/mlflow-venv.sh"))
        .output()
        .expect("scripts/mlflow-venv.sh runs");
    assert!(
        out.status.success(),
        "scripts/mlflow-venv.sh failed (it installs mlflow from PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        exe.is_file(),
        "scripts/mlflow-venv.sh named {} as mlflow, which is not a file",
        exe.display()
    );
    exe
}

/// A tracking server in its own process group, stopped (the group) when dropped.
struct Server {
    child: std::process::Child,
    url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // The server's uvicorn workers and job runner are its children, in the process group
        // created for it (numbered by its pid): signal that group, and only it. The `--` is
        // load-bearing: procps-ng 4.0's kill reads `kill -TERM -12345` as an option and
        // signals group -1, i.e. every process the caller may signal.
        let group = format!("-{}", self.child.id());
        let signal = |name: &str| {
            let _ = Command::new("kill")
                .args(["-s", name, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                signal("KILL");
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server(dir: &Path) -> Server {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let log = dir.join("mlflow.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(mlflow_executable())
        .args([
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--workers",
            "1",
            "--backend-store-uri",
            &format!("sqlite:///{}", dir.join("mlflow.db").display()),
            "--artifacts-destination",
            &dir.join("artifacts").display().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start mlflow server ({e})"));
    let mut server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
    };
    // Its readiness can only be seen through its API: ask, with a deadline.
    let agent = agent();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "mlflow server exited ({status}) before answering: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        let ok = agent
            .get(&format!("{}/health", server.url))
            .call()
            .is_ok_and(|r| r.status().as_u16() == 200);
        if ok {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "mlflow server did not answer within 180 s: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn post(url: &str, body: Value) -> Value {
    let r = agent().post(url).send_json(&body).expect("MLflow answers");
    let status = r.status().as_u16();
    let text = r.into_body().read_to_string().unwrap();
    assert_eq!(status, 200, "{url}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn put_artifact(base: &str, path: &str, bytes: &[u8]) {
    let url = format!("{base}/api/2.0/mlflow-artifacts/artifacts/{path}");
    let r = agent().put(&url).send(bytes).expect("MLflow answers");
    assert_eq!(r.status().as_u16(), 200, "{url}");
}

/// A run with parameters, metrics and tags, the model file (and, for the second version, a
/// second file) in its artifacts, registered as `kws` versions 1 and 2.
fn log_model(base: &str, model: &[u8]) -> String {
    let api = |p: &str| format!("{base}/api/2.0/mlflow/{p}");
    let exp = post(
        &api("experiments/create"),
        json!({ "name": "kws-training" }),
    );
    let exp = exp["experiment_id"].as_str().unwrap().to_owned();
    let run = post(
        &api("runs/create"),
        json!({ "experiment_id": exp, "start_time": 1_767_225_600_000u64 }),
    );
    let run_id = run["run"]["info"]["run_id"].as_str().unwrap().to_owned();
    post(
        &api("runs/log-batch"),
        json!({
            "run_id": run_id,
            "metrics": [
                { "key": "accuracy", "value": 0.953, "timestamp": 1, "step": 0 },
                { "key": "val_loss", "value": 0.125, "timestamp": 1, "step": 0 },
            ],
            "params": [
                { "key": "learning_rate", "value": "0.001" },
                { "key": "quantization", "value": "int8" },
            ],
            "tags": [ { "key": "dataset", "value": "speech-commands-v2@5f3a" } ],
        }),
    );
    put_artifact(
        base,
        &format!("{exp}/{run_id}/artifacts/model/model.tflite"),
        model,
    );
    put_artifact(
        base,
        &format!("{exp}/{run_id}/artifacts/both/model.tflite"),
        model,
    );
    put_artifact(
        base,
        &format!("{exp}/{run_id}/artifacts/both/labels.txt"),
        b"yes\nno\n",
    );
    post(&api("registered-models/create"), json!({ "name": "kws" }));
    for dir in ["model", "both"] {
        post(
            &api("model-versions/create"),
            json!({ "name": "kws", "source": format!("runs:/{run_id}/{dir}"), "run_id": run_id }),
        );
    }
    run_id
}

async fn fleetgate(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(&args)
            .env_remove("FLEETGATE_API_TOKEN")
            .env_remove("FLEETGATE_URL")
            .env_remove("MLFLOW_TRACKING_URI")
            .output()
            .expect("fleetgate runs")
    })
    .await
    .unwrap()
}

async fn ok(args: &[&str]) -> String {
    let o = fleetgate(args.iter().map(|a| (*a).to_owned()).collect()).await;
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn fails(args: &[&str]) -> String {
    let o = fleetgate(args.iter().map(|a| (*a).to_owned()).collect()).await;
    assert_eq!(o.status.code(), Some(1), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_from_a_live_mlflow_server_carries_its_runs_metrics_into_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let model: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let server = tokio::task::spawn_blocking({
        let p = dir.path().to_owned();
        move || start_server(&p)
    })
    .await
    .unwrap();
    let base = server.url.clone();
    let run_id = tokio::task::spawn_blocking({
        let (b, m) = (base.clone(), model.clone());
        move || log_model(&b, &m)
    })
    .await
    .unwrap();

    // Import version 1: the artifact and a spec with the lineage.
    let printed = ok(&[
        "registry",
        "import-mlflow",
        "--tracking-uri",
        &base,
        "models:/kws/1",
        "--out-dir",
        &d("import"),
        "--version",
        "2.1.0",
    ])
    .await;
    assert!(
        printed.contains("imported models:/kws/1 as model kws 2.1.0 (release 1)"),
        "{printed}"
    );
    assert_eq!(std::fs::read(d("import/model.tflite")).unwrap(), model);
    let spec_text = std::fs::read_to_string(d("import/kws-2.1.0.spec.toml")).unwrap();
    let spec: toml::Table = spec_text.parse().unwrap();
    let lineage = spec["lineage"].as_table().unwrap();
    let get = |k: &str| lineage.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    assert_eq!(get("metric.accuracy").as_deref(), Some("0.953"));
    assert_eq!(get("metric.val_loss").as_deref(), Some("0.125"));
    assert_eq!(get("param.learning_rate").as_deref(), Some("0.001"));
    assert_eq!(get("param.quantization").as_deref(), Some("int8"));
    assert_eq!(
        get("tag.dataset").as_deref(),
        Some("speech-commands-v2@5f3a")
    );
    assert_eq!(get("mlflow.run_id").as_deref(), Some(run_id.as_str()));
    assert_eq!(get("mlflow.model").as_deref(), Some("models:/kws/1"));
    assert_eq!(spec["release"].as_integer(), Some(1));

    // Version 2 holds two files: which one to ship must be said.
    let err = fails(&[
        "registry",
        "import-mlflow",
        "--tracking-uri",
        &base,
        "models:/kws/2",
        "--out-dir",
        &d("import2"),
    ])
    .await;
    assert!(
        err.contains("holds 2 files (labels.txt, model.tflite): name the one to ship with --file"),
        "{err}"
    );
    // A version that does not exist: MLflow's own words.
    let err = fails(&[
        "registry",
        "import-mlflow",
        "--tracking-uri",
        &base,
        "models:/kws/9",
    ])
    .await;
    assert!(err.contains("MLflow answered 404"), "{err}");
    drop(server);

    // Offline: sign the spec with requirements and a golden set; the key never met MLflow.
    ok(&["keys", "generate", "--out", &d("release")]).await;
    std::fs::write(d("golden.csv"), "a,b,expected\n0.1,0.2,1\n0.3,0.4,0\n").unwrap();
    let signed = ok(&[
        "bundle",
        "sign",
        "--spec",
        &d("import/kws-2.1.0.spec.toml"),
        "--class",
        "sim-mcu",
        "--key",
        &d("release.key"),
        "--require",
        "accuracy>=0.9",
        "--require",
        "latency_p95_us<=15000",
        "--golden",
        &d("golden.csv"),
        "--out",
        &d("kws.fgb"),
    ])
    .await;
    assert!(
        signed.contains("2 requirement(s) and a golden set of 2 cases"),
        "{signed}"
    );
    // The artifact must be the one imported.
    std::fs::write(d("import/model.tflite"), b"something else").unwrap();
    let err = fails(&[
        "bundle",
        "sign",
        "--spec",
        &d("import/kws-2.1.0.spec.toml"),
        "--key",
        &d("release.key"),
        "--out",
        &d("other.fgb"),
    ])
    .await;
    assert!(
        err.contains("it changed since the spec was written"),
        "{err}"
    );

    // A gateway that trusts the key takes the bundle; its view carries the lineage.
    let public = std::fs::read_to_string(d("release.pub")).unwrap();
    let mut config = Config::default();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.token = Some(TOKEN.to_owned());
    config.storage.data_dir = dir.path().join("data");
    config.registry.trusted_keys = vec![fleetgate_config::parse_key(public.trim()).unwrap()];
    let gateway = Gateway::start(config).await.unwrap();
    let url = format!("http://{}", gateway.http_addr);
    ok(&[
        "registry",
        "upload",
        &d("kws.fgb"),
        "--url",
        &url,
        "--token",
        TOKEN,
    ])
    .await;
    let view = ok(&[
        "registry", "list", "--json", "--url", &url, "--token", TOKEN,
    ])
    .await;
    let list: Value = serde_json::from_str(&view).unwrap();
    let r = &list[0];
    assert_eq!(r["name"], "kws");
    assert_eq!(r["version"], "2.1.0");
    assert_eq!(r["release"], 1);
    assert_eq!(r["lineage"]["metric.accuracy"], "0.953");
    assert_eq!(r["lineage"]["param.quantization"], "int8");
    assert_eq!(r["lineage"]["mlflow.run_id"], run_id.as_str());
    assert_eq!(
        r["requirements"][0]["rules"],
        json!(["accuracy>=0.9", "latency_p95_us<=15000"])
    );
    assert_eq!(r["requirements"][0]["golden_cases"], 2);
    gateway.shutdown(Duration::from_secs(5)).await.unwrap();
}
