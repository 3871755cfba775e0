use super::*;

#[test]
fn accepts_valid_ids() {
    for id in [
        "a",
        "dev-1",
        "A_b.c:d",
        "00:1A:2B:3C:4D:5E",
        &"x".repeat(MAX_LEN),
    ] {
        assert_eq!(DeviceId::new(id).unwrap().as_str(), id);
    }
}

#[test]
fn rejects_invalid_ids_with_the_reason() {
    let cases: &[(&str, IdError)] = &[
        ("", IdError::Empty),
        (&"x".repeat(MAX_LEN + 1), IdError::TooLong),
        ("-dev", IdError::BadFirst),
        (".dev", IdError::BadFirst),
        ("dev/1", IdError::BadChar('/')),
        ("dev+", IdError::BadChar('+')),
        ("dev#", IdError::BadChar('#')),
        ("d$", IdError::BadChar('$')),
        ("dev 1", IdError::BadChar(' ')),
        ("dév", IdError::BadChar('é')),
    ];
    for (id, want) in cases {
        assert_eq!(DeviceId::new(id).unwrap_err(), *want, "{id:?}");
    }
}

#[test]
fn deserialize_validates() {
    let ok: DeviceId = serde_json::from_str("\"dev-1\"").unwrap();
    assert_eq!(ok.as_str(), "dev-1");
    assert!(serde_json::from_str::<DeviceId>("\"a/b\"").is_err());
}
