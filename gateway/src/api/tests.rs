use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::auth::Credentials;
use crate::broker::DownlinkTx;
use crate::broker::front::Sessions;
use crate::ingest::Writer;

const TOKEN: &str = "test-token-0123456789";

struct Api {
    _dir: tempfile::TempDir,
    router: Router,
    metrics: Arc<Metrics>,
}

fn api() -> Api {
    api_seeded(|_| {})
}

/// An API whose storage `seed` filled before the writer loaded it.
fn api_seeded(seed: impl FnOnce(&Store)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let config = fleetgate_config::Config::default();
    let store = Store::open(dir.path()).unwrap();
    seed(&store);
    let store_for_tokens = store.clone();
    let metrics = Arc::new(Metrics::new(std::time::Duration::from_secs(60)));
    let (_wtx, wrx, control, crx) = crate::ingest::channels(&config);
    let (downlink, _drx) = DownlinkTx::detached(16);
    let writer = Writer::new(
        store.clone(),
        &config,
        Arc::new(Credentials::default()),
        Arc::new(Sessions::default()),
        downlink,
        metrics.clone(),
    )
    .unwrap();
    std::thread::spawn(move || writer.run(wrx, crx));
    let registry = crate::registry::Registry::new(store.clone(), dir.path(), &config.registry);
    let state = Arc::new(ApiState {
        store,
        registry,
        control,
        metrics: metrics.clone(),
        tokens: Arc::new(access::load_tokens(&store_for_tokens, TOKEN).unwrap()),
        data_dir: dir.path().to_owned(),
        max_body_bytes: 1 << 20,
        rollouts: config.rollouts.clone(),
        rollback_public: [7; 32],
        uplink: Arc::new(crate::uplink::Uplink::off()),
    });
    Api {
        _dir: dir,
        router: router(state),
        metrics,
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, Some(TOKEN), None).await
    }

    async fn post(&self, uri: &str, body: &str) -> (StatusCode, Value) {
        self.call(Method::POST, uri, Some(TOKEN), Some(body)).await
    }
}

#[tokio::test]
async fn health_is_open_and_the_api_needs_the_token() {
    let api = api();
    assert_eq!(
        api.call(Method::GET, "/healthz", None, None).await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let (status, body) = api.call(Method::GET, "/api/v1/devices", None, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong bearer token"})
        )
    );
    let (status, _) = api
        .call(Method::GET, "/api/v1/devices", Some("wrong-token"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.get("/api/v1/devices").await,
        (StatusCode::OK, json!([]))
    );
    // The API's description needs no token either, and is the one the code generates.
    let (status, doc) = api
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, serde_json::to_value(openapi()).unwrap());
}

