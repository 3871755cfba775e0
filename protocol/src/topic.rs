//! The MQTT topic scheme.
//!
//! Every topic is `fg/<device id>/<channel>`, optionally followed by `/json`:
//!
//! | direction | channel | message |
//! |---|---|---|
//! | device -> gateway | `hello` | [`Hello`](crate::Hello), after every connect |
//! | device -> gateway | `telemetry` | [`Telemetry`](crate::Telemetry) |
//! | device -> gateway | `alert` | [`Alert`](crate::Alert) |
//! | device -> gateway | `log` | [`LogLine`](crate::LogLine) |
//! | device -> gateway | `ack` | [`CommandAck`](crate::CommandAck) |
//! | device -> gateway | `report` | [`UpdateReport`](crate::UpdateReport) |
//! | gateway -> device | `cmd` | [`Command`](crate::Command), update offers included |
//! | gateway -> device | `chunk` | [`Chunk`](crate::Chunk) of an update |
//!
//! The last level says the encoding: a topic ending in `/json` carries JSON, any other carries
//! postcard (the same convention AWS IoT uses for its `/json` and `/cbor` stream topics). A
//! device only ever publishes to its own uplink topics and subscribes to its own downlink ones.

use alloc::string::String;
use core::fmt;

use crate::codec::Encoding;
use crate::id::{self, IdError};

/// First level of every fleetgate topic.
pub const ROOT: &str = "fg";

/// Last level of a topic whose payload is JSON.
pub const JSON_SUFFIX: &str = "json";

/// Longest topic this scheme produces: root, id, channel, suffix and separators.
pub const MAX_TOPIC_LEN: usize = ROOT.len() + 1 + id::MAX_LEN + 1 + 16 + 1 + JSON_SUFFIX.len();

/// Channels a device publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Uplink {
    Hello,
    Telemetry,
    Alert,
    Log,
    Ack,
    Report,
}

/// Channels the gateway publishes to, one device at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Downlink {
    Command,
    Chunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Up(Uplink),
    Down(Downlink),
}

impl Uplink {
    pub const ALL: [Uplink; 6] = [
        Uplink::Hello,
        Uplink::Telemetry,
        Uplink::Alert,
        Uplink::Log,
        Uplink::Ack,
        Uplink::Report,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Uplink::Hello => "hello",
            Uplink::Telemetry => "telemetry",
            Uplink::Alert => "alert",
            Uplink::Log => "log",
            Uplink::Ack => "ack",
            Uplink::Report => "report",
        }
    }
}

impl Downlink {
    pub const ALL: [Downlink; 2] = [Downlink::Command, Downlink::Chunk];

    pub const fn name(self) -> &'static str {
        match self {
            Downlink::Command => "cmd",
            Downlink::Chunk => "chunk",
        }
    }
}

impl Channel {
    pub const fn name(self) -> &'static str {
        match self {
            Channel::Up(u) => u.name(),
            Channel::Down(d) => d.name(),
        }
    }

    fn from_name(name: &str) -> Option<Channel> {
        Uplink::ALL
            .into_iter()
            .map(Channel::Up)
            .chain(Downlink::ALL.into_iter().map(Channel::Down))
            .find(|c| c.name() == name)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed fleetgate topic. Borrows the device id from the topic string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub device: &'a str,
    pub channel: Channel,
    pub encoding: Encoding,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic does not start with `{ROOT}/`")]
    WrongRoot,
    #[error("topic has no channel level")]
    MissingChannel,
    #[error("bad device id in topic: {0}")]
    BadDevice(IdError),
    #[error("unknown channel")]
    UnknownChannel,
    #[error("last level must be `{JSON_SUFFIX}` or absent")]
    BadEncoding,
    #[error("topic has levels after the encoding")]
    TooManyLevels,
}

impl<'a> Topic<'a> {
    /// Parses a concrete topic (no wildcards: `+` and `#` fail the device id or channel check).
    pub fn parse(topic: &'a str) -> Result<Topic<'a>, TopicError> {
        let mut levels = topic.split('/');
        if levels.next() != Some(ROOT) {
            return Err(TopicError::WrongRoot);
        }
        let device = levels.next().ok_or(TopicError::MissingChannel)?;
        id::validate(device).map_err(TopicError::BadDevice)?;
        let channel = levels.next().ok_or(TopicError::MissingChannel)?;
        let channel = Channel::from_name(channel).ok_or(TopicError::UnknownChannel)?;
        let encoding = match levels.next() {
            None => Encoding::Postcard,
            Some(JSON_SUFFIX) => Encoding::Json,
            Some(_) => return Err(TopicError::BadEncoding),
        };
        if levels.next().is_some() {
            return Err(TopicError::TooManyLevels);
        }
        Ok(Topic {
            device,
            channel,
            encoding,
        })
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ROOT}/{}/{}", self.device, self.channel.name())?;
        if self.encoding == Encoding::Json {
            write!(f, "/{JSON_SUFFIX}")?;
        }
        Ok(())
    }
}

/// Formats the topic for `device`'s `channel` in `encoding`.
pub fn format(device: &str, channel: Channel, encoding: Encoding) -> String {
    use core::fmt::Write;
    let mut s = String::with_capacity(MAX_TOPIC_LEN);
    let topic = Topic {
        device,
        channel,
        encoding,
    };
    // Writing to a String cannot fail.
    let _ = write!(s, "{topic}");
    s
}

#[cfg(test)]
mod tests;
