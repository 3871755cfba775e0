//! Model URIs and the artifact locations the tracking server proxies (the REST calls are
//! tested against a live server in gateway/tests/mlflow.rs).

use super::*;

#[test]
fn model_uris() {
    assert_eq!(
        parse_model_uri("models:/kws/3").unwrap(),
        ("kws".to_owned(), "3".to_owned())
    );
    assert_eq!(
        parse_model_uri("models:/team/kws/12").unwrap(),
        ("team/kws".to_owned(), "12".to_owned())
    );
    for bad in [
        "kws/3",
        "models:/kws",
        "models:/kws/latest",
        "models://3",
        "models:/kws/",
    ] {
        assert!(parse_model_uri(bad).is_err(), "{bad}");
    }
    assert_eq!(join("1/abc/artifacts", "model"), "1/abc/artifacts/model");
    assert_eq!(join("", "m.tflite"), "m.tflite");
    assert_eq!(join("a/", ""), "a");
}

#[test]
fn artifact_locations_the_proxy_serves() {
    let m = Mlflow::new("http://127.0.0.1:9");
    assert_eq!(
        m.proxied_path("mlflow-artifacts:/1/abc/artifacts/model")
            .unwrap(),
        "1/abc/artifacts/model"
    );
    assert_eq!(
        m.proxied_path("mlflow-artifacts://host:5000/1/abc/artifacts")
            .unwrap(),
        "1/abc/artifacts"
    );
    let err = m.proxied_path("s3://bucket/model").unwrap_err().to_string();
    assert!(err.contains("--serve-artifacts"), "{err}");
}