#[tokio::test]
async fn enroll_show_and_revoke_a_device() {
    let api = api();
    let (status, body) = api
        .post(
            "/api/v1/devices",
            r#"{"id": "d1", "labels": {"site": "north"}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["id"], "d1");
    assert_eq!(body["credential"].as_str().unwrap().len(), 64);

    let (status, d) = api.get("/api/v1/devices/d1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            d["online"].clone(),
            d["labels"]["site"].clone(),
            d["revoked"].clone()
        ),
        (json!(false), json!("north"), json!(false))
    );
    assert_eq!(d["counters"]["telemetry"], 0);

    let (status, body) = api.post("/api/v1/devices", r#"{"id": "d1"}"#).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        body["error"],
        "device d1 is already enrolled; rotate its credential instead"
    );

    let (status, list) = api.get("/api/v1/devices?label=site=north").await;
    assert_eq!(
        (status, list.as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
    let (_, list) = api.get("/api/v1/devices?label=site=south").await;
    assert_eq!(list, json!([]));
    let (_, list) = api.get("/api/v1/devices?online=true").await;
    assert_eq!(list, json!([]));

    let (status, _) = api
        .call(Method::DELETE, "/api/v1/devices/d1", Some(TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, d) = api.get("/api/v1/devices/d1").await;
    assert_eq!(d["revoked"], true);
}

#[tokio::test]
async fn bad_requests_get_4xx_json_that_says_what_is_wrong() {
    let api = api();
    let cases: Vec<(Method, &str, Option<&str>, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/api/v1/devices",
            Some(r#"{"id": "a/b"}"#),
            StatusCode::BAD_REQUEST,
            "device id \"a/b\": device id contains '/'; allowed are A-Z a-z 0-9 - _ . :",
        ),
        (
            Method::GET,
            "/api/v1/devices/nope",
            None,
            StatusCode::NOT_FOUND,
            "device nope not found",
        ),
        (
            Method::GET,
            "/api/v1/devices/nope/telemetry",
            None,
            StatusCode::NOT_FOUND,
            "device nope not found",
        ),
        (
            Method::GET,
            "/api/v1/alerts?state=closed",
            None,
            StatusCode::BAD_REQUEST,
            "state \"closed\": one of open, acknowledged, resolved",
        ),
        (
            Method::GET,
            "/api/v1/alerts?limit=0",
            None,
            StatusCode::BAD_REQUEST,
            "limit must be at least 1",
        ),
        (
            Method::GET,
            "/api/v1/alerts/12",
            None,
            StatusCode::NOT_FOUND,
            "alert 12 not found",
        ),
        (
            Method::POST,
            "/api/v1/alerts/12/ack",
            None,
            StatusCode::NOT_FOUND,
            "alert 12 not found",
        ),
        (
            Method::GET,
            "/api/v1/commands/3",
            None,
            StatusCode::NOT_FOUND,
            "command 3 not found",
        ),
        (
            Method::GET,
            "/api/v1/nothing",
            None,
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
        (
            Method::PUT,
            "/api/v1/devices",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this endpoint",
        ),
    ];
    for (method, uri, body, want_status, want_error) in cases {
        let (status, value) = api.call(method.clone(), uri, Some(TOKEN), body).await;
        assert_eq!(
            (status, value["error"].as_str().unwrap_or("")),
            (want_status, want_error),
            "{method} {uri}"
        );
    }
    // Extractor rejections are JSON too, and name the problem.
    let (status, value) = api.post("/api/v1/devices", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        value["error"]
            .as_str()
            .unwrap()
            .contains("Failed to parse the request body as JSON"),
        "{value}"
    );
    let (status, value) = api
        .post("/api/v1/devices", r#"{"id": "d1", "lables": {}}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        value["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `lables`"),
        "{value}"
    );
    let (status, value) = api.get("/api/v1/alerts/abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        value["error"].as_str().unwrap().contains("Cannot parse"),
        "{value}"
    );
    let (status, value) = api.get("/api/v1/devices/x/telemetry?from=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        value["error"],
        "from: \"yesterday\" is neither RFC 3339 nor Unix milliseconds"
    );
}

#[tokio::test]
async fn commands_need_an_online_device_and_a_valid_action() {
    let api = api();
    api.post("/api/v1/devices", r#"{"id": "d1"}"#).await;
    let (status, body) = api
        .post("/api/v1/devices/d1/commands", r#"{"action": "ping"}"#)
        .await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (StatusCode::CONFLICT, "device d1 is offline")
    );
    let (status, body) = api
        .post(
            "/api/v1/devices/d1/commands",
            r#"{"action": {"set_telemetry_interval": {"interval_ms": 5}}}"#,
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (
            StatusCode::BAD_REQUEST,
            "interval_ms must be within 100..=86400000"
        )
    );
    let (status, _) = api
        .post("/api/v1/devices/d1/commands", r#"{"action": "dance"}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// GET /metrics with an optional Accept header: (content type, body).
async fn scrape(api: &Api, accept: Option<&str>) -> (String, String) {
    let mut req = Request::builder().uri("/metrics");
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let response = api
        .router
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn metrics_and_ingest_counters() {
    let api = api();
    let (content_type, text) = scrape(&api, None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for line in [
        "# TYPE fleetgate_ingest_rejected_total counter",
        "fleetgate_ingest_rejected_total{reason=\"undecodable\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!text.contains("# EOF"), "{text}");
    let (content_type, text) = scrape(
        &api,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        text.lines()
            .any(|l| l == "# TYPE fleetgate_ingest_rejected counter")
    );
    assert!(text.ends_with("# EOF\n"));
    let (status, body) = api.get("/api/v1/ingest").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["stored"]["telemetry"], 0);
    assert_eq!(body["rejected"]["bad_topic"], 0);
    assert_eq!(body["storage"]["devices"], 0);
}

/// Prometheus 2.42's `promtool check metrics` (the Debian `prometheus` package; `.ci/run`
/// installs it) finds no problem in what /metrics serves by default.
#[tokio::test]
async fn the_default_metrics_pass_promtool() {
    let api = api_seeded(seed_alert);
    // Every kind of series present: an HTTP request, an unresolved alert.
    api.get("/api/v1/devices").await;
    let (_, text) = scrape(&api, None).await;
    assert!(
        text.lines()
            .any(|l| l == "fleetgate_alerts_unresolved{severity=\"warning\"} 1"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l
            == "fleetgate_http_requests_total{method=\"GET\",route=\"/api/v1/devices\",status=\"200\"} 1"),
        "{text}"
    );
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus; .ci/run installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned()
        ),
        (Some(0), String::new(), String::new()),
        "{text}"
    );
}

#[tokio::test]
async fn a_devices_latest_refusals_are_served_with_their_reasons() {
    let api = api();
    api.post("/api/v1/devices", r#"{"id": "d1"}"#).await;
    assert_eq!(
        api.get("/api/v1/devices/d1/refusals").await,
        (
            StatusCode::OK,
            json!({"device": "d1", "total": 0, "refusals": []})
        )
    );
    // What the data path reports through `Metrics::reject`, the API shows.
    api.metrics.reject(
        crate::metrics::Reject::Invalid,
        "d1",
        &"telemetry: unknown field `tmp_c`",
    );
    api.metrics.reject(
        crate::metrics::Reject::Invalid,
        "d1",
        &"telemetry: unknown field `tmp_c`",
    );
    let (status, body) = api.get("/api/v1/devices/d1/refusals").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            body["total"].as_u64(),
            body["refusals"].as_array().map(Vec::len)
        ),
        (Some(2), Some(1))
    );
    let r = &body["refusals"][0];
    assert_eq!(
        (
            r["reason"].as_str(),
            r["count"].as_u64(),
            r["detail"].as_str()
        ),
        (
            Some("invalid"),
            Some(2),
            Some("telemetry: unknown field `tmp_c`")
        )
    );
    assert!(r["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        api.get("/api/v1/devices/nope/refusals").await,
        (
            StatusCode::NOT_FOUND,
            json!({"error": "device nope not found"})
        )
    );
}

#[tokio::test]
async fn rollout_requests_are_checked_and_say_what_is_wrong() {
    let api = api();
    let cases = [
        (
            r#"{"kind": "model", "name": "kws", "version": "2.0.0", "all": true, "devices": ["d1"]}"#,
            StatusCode::BAD_REQUEST,
            "give exactly one target: \"all\": true, \"labels\": {...} or \"devices\": [...]",
        ),
        (
            r#"{"kind": "model", "name": "kws", "version": "2.0.0"}"#,
            StatusCode::BAD_REQUEST,
            "give exactly one target: \"all\": true, \"labels\": {...} or \"devices\": [...]",
        ),
        (
            r#"{"kind": "blob", "name": "kws", "version": "2.0.0", "all": true}"#,
            StatusCode::BAD_REQUEST,
            "kind \"blob\": one of model, firmware",
        ),
        (
            r#"{"kind": "model", "name": "kws", "version": "2.0.0", "all": true, "policy": {"bake": 5, "stages": ["10", "5"]}}"#,
            StatusCode::BAD_REQUEST,
            "policy.bake: expected a duration like \"5s\", found integer; policy.stages: the last stage must be \"100%\"; policy.stages[1]: must be larger than the stage before it (sizes are cumulative)",
        ),
        (
            r#"{"kind": "model", "name": "kws", "version": "2.0.0", "all": true}"#,
            StatusCode::NOT_FOUND,
            "model kws 2.0.0 not found",
        ),
    ];
    for (body, status, error) in cases {
        let (got, answer) = api.post("/api/v1/rollouts", body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(error)),
            "{body}"
        );
    }
    assert_eq!(
        api.get("/api/v1/rollouts/7").await,
        (
            StatusCode::NOT_FOUND,
            json!({"error": "rollout 7 not found"})
        )
    );
    let (status, body) = api.post("/api/v1/rollouts/7/pause", "").await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "rollout 7 not found"})
        )
    );
    let (status, body) = api.get("/api/v1/rollouts?state=done").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        api.get("/api/v1/rollouts").await,
        (StatusCode::OK, json!([]))
    );
    let (status, key) = api.get("/api/v1/rollouts/signing-key").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(key["public_key"], hex_of([7; 32]));
}

#[tokio::test]
async fn the_uplink_endpoint_shows_an_uplink_that_is_off() {
    let api = api();
    let (status, body) = api.get("/api/v1/uplink").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], false);
    assert_eq!(body["connection"]["state"], "off");
    assert_eq!(body["webhooks"], json!([]));
    assert_eq!(body["destinations"], json!([]));
    let streams: Vec<(&str, u64)> = body["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stream"].as_str().unwrap(), s["head"].as_u64().unwrap()))
        .collect();
    assert_eq!(streams, [("upstream", 0), ("webhooks", 0)]);
}

