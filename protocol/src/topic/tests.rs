use super::*;

#[test]
fn parses_every_channel_in_both_encodings() {
    let channels = Uplink::ALL
        .into_iter()
        .map(Channel::Up)
        .chain(Downlink::ALL.into_iter().map(Channel::Down));
    for channel in channels {
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let s = format("dev-1", channel, encoding);
            let t = Topic::parse(&s).unwrap();
            assert_eq!(
                t,
                Topic {
                    device: "dev-1",
                    channel,
                    encoding
                }
            );
        }
    }
}

#[test]
fn formats_the_documented_strings() {
    let up = |c| Channel::Up(c);
    assert_eq!(
        format("d1", up(Uplink::Telemetry), Encoding::Postcard),
        "fg/d1/telemetry"
    );
    assert_eq!(
        format("d1", up(Uplink::Telemetry), Encoding::Json),
        "fg/d1/telemetry/json"
    );
    assert_eq!(
        format("d1", up(Uplink::Hello), Encoding::Json),
        "fg/d1/hello/json"
    );
    assert_eq!(
        format("d1", Channel::Down(Downlink::Command), Encoding::Postcard),
        "fg/d1/cmd"
    );
}

#[test]
fn rejects_bad_topics_with_the_reason() {
    let cases: &[(&str, TopicError)] = &[
        ("", TopicError::WrongRoot),
        ("devices/d1/telemetry", TopicError::WrongRoot),
        ("/fg/d1/telemetry", TopicError::WrongRoot),
        ("fg", TopicError::MissingChannel),
        ("fg/d1", TopicError::MissingChannel),
        ("fg//telemetry", TopicError::BadDevice(IdError::Empty)),
        ("fg/+/telemetry", TopicError::BadDevice(IdError::BadFirst)),
        ("fg/#", TopicError::BadDevice(IdError::BadFirst)),
        ("fg/d1/#", TopicError::UnknownChannel),
        ("fg/d1/telemetri", TopicError::UnknownChannel),
        ("fg/d1/telemetry/cbor", TopicError::BadEncoding),
        ("fg/d1/telemetry/", TopicError::BadEncoding),
        ("fg/d1/telemetry/json/x", TopicError::TooManyLevels),
    ];
    for (topic, want) in cases {
        assert_eq!(Topic::parse(topic).unwrap_err(), *want, "{topic:?}");
    }
}

#[test]
fn max_topic_len_bounds_every_formatted_topic() {
    let id = "x".repeat(id::MAX_LEN);
    for c in Uplink::ALL {
        assert!(format(&id, Channel::Up(c), Encoding::Json).len() <= MAX_TOPIC_LEN);
    }
}
