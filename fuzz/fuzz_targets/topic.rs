//! Topic parsing and device ids: parsing never panics; an accepted topic formats back to
//! exactly the input and parses again to the same value; every valid device id yields a
//! parseable topic for every channel and encoding, and the JSON form of an id is accepted
//! exactly when the id is.

#![no_main]

use fleetgate_protocol::topic::{self, MAX_TOPIC_LEN};
use fleetgate_protocol::{Channel, DeviceId, Downlink, Encoding, Topic, Uplink};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Topic::parse(text) {
        Ok(t) => {
            let formatted = topic::format(t.device, t.channel, t.encoding);
            assert_eq!(formatted, text, "format(parse(t)) != t");
            assert_eq!(t.to_string(), text);
            assert!(
                text.len() <= MAX_TOPIC_LEN,
                "{text:?} is over MAX_TOPIC_LEN"
            );
            assert_eq!(Topic::parse(&formatted), Ok(t));
            assert!(DeviceId::new(t.device).is_ok());
        }
        Err(e) => drop(e.to_string()),
    }

    let id = DeviceId::new(text);
    let quoted = serde_json::to_string(text).expect("a string encodes");
    let from_json = serde_json::from_str::<DeviceId>(&quoted);
    assert_eq!(
        id.is_ok(),
        from_json.is_ok(),
        "JSON and DeviceId::new disagree on {text:?}"
    );
    if let Ok(id) = id {
        assert_eq!(id.as_str(), text);
        let channels = Uplink::ALL
            .into_iter()
            .map(Channel::Up)
            .chain(Downlink::ALL.into_iter().map(Channel::Down));
        for channel in channels {
            for encoding in [Encoding::Postcard, Encoding::Json] {
                let t = topic::format(id.as_str(), channel, encoding);
                let expected = Topic {
                    device: id.as_str(),
                    channel,
                    encoding,
                };
                assert_eq!(Topic::parse(&t), Ok(expected), "{t:?}");
            }
        }
    }
});