fn hex_of(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn each_endpoint_needs_the_role_it_should() {
    use crate::auth::Role::{Admin, Operator, ReadOnly};
    let cases = [
        (Method::GET, "/devices", ReadOnly),
        (Method::GET, "/me", ReadOnly),
        (Method::GET, "/devices/{id}/refusals", ReadOnly),
        (Method::GET, "/rollouts/{id}", ReadOnly),
        (Method::GET, "/registry", ReadOnly),
        (Method::GET, "/uplink", ReadOnly),
        (
            Method::GET,
            "/drift/{model}/{version}/samples.csv",
            ReadOnly,
        ),
        (Method::POST, "/rollouts", Operator),
        (Method::POST, "/rollouts/{id}/rollback", Operator),
        (Method::POST, "/updates", Operator),
        (Method::POST, "/alerts/{id}/ack", Operator),
        (Method::POST, "/devices/{id}/commands", Operator),
        (Method::POST, "/devices", Admin),
        (Method::DELETE, "/devices/{id}", Admin),
        (Method::POST, "/devices/{id}/credential", Admin),
        (Method::POST, "/registry/bundles", Admin),
        (
            Method::PUT,
            "/registry/{kind}/{name}/aliases/{alias}",
            Admin,
        ),
        (Method::GET, "/tokens", Admin),
        (Method::POST, "/tokens", Admin),
        (Method::DELETE, "/tokens/{name}", Admin),
        (Method::GET, "/audit", Admin),
        (Method::POST, "/backup/snapshot", Admin),
    ];
    for (method, path, role) in cases {
        assert_eq!(
            access::required_role(&method, path),
            role,
            "{method} {path}"
        );
    }
}

impl Api {
    async fn with(&self, token: &str, method: Method, uri: &str, body: Option<&str>) -> StatusCode {
        self.call(method, uri, Some(token), body).await.0
    }

    /// Creates a token through the API and returns its secret.
    async fn token(&self, name: &str, role: &str) -> String {
        let (status, body) = self
            .post(
                "/api/v1/tokens",
                &json!({ "name": name, "role": role }).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn roles_decide_what_a_token_may_do() {
    let api = api();
    let reader = api.token("dashboard", "read-only").await;
    let operator = api.token("oncall", "operator").await;
    let rollout = r#"{"kind": "model", "name": "m", "version": "1.0.0", "all": true}"#;

    assert_eq!(
        api.with(&reader, Method::GET, "/api/v1/devices", None)
            .await,
        StatusCode::OK
    );
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&reader),
            Some(rollout),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::FORBIDDEN,
            json!({"error": "token `dashboard` has role read-only; POST /rollouts needs operator"})
        )
    );
    let enroll = r#"{"id": "d1"}"#;
    assert_eq!(
        api.with(&operator, Method::POST, "/api/v1/devices", Some(enroll))
            .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api.with(&operator, Method::GET, "/api/v1/tokens", None)
            .await,
        StatusCode::FORBIDDEN
    );
    // Past the role check, the request itself is judged: no such release, no such alert.
    assert_eq!(
        api.with(&operator, Method::POST, "/api/v1/rollouts", Some(rollout))
            .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.with(&operator, Method::POST, "/api/v1/alerts/9/ack", None)
            .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.with(TOKEN, Method::POST, "/api/v1/devices", Some(enroll))
            .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.call(Method::POST, "/api/v1/rollouts", None, Some(rollout))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tokens_are_shown_once_listed_without_secrets_and_revoked_at_once() {
    let api = api();
    let secret = api.token("ci", "operator").await;
    assert_eq!(secret.len(), 64);
    let (status, body) = api.get("/api/v1/tokens").await;
    assert_eq!(status, StatusCode::OK);
    let list = body["tokens"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "ci");
    assert_eq!(list[0]["role"], "operator");
    assert_eq!(list[0]["created_by"], "bootstrap");
    assert!(list[0].get("token").is_none());
    assert!(!body.to_string().contains(&secret));

    for (bad, status, error) in [
        (
            r#"{"name": "ci", "role": "operator"}"#,
            StatusCode::CONFLICT,
            "a token named `ci` exists; revoke it first",
        ),
        (
            r#"{"name": "CI Bot", "role": "operator"}"#,
            StatusCode::BAD_REQUEST,
            "token name `CI Bot` may contain only a-z, 0-9, `-`, `_` and `.`",
        ),
        (
            r#"{"name": "bootstrap", "role": "admin"}"#,
            StatusCode::BAD_REQUEST,
            "`bootstrap` names the configured token",
        ),
        (
            r#"{"name": "x", "role": "root"}"#,
            StatusCode::BAD_REQUEST,
            "unknown role `root`: expected read-only, operator or admin",
        ),
    ] {
        assert_eq!(
            api.post("/api/v1/tokens", bad).await,
            (status, json!({ "error": error })),
            "{bad}"
        );
    }

    assert_eq!(
        api.with(&secret, Method::GET, "/api/v1/devices", None)
            .await,
        StatusCode::OK
    );
    assert_eq!(
        api.with(TOKEN, Method::DELETE, "/api/v1/tokens/ci", None)
            .await,
        StatusCode::OK
    );
    assert_eq!(
        api.with(&secret, Method::GET, "/api/v1/devices", None)
            .await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call(Method::DELETE, "/api/v1/tokens/ci", Some(TOKEN), None)
            .await,
        (
            StatusCode::NOT_FOUND,
            json!({"error": "no token named `ci`"})
        )
    );
    assert_eq!(
        api.get("/api/v1/tokens").await,
        (StatusCode::OK, json!({"tokens": []}))
    );
}

#[tokio::test]
async fn every_change_is_audited_with_the_tokens_name() {
    let api = api();
    let reader = api.token("viewer", "read-only").await;
    assert_eq!(
        api.with(
            TOKEN,
            Method::POST,
            "/api/v1/devices",
            Some(r#"{"id": "d1"}"#)
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        api.with(&reader, Method::DELETE, "/api/v1/devices/d1", None)
            .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api.with(&reader, Method::GET, "/api/v1/devices/d1", None)
            .await,
        StatusCode::OK
    );
    assert_eq!(
        api.with(TOKEN, Method::POST, "/api/v1/alerts/5/resolve", None)
            .await,
        StatusCode::NOT_FOUND
    );
    let (status, body) = api.get("/api/v1/audit").await;
    assert_eq!(status, StatusCode::OK);
    let entries: Vec<(u64, &str, &str, &str, &str, u64)> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().unwrap(),
                e["by"].as_str().unwrap(),
                e["role"].as_str().unwrap(),
                e["method"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (
                4,
                "bootstrap",
                "admin",
                "POST",
                "/api/v1/alerts/5/resolve",
                404
            ),
            (
                3,
                "viewer",
                "read-only",
                "DELETE",
                "/api/v1/devices/d1",
                403
            ),
            (2, "bootstrap", "admin", "POST", "/api/v1/devices", 201),
            (1, "bootstrap", "admin", "POST", "/api/v1/tokens", 201),
        ]
    );
    let (_, page) = api.get("/api/v1/audit?before=3&limit=1").await;
    assert_eq!(page["entries"][0]["id"], 2);
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(
        api.with(&reader, Method::GET, "/api/v1/audit", None).await,
        StatusCode::FORBIDDEN
    );
}

/// Serves the API on a free loopback port with the gateway's listener, for requests that
/// only a real connection can make (announced lengths, raw bytes).
async fn live(api: &Api) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = api.router.clone();
    tokio::spawn(async move {
        axum::serve(listener::HttpListener(listener), router)
            .await
            .unwrap();
    });
    addr
}

/// Sends `raw` and reads the answer until the server closes the connection. A server that
/// waited for the announced body would hold the connection open: the deadline fails the
/// test then (it is not how long anything is expected to take).
async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the server answered without waiting for the body")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_owned();
    (
        status,
        content_type,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_body_over_the_limit_gets_a_json_413() {
    let api = api();
    // Streamed without a length: cut off at the limit.
    let big = format!(
        r#"{{"id": "d1", "labels": {{"x": "{}"}}}}"#,
        "y".repeat(MAX_JSON_BODY)
    );
    let (status, body) = api.post("/api/v1/devices", &big).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": "the request body is too large; this endpoint takes at most 1048576 bytes"})
        )
    );
    // The same on a bundle upload, whose limit is registry.max_bundle_bytes (1 MiB here).
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/registry/bundles")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(vec![0u8; (1 << 20) + 1]))
        .unwrap();
    let response = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).unwrap(),
        json!({"error": "the request body is too large; this endpoint takes at most 1048576 bytes"})
    );
    assert_eq!(
        api.get("/api/v1/devices").await,
        (StatusCode::OK, json!([]))
    );
}

