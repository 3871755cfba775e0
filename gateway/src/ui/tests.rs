use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;

/// The files as the browser gets them: types, the policy, and what each names of the others.
#[tokio::test]
async fn the_page_its_script_and_its_style_are_served_with_a_strict_policy() {
    let app: Router = router();
    for (path, content_type, needle) in [
        (
            "/ui/",
            "text/html; charset=utf-8",
            "<script src=\"/ui/app.js\" defer></script>",
        ),
        (
            "/ui/app.js",
            "text/javascript; charset=utf-8",
            "const API = '/api/v1';",
        ),
        ("/ui/style.css", "text/css; charset=utf-8", "svg.chart"),
    ] {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], content_type, "{path}");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], POLICY, "{path}");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains(needle),
            "{path} lacks {needle}"
        );
    }
    let response = app
        .oneshot(Request::get("/ui").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()[header::LOCATION], "/ui/");
}

/// Text from devices reaches the page only as text: the script never assigns HTML.
#[test]
fn the_script_never_writes_html() {
    for forbidden in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!APP.contains(forbidden), "app.js uses {forbidden}");
    }
}
