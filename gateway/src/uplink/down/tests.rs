use ed25519_dalek::SigningKey;
use serde_json::json;

use super::*;

fn ops_key() -> SigningKey {
    SigningKey::from_bytes(&[5; 32])
}

fn trusted() -> Vec<[u8; 32]> {
    vec![ops_key().verifying_key().to_bytes()]
}

fn create_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": "req-1",
        "expires": "2100-01-01T00:00:00Z",
        "action": "create",
        "kind": "model",
        "name": "kws",
        "version": "2.0.0",
        "all": true,
    }))
    .unwrap()
}

#[test]
fn topics_of_this_site_and_the_fleet() {
    let cases = [
        ("fg/sites/site-a/down/bundle", Some((false, What::Bundle))),
        ("fg/sites/site-a/down/rollout", Some((false, What::Rollout))),
        ("fg/fleet/down/bundle", Some((true, What::Bundle))),
        ("fg/fleet/down/rollout", Some((true, What::Rollout))),
        ("fg/sites/site-b/down/bundle", None),
        ("fg/sites/site-ab/down/bundle", None),
        ("fg/sites/site-a/down/other", None),
        ("fg/sites/site-a/up/alert", None),
        ("other/fleet/down/bundle", None),
        ("fg/fleet/down/bundle/x", None),
        ("fg", None),
    ];
    for (topic, want) in cases {
        assert_eq!(parse_topic("fg", "site-a", topic), want, "{topic}");
    }
    assert_eq!(
        topics("acme/fleet", "site-a", true),
        ["acme/fleet/sites/site-a/down/+", "acme/fleet/fleet/down/+"]
    );
    assert_eq!(topics("fg", "s", false), ["fg/sites/s/down/+"]);
    // A prefix of several levels parses too.
    assert_eq!(
        parse_topic("acme/fleet", "s", "acme/fleet/fleet/down/rollout"),
        Some((true, What::Rollout))
    );
}

#[test]
fn a_request_signed_by_an_operator_key_opens() {
    let envelope = sign_request(create_body(), &ops_key());
    let (request, signer) = open_request(&envelope, &trusted()).unwrap();
    assert_eq!(request.id, "req-1");
    assert_eq!(request.action, "create");
    assert!(request.all);
    assert_eq!(
        signer,
        crate::registry::keys::hex(&fleetgate_protocol::sign::key_id(&trusted()[0]))
    );
}

#[test]
fn unsigned_tampered_foreign_and_malformed_requests_are_refused() {
    let reason = |payload: &[u8]| open_request(payload, &trusted()).unwrap_err().0;
    // Signed by a key the site does not trust.
    let stranger = sign_request(create_body(), &SigningKey::from_bytes(&[6; 32]));
    assert_eq!(reason(&stranger), "unsigned");
    // No signature at all.
    let bare = serde_json::to_vec(&Signed {
        body: create_body(),
        signatures: vec![],
    })
    .unwrap();
    assert_eq!(reason(&bare), "unsigned");
    // The body changed after signing (all -> a device list).
    let mut signed: Signed =
        serde_json::from_slice(&sign_request(create_body(), &ops_key())).unwrap();
    signed.body = String::from_utf8(signed.body)
        .unwrap()
        .replace("\"all\":true", "\"devices\":[\"d1\"]")
        .into_bytes();
    assert_eq!(
        reason(&serde_json::to_vec(&signed).unwrap()),
        "bad_signature"
    );
    // A manifest signature is no request signature (domain separation).
    let manifest = Signed::sign(Domain::Manifest, create_body(), &[ops_key()]);
    assert_eq!(
        reason(&serde_json::to_vec(&manifest).unwrap()),
        "bad_signature"
    );
    // Not JSON; a bare request without the envelope; an unknown field inside.
    assert_eq!(reason(b"\x00\x01"), "invalid");
    assert_eq!(reason(&create_body()), "invalid");
    let extra = serde_json::to_vec(&json!({
        "id": "r", "expires": "2100-01-01T00:00:00Z", "action": "create", "surprise": 1,
    }))
    .unwrap();
    assert_eq!(reason(&sign_request(extra, &ops_key())), "invalid");
    let long_id = serde_json::to_vec(&json!({
        "id": "x".repeat(129), "expires": "2100-01-01T00:00:00Z", "action": "pause",
    }))
    .unwrap();
    assert_eq!(reason(&sign_request(long_id, &ops_key())), "invalid");
}

#[test]
fn requests_expire_and_may_not_be_valid_for_long() {
    let at = |expires: &str| SiteRequest {
        id: "r".into(),
        expires: expires.into(),
        sites: None,
        action: "pause".into(),
        kind: None,
        name: None,
        version: None,
        all: false,
        labels: None,
        devices: None,
        policy: None,
        validate: None,
        rollout: None,
        reason: None,
    };
    let now = 1_700_000_000_000; // 2023-11-14T22:13:20Z
    assert_eq!(
        expiry(&at("2023-11-15T00:00:00Z"), now),
        Ok(1_700_006_400_000)
    );
    assert_eq!(
        expiry(&at("2023-11-14T22:13:20Z"), now).unwrap_err().0,
        "expired"
    );
    assert_eq!(
        expiry(&at("2024-06-01T00:00:00Z"), now).unwrap_err().0,
        "invalid"
    );
    assert_eq!(expiry(&at("tomorrow"), now).unwrap_err().0, "invalid");
}

#[test]
fn a_create_request_may_ask_for_a_validate_stage_checked_as_the_api_checks_it() {
    let body = |validate: Value| {
        serde_json::to_vec(&json!({
            "id": "req-v", "expires": "2100-01-01T00:00:00Z", "action": "create",
            "kind": "model", "name": "kws", "version": "2.0.0", "all": true,
            "validate": validate,
        }))
        .unwrap()
    };
    let (request, _) = open_request(
        &sign_request(
            body(json!({ "min_devices": 2, "timeout": "30m" })),
            &ops_key(),
        ),
        &trusted(),
    )
    .unwrap();
    let v = request.validate.unwrap();
    assert_eq!(
        crate::ingest::ValidateRequest::parse(v.min_devices, v.timeout.as_deref()),
        Ok(crate::ingest::ValidateRequest {
            min_devices: Some(2),
            timeout: Some(std::time::Duration::from_secs(1800)),
        })
    );
    // A field the stage does not have makes the request invalid.
    let odd = sign_request(body(json!({ "k": 2 })), &ops_key());
    assert_eq!(open_request(&odd, &trusted()).unwrap_err().0, "invalid");
    // Out of range, named as the API names it.
    assert_eq!(
        crate::ingest::ValidateRequest::parse(Some(0), None),
        Err("validate.min_devices must be within 1..=1000".to_owned())
    );
    assert_eq!(
        crate::ingest::ValidateRequest::parse(None, Some("0s")),
        Err("validate.timeout must be within 1s..=30d".to_owned())
    );
}