#[tokio::test]
async fn an_announced_length_over_the_limit_is_refused_before_the_body_is_read() {
    let api = api();
    let addr = live(&api).await;
    for (path, announced, limit) in [
        ("/api/v1/devices", 10u64 << 30, MAX_JSON_BODY),
        ("/api/v1/registry/bundles", 80_000_000, 1 << 20),
        (
            "/api/v1/registry/model/m/1.0.0/baseline.csv",
            2 << 20,
            1 << 20,
        ),
    ] {
        // Only the first byte of the body is sent: the answer must not wait for the rest.
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {announced}\r\n\r\n{{"
        );
        let (status, content_type, body) = raw_exchange(addr, raw.as_bytes()).await;
        assert_eq!(
            (status, content_type.as_str(), body),
            (
                413,
                "application/json",
                json!({ "error": format!("the request body is {announced} bytes; this endpoint takes at most {limit} bytes") })
            ),
            "{path}"
        );
    }
    // A control byte in a header is answered in JSON too, on the API's own listener.
    let (status, content_type, body) = raw_exchange(
        addr,
        b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\x02b\r\n\r\n",
    )
    .await;
    assert_eq!(
        (status, content_type.as_str(), body),
        (
            400,
            "application/json",
            json!({"error": "header `authorization` holds a control character (0x02)"})
        )
    );
}

#[tokio::test]
async fn operators_cannot_send_actions_that_belong_to_the_engines() {
    let api = api();
    api.post("/api/v1/devices", r#"{"id": "d1"}"#).await;
    let manifest = fleetgate_protocol::Signed {
        body: vec![1, 2, 3],
        signatures: vec![],
    };
    let cases = [
        (
            Action::Update(fleetgate_protocol::UpdateOffer {
                transfer: 1,
                manifest: manifest.clone(),
            }),
            "action `update` is sent by the gateway itself, not through commands; use POST /api/v1/updates or a rollout",
        ),
        (
            Action::Rollback(manifest),
            "action `rollback` is sent by the gateway itself, not through commands; use POST /api/v1/rollouts/{id}/rollback",
        ),
        (
            Action::DriftBins(fleetgate_protocol::DriftBins {
                model: "kws".into(),
                version: semver::Version::new(1, 0, 0),
                edges: vec![vec![0.5]],
            }),
            "action `drift_bins` is sent by the gateway itself, not through commands; use a model version's baseline (PUT /api/v1/registry/model/{name}/{version}/baseline)",
        ),
    ];
    for (action, error) in cases {
        let body = json!({ "action": action }).to_string();
        assert_eq!(
            api.post("/api/v1/devices/d1/commands", &body).await,
            (StatusCode::BAD_REQUEST, json!({ "error": error })),
            "{body}"
        );
    }
}

#[tokio::test]
async fn the_bootstrap_token_cannot_be_revoked_and_keeps_working() {
    let api = api();
    assert_eq!(
        api.call(
            Method::DELETE,
            "/api/v1/tokens/bootstrap",
            Some(TOKEN),
            None
        )
        .await,
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "`bootstrap` is the configured admin token (http.token, $FLEETGATE_API_TOKEN, or <data_dir>/api-token): change it there and restart"})
        )
    );
    assert_eq!(
        api.get("/api/v1/devices").await,
        (StatusCode::OK, json!([]))
    );
    // A name that is not stored changes nothing either.
    assert_eq!(
        api.call(Method::DELETE, "/api/v1/tokens/nobody", Some(TOKEN), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.get("/api/v1/devices").await.0, StatusCode::OK);
}

