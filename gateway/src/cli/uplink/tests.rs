//! Requests are checked as a site checks them before they are signed.

use super::check_request;

const NOW: u64 = 1_780_000_000_000;

fn request(expires: &str, action: &str, id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id, "expires": expires, "action": action, "rollout": "central-1",
    }))
    .unwrap()
}

#[test]
fn a_good_request_passes() {
    let r = check_request(&request("2026-05-29T00:00:00Z", "pause", "central-2"), NOW).unwrap();
    assert_eq!((r.id.as_str(), r.action.as_str()), ("central-2", "pause"));
}

#[test]
fn what_a_site_would_refuse_is_refused_and_named() {
    let err = |text: &[u8]| format!("{:#}", check_request(text, NOW).unwrap_err());
    assert!(
        err(&request("2020-01-01T00:00:00Z", "pause", "x")).contains("expired"),
        "past expiry"
    );
    assert!(err(&request("2027-01-01T00:00:00Z", "pause", "x")).contains("30 days"));
    assert!(err(&request("2026-05-29T00:00:00Z", "explode", "x")).contains("action \"explode\""));
    assert!(err(&request("2026-05-29T00:00:00Z", "pause", "")).contains("id"));
    assert!(
        err(br#"{"id":"x","expires":"2026-05-29T00:00:00Z","action":"pause","colour":1}"#)
            .contains("colour")
    );
}
