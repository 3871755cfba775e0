use serde_json::json;

use super::*;

#[test]
fn the_envelope_wraps_the_data_as_is() {
    let e = Entry::new(
        Kind::Presence,
        1_700_000_000_123,
        &json!({"device": "d1", "online": true}),
    );
    let bytes = envelope("site-a", 42, &e);
    assert_eq!(
        String::from_utf8(bytes.clone()).unwrap(),
        r#"{"at":"2023-11-14T22:13:20.123Z","seq":42,"site":"site-a","type":"presence","data":{"device":"d1","online":true}}"#
    );
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["data"]["device"], "d1");
    // A site id that needs escaping in JSON stays valid JSON.
    let odd = envelope("a\"b", 1, &e);
    assert_eq!(
        serde_json::from_slice::<Value>(&odd).unwrap()["site"],
        "a\"b"
    );
    // Empty data (never written by the gateway) is null, still valid JSON.
    let empty = Entry {
        kind: "x".into(),
        at_ms: 0,
        data: Vec::new(),
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&envelope("s", 1, &empty)).unwrap()["data"],
        Value::Null
    );
}

#[test]
fn kinds_have_stable_names() {
    let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "alert",
            "drift_window",
            "rollout",
            "presence",
            "inventory",
            "telemetry",
            "reply"
        ]
    );
    for k in Kind::ALL {
        assert_eq!(Kind::from_name(k.name()), Some(k));
    }
    assert_eq!(Kind::from_name("status"), None);
}

#[test]
fn an_entry_keeps_its_encoding() {
    use crate::storage::records::Record;
    let e = Entry::new(Kind::Alert, 5, &json!({"event": "opened"}));
    let bytes = e.encode();
    // Version 1, then postcard: the kind, the time, the JSON text.
    assert_eq!(bytes[0], 1);
    assert_eq!(Entry::decode(&bytes).unwrap(), e);
    assert!(Entry::decode(&[9, 1, 2]).is_err());
}
