//! What a device may publish and subscribe to, and how its topics map onto the embedded
//! broker's internal topics. Pure string functions; no broker types.
//!
//! Devices see `fg/<id>/<channel>[/json]`. Inside the broker every device topic lives under the
//! device's tenant prefix `/tenants/<id>/`, with uplink and downlink channels on separate levels:
//!
//! | device topic | internal topic |
//! |---|---|
//! | `fg/<id>/telemetry` (uplink) | `/tenants/<id>/up/telemetry` |
//! | `fg/<id>/cmd/json` (downlink) | `/tenants/<id>/down/cmd/json` |
//!
//! The front checks every topic against the *authenticated* device id before it rewrites it;
//! nothing reaches the broker without passing here. The gateway's ingest connection subscribes
//! to [`INGEST_FILTER`], its dispatch connection to [`DOWNLINK_FILTER`], and the dispatcher
//! hands a downlink message only to the session of the device its topic names.

use fleetgate_protocol::topic::{self, JSON_SUFFIX};
use fleetgate_protocol::{Channel, Downlink, Encoding, Topic, TopicError, Uplink};

/// The one subscription through which the gateway receives everything devices publish.
pub const INGEST_FILTER: &str = "/tenants/+/up/#";

/// The subscription through which the gateway's dispatcher receives every message for devices.
pub const DOWNLINK_FILTER: &str = "/tenants/+/down/#";

/// Tenant name of the shutdown flush marker; not a valid device id (must start with a letter
/// or digit), so no device can publish it.
pub const FLUSH_TENANT: &str = "_flush";

const PREFIX: &str = "/tenants/";

/// Why a device's topic or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Not a fleetgate topic at all.
    BadTopic(TopicError),
    /// A fleetgate topic, but another device's or the wrong direction.
    NotPermitted,
}

/// Checks a topic `device` publishes to and returns its internal topic.
pub fn uplink(device: &str, topic: &str) -> Result<(Uplink, String), Denied> {
    let t = Topic::parse(topic).map_err(Denied::BadTopic)?;
    match t.channel {
        Channel::Up(channel) if t.device == device => {
            Ok((channel, internal(device, "up", t.channel, t.encoding)))
        }
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

/// What arrived on the ingest subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested<'a> {
    Uplink {
        device: &'a str,
        channel: Uplink,
        encoding: Encoding,
    },
    /// The gateway's own shutdown marker: everything published before it has been delivered.
    FlushMarker,
}

/// Parses an internal uplink topic. Only the front writes these, so a failure is a bug, not
/// bad device input.
pub fn ingested(internal_topic: &str) -> Option<Ingested<'_>> {
    let rest = internal_topic.strip_prefix(PREFIX)?;
    let (tenant, rest) = rest.split_once('/')?;
    if tenant == FLUSH_TENANT {
        return Some(Ingested::FlushMarker);
    }
    let rest = rest.strip_prefix("up/")?;
    let (channel, encoding) = match rest.split_once('/') {
        None => (rest, Encoding::Postcard),
        Some((c, JSON_SUFFIX)) => (c, Encoding::Json),
        Some(_) => return None,
    };
    let channel = Uplink::ALL.into_iter().find(|c| c.name() == channel)?;
    fleetgate_protocol::id::validate(tenant).ok()?;
    Some(Ingested::Uplink {
        device: tenant,
        channel,
        encoding,
    })
}

/// The topic of the shutdown flush marker.
pub fn flush_marker_topic() -> String {
    format!("{PREFIX}{FLUSH_TENANT}/up/marker")
}

#[cfg(test)]
mod tests;
