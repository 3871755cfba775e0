use std::collections::BTreeSet;

use fleetgate_protocol::manifest::RuntimeReq as Runtime;
use semver::Version;
use serde_json::Value;

/// The properties of a schema in the served OpenAPI document.
fn properties(doc: &Value, name: &str) -> BTreeSet<String> {
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {name}"))
        .keys()
        .cloned()
        .collect()
}

fn keys(v: impl serde::Serialize) -> BTreeSet<String> {
    serde_json::to_value(v)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// Each schema written here by hand has exactly the fields the real type serializes.
#[test]
fn the_hand_written_schemas_match_the_types_they_describe() {
    let doc = serde_json::to_value(crate::api::openapi()).unwrap();
    let installed = fleetgate_protocol::Installed {
        name: "kws".into(),
        version: Version::new(1, 0, 0),
        release: 3,
    };
    let cases: Vec<(&str, BTreeSet<String>)> = vec![
        ("Installed", keys(&installed)),
        (
            "HardwareProfile",
            keys(fleetgate_protocol::HardwareProfile {
                arch: "armv7em".into(),
                class: "nrf5340-dk".into(),
                ram_bytes: 1,
                flash_bytes: 1,
                accelerator: Some("npu".into()),
                runtime: Some(installed.clone()),
            }),
        ),
        (
            "HardwareMetrics",
            keys(fleetgate_protocol::HardwareMetrics {
                cpu_pct: Some(1.0),
                free_mem_bytes: Some(1),
                temp_c: Some(1.0),
                battery_mv: Some(1),
                power_mw: Some(1.0),
                inference_latency_us: Some(1),
            }),
        ),
        (
            "ModelMetrics",
            keys(fleetgate_protocol::ModelMetrics {
                name: "kws".into(),
                version: Version::new(1, 0, 0),
                inferences: 1,
                class_counts: vec![1],
                mean_confidence: Some(0.5),
            }),
        ),
        (
            "DeviceCounters",
            keys(crate::model::DeviceCounters::default()),
        ),
        (
            "Compat",
            keys(fleetgate_protocol::Compat {
                classes: vec!["a".into()],
                arch: Some("x".into()),
                min_ram_bytes: 1,
                min_flash_bytes: 1,
                runtime: Some(Runtime {
                    name: "tflm".into(),
                    min_version: Version::new(2, 0, 0),
                }),
            }),
        ),
        (
            "RuntimeReq",
            keys(Runtime {
                name: "tflm".into(),
                min_version: Version::new(2, 0, 0),
            }),
        ),
        (
            "DriftSubject",
            keys(crate::model::DriftSubject {
                model: "kws".into(),
                version: Version::new(1, 0, 0),
                cohort: "all".into(),
                feature: Some("temp".into()),
            }),
        ),
    ];
    for (name, serialized) in cases {
        assert_eq!(properties(&doc, name), serialized, "{name}");
    }
}

#[test]
fn the_document_is_openapi_3_1_with_every_route_and_bearer_auth() {
    let doc = serde_json::to_value(crate::api::openapi()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let operations: usize = paths
        .values()
        .map(|item| {
            ["get", "put", "post", "delete", "patch"]
                .iter()
                .filter(|m| item.get(**m).is_some())
                .count()
        })
        .sum();
    // Every route the router serves under /api/v1, /healthz and /metrics (with the three of
    // /validations and the one of /uplink).
    assert_eq!((paths.len(), operations), (46, 54));
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let open = op["security"] == serde_json::json!([{}]);
            assert_eq!(
                open,
                !path.starts_with("/api/v1"),
                "{method} {path}: only /healthz and /metrics need no token"
            );
            assert!(
                op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|k| k.starts_with('2')),
                "{method} {path} documents no success"
            );
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, method) in [
        ("/api/v1/devices", "post"),
        ("/api/v1/devices/{id}/refusals", "get"),
        ("/api/v1/rollouts/{id}/rollback", "post"),
        ("/api/v1/registry/bundles", "post"),
    ] {
        assert!(paths[path].get(method).is_some(), "{method} {path}");
    }
}
