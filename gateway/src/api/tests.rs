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
}

fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let config = fleetgate_config::Config::default();
    let store = Store::open(dir.path()).unwrap();
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
        metrics,
        tokens: Arc::new(access::load_tokens(&store_for_tokens, TOKEN).unwrap()),
        data_dir: dir.path().to_owned(),
        max_body_bytes: 1 << 20,
        rollouts: config.rollouts.clone(),
        rollback_public: [7; 32],
    });
    Api {
        _dir: dir,
        router: router(state),
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

#[tokio::test]
async fn metrics_and_ingest_counters() {
    let api = api();
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("fleetgate_ingest_rejected_total{reason=\"undecodable\"} 0"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));
    let (status, body) = api.get("/api/v1/ingest").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["stored"]["telemetry"], 0);
    assert_eq!(body["rejected"]["bad_topic"], 0);
    assert_eq!(body["storage"]["devices"], 0);
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

fn hex_of(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn each_endpoint_needs_the_role_it_should() {
    use crate::auth::Role::{Admin, Operator, ReadOnly};
    let cases = [
        (Method::GET, "/devices", ReadOnly),
        (Method::GET, "/rollouts/{id}", ReadOnly),
        (Method::GET, "/registry", ReadOnly),
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

#[tokio::test]
async fn a_json_body_over_one_mib_is_refused_and_says_so() {
    let api = api();
    let big = format!(
        r#"{{"id": "d1", "labels": {{"x": "{}"}}}}"#,
        "y".repeat(MAX_JSON_BODY)
    );
    let (status, body) = api.post("/api/v1/devices", &big).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "Failed to buffer the request body: length limit exceeded"})
    );
    assert_eq!(
        api.get("/api/v1/devices").await,
        (StatusCode::OK, json!([]))
    );
}