#[tokio::test]
async fn request_bodies_must_be_json_objects() {
    let api = api();
    for (uri, body) in [
        ("/api/v1/devices", r#"["d1"]"#),
        ("/api/v1/devices", r#"["d1", {"site": "north"}]"#),
        ("/api/v1/tokens", r#"["ci", "admin"]"#),
        ("/api/v1/rollouts", r#"["model", "kws", "1.0.0", true]"#),
        ("/api/v1/updates", r#"["model", "kws", "1.0.0"]"#),
        ("/api/v1/devices", r#""d1""#),
        ("/api/v1/devices", "null"),
        ("/api/v1/rollouts/1/pause", r#"["because"]"#),
        ("/api/v1/alerts/1/ack", "[]"),
    ] {
        assert_eq!(
            api.post(uri, body).await,
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "the request body must be a JSON object ({...})"})
            ),
            "{uri} {body}"
        );
    }
    assert_eq!(
        api.get("/api/v1/devices").await,
        (StatusCode::OK, json!([]))
    );
    let (status, body) = api.get("/api/v1/tokens").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"tokens": []})));
    // JSON bodies need their media type.
    let (status, body) = api
        .call(Method::POST, "/api/v1/devices", Some(TOKEN), None)
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            json!({"error": "the request body must be JSON: send `Content-Type: application/json`"})
        )
    );
}

