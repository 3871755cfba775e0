//! What a device may publish and subscribe to, and how its downlink topics map onto the
//! embedded broker's internal topics. Pure string functions; no broker types.
//!
//! Devices see `fg/<id>/<channel>[/json]`. An uplink a device may publish goes to the storage
//! writer with its channel and encoding (it never enters the broker). Inside the broker every
//! downlink topic lives under the device's tenant prefix `/tenants/<id>/`:
//!
//! | device topic | internal topic |
//! |---|---|
//! | `fg/<id>/cmd/json` (downlink) | `/tenants/<id>/down/cmd/json` |
//!
//! The front checks every topic against the *authenticated* device id; nothing reaches the
//! writer or the broker without passing here. The gateway's dispatch connection subscribes to
//! [`DOWNLINK_FILTER`], and the dispatcher hands a downlink message only to the session of the
//! device its topic names.

use fleetgate_protocol::topic::{self, JSON_SUFFIX};
use fleetgate_protocol::{Channel, Downlink, Encoding, Topic, TopicError, Uplink};

/// The subscription through which the gateway's dispatcher receives every message for devices.
pub const DOWNLINK_FILTER: &str = "/tenants/+/down/#";

const PREFIX: &str = "/tenants/";

/// Why a device's topic or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Not a fleetgate topic at all.
    BadTopic(TopicError),
    /// A fleetgate topic, but another device's or the wrong direction.
    NotPermitted,
}

/// Checks a topic `device` publishes to and returns its channel and encoding.
pub fn uplink(device: &str, topic: &str) -> Result<(Uplink, Encoding), Denied> {
    let t = Topic::parse(topic).map_err(Denied::BadTopic)?;
    match t.channel {
        Channel::Up(channel) if t.device == device => Ok((channel, t.encoding)),
        _ => Err(Denied::NotPermitted),
    }
}

/// A subscription a device may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub channel: Downlink,
    pub encoding: Encoding,
    /// The broker filter for it.
    pub internal: String,
}

/// Checks a subscription filter of `device`. Only the device's own downlink topics are
/// allowed, exactly (no wildcards): a device has nothing else to read.
pub fn subscribe(device: &str, filter: &str) -> Result<Subscription, Denied> {
    let t = Topic::parse(filter).map_err(Denied::BadTopic)?;
    match t.channel {
        Channel::Down(channel) if t.device == device => Ok(Subscription {
            channel,
            encoding: t.encoding,
            internal: internal(device, "down", t.channel, t.encoding),
        }),
        _ => Err(Denied::NotPermitted),
    }
}

/// The internal topic the gateway publishes `channel` for `device` to.
pub fn downlink(device: &str, channel: Downlink, encoding: Encoding) -> String {
    internal(device, "down", Channel::Down(channel), encoding)
}

fn internal(device: &str, direction: &str, channel: Channel, encoding: Encoding) -> String {
    let mut s = format!("{PREFIX}{device}/{direction}/{}", channel.name());
    if encoding == Encoding::Json {
        s.push('/');
        s.push_str(JSON_SUFFIX);
    }
    s
}

/// Maps an internal downlink topic back to the topic `device` subscribed to. `None` when the
/// topic is not one of `device`'s downlink topics (which the broker should never deliver).
pub fn to_device(device: &str, internal_topic: &str) -> Option<String> {
    let rest = internal_topic.strip_prefix(PREFIX)?;
    let rest = rest.strip_prefix(device)?.strip_prefix("/down/")?;
    let device_topic = format!("{}/{device}/{rest}", topic::ROOT);
    match Topic::parse(&device_topic) {
        Ok(Topic {
            channel: Channel::Down(_),
            ..
        }) => Some(device_topic),
        _ => None,
    }
}

/// Parses an internal downlink topic into the device, channel and encoding it is for. Only the
/// gateway publishes these, so `None` means a bug, not bad input.
pub fn downlink_of(internal_topic: &str) -> Option<(&str, Downlink, Encoding)> {
    let rest = internal_topic.strip_prefix(PREFIX)?;
    let (device, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("down/")?;
    let (channel, encoding) = match rest.split_once('/') {
        None => (rest, Encoding::Postcard),
        Some((c, JSON_SUFFIX)) => (c, Encoding::Json),
        Some(_) => return None,
    };
    let channel = Downlink::ALL.into_iter().find(|c| c.name() == channel)?;
    fleetgate_protocol::id::validate(device).ok()?;
    Some((device, channel, encoding))
}

#[cfg(test)]
mod tests;
