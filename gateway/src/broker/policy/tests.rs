use super::*;

#[test]
fn own_uplinks_are_permitted_with_their_channel_and_encoding() {
    assert_eq!(
        uplink("d1", "fg/d1/telemetry").unwrap(),
        (Uplink::Telemetry, Encoding::Postcard)
    );
    assert_eq!(
        uplink("d1", "fg/d1/hello/json").unwrap(),
        (Uplink::Hello, Encoding::Json)
    );
}

#[test]
fn publishing_as_another_device_or_downstream_is_not_permitted() {
    let cases: &[(&str, Denied)] = &[
        ("fg/d2/telemetry", Denied::NotPermitted),
        ("fg/d1/cmd", Denied::NotPermitted),
        ("fg/d10/telemetry", Denied::NotPermitted),
        (
            "/tenants/d1/up/telemetry",
            Denied::BadTopic(TopicError::WrongRoot),
        ),
        (
            "/tenants/d2/up/telemetry",
            Denied::BadTopic(TopicError::WrongRoot),
        ),
        (
            "fg/d1/telemetry/xml",
            Denied::BadTopic(TopicError::BadEncoding),
        ),
        ("", Denied::BadTopic(TopicError::WrongRoot)),
    ];
    for (topic, want) in cases {
        assert_eq!(uplink("d1", topic).unwrap_err(), *want, "{topic}");
    }
}

#[test]
fn only_own_downlink_topics_may_be_subscribed() {
    let sub = |f| subscribe("d1", f).unwrap();
    assert_eq!(sub("fg/d1/cmd").internal, "/tenants/d1/down/cmd");
    assert_eq!(sub("fg/d1/cmd/json").internal, "/tenants/d1/down/cmd/json");
    let chunk = sub("fg/d1/chunk");
    assert_eq!(
        (chunk.channel, chunk.encoding),
        (Downlink::Chunk, Encoding::Postcard)
    );
    let chunk = sub("fg/d1/chunk/json");
    assert_eq!(
        (chunk.channel, chunk.encoding),
        (Downlink::Chunk, Encoding::Json)
    );
    for filter in [
        "#",
        "+/#",
        "fg/#",
        "fg/+/cmd",
        "fg/d1/#",
        "fg/d1/+",
        "fg/d2/cmd",
        "fg/d1/telemetry",
        "$SYS/#",
        "/tenants/d1/down/cmd",
        "$share/g/fg/d1/cmd",
    ] {
        assert!(subscribe("d1", filter).is_err(), "{filter}");
    }
}

#[test]
fn downlink_topics_round_trip_to_the_device_topic() {
    for enc in [Encoding::Postcard, Encoding::Json] {
        let internal = downlink("d1", Downlink::Command, enc);
        let device_topic = to_device("d1", &internal).unwrap();
        assert_eq!(subscribe("d1", &device_topic).unwrap().internal, internal);
    }
    assert_eq!(to_device("d2", "/tenants/d1/down/cmd"), None);
    assert_eq!(to_device("d1", "/tenants/d1/up/telemetry"), None);
    assert_eq!(to_device("d1", "/tenants/d10/down/cmd"), None);
}

#[test]
fn downlink_topics_parse_back_to_their_device() {
    for (device, channel, encoding) in [
        ("d1", Downlink::Command, Encoding::Postcard),
        ("pump-7", Downlink::Command, Encoding::Json),
        ("a.b:c", Downlink::Chunk, Encoding::Postcard),
    ] {
        let topic = downlink(device, channel, encoding);
        assert_eq!(
            downlink_of(&topic),
            Some((device, channel, encoding)),
            "{topic}"
        );
    }
    for bad in [
        "/tenants/d1/up/telemetry",
        "/tenants/d1/down/telemetry",
        "/tenants/d1/down/cmd/xml",
        "/tenants/_flush/down/cmd",
        "tenants/d1/down/cmd",
        "/tenants/d1/down",
    ] {
        assert_eq!(downlink_of(bad), None, "{bad}");
    }
}