/// An open alert, as the writer would have stored it.
fn seed_alert(store: &Store) {
    store
        .write(|t| {
            t.put_alert(&crate::model::AlertRecord {
                id: 1,
                device: "d1".into(),
                kind: fleetgate_protocol::AlertKind::Thermal,
                severity: Severity::Warning,
                state: AlertState::Open,
                source: crate::model::AlertSource::Device,
                opened_ms: 1_000,
                last_ms: 1_000,
                count: 1,
                value: Some(91.0),
                message: "hot".into(),
                acknowledged: None,
                resolved: None,
            })
        })
        .unwrap();
}

#[tokio::test]
async fn an_alert_action_with_a_malformed_body_is_refused_and_changes_nothing() {
    let api = api_seeded(seed_alert);
    for body in ["{not json", r#"{"note": "x"}"#, "[1]"] {
        let (status, answer) = api.post("/api/v1/alerts/1/ack", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let (status, answer) = api.post("/api/v1/alerts/1/resolve", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    let (_, alert) = api.get("/api/v1/alerts/1").await;
    assert_eq!(alert["state"], "open");
    // Empty, or an empty object, is how the action is asked for.
    let (status, alert) = api.post("/api/v1/alerts/1/ack", "").await;
    assert_eq!(
        (status, alert["state"].as_str()),
        (StatusCode::OK, Some("acknowledged"))
    );
    let (status, alert) = api.post("/api/v1/alerts/1/resolve", "{}").await;
    assert_eq!(
        (status, alert["state"].as_str()),
        (StatusCode::OK, Some("resolved"))
    );
}
