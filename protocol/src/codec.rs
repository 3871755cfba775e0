//! The two encodings of every message: postcard (canonical, compact, for MCUs) and JSON (for
//! off-the-shelf clients such as `mosquitto_pub`, Arduino or paho).
//!
//! The topic says which one a payload uses (see [`crate::topic`]). A postcard payload is one
//! format byte, [`POSTCARD_FORMAT`], followed by the postcard encoding of the message; a JSON
//! payload is one JSON object. Decoding refuses trailing bytes and then checks the message's
//! semantic rules ([`Validate`]), so what `decode` returns is safe to store.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::limits::{Invalid, Validate};

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Postcard,
    Json,
}

impl Encoding {
    pub const fn name(self) -> &'static str {
        match self {
            Encoding::Postcard => "postcard",
            Encoding::Json => "json",
        }
    }
}

/// First byte of every postcard payload. A future incompatible layout gets a new value, and
/// decoders keep accepting the old one.
pub const POSTCARD_FORMAT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("unknown postcard format byte {0:#04x} (expected {POSTCARD_FORMAT:#04x})")]
    UnknownFormat(u8),
    #[error("postcard: {0}")]
    Postcard(postcard::Error),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("json: {0}")]
    Json(String),
    #[error("invalid message: {0}")]
    Invalid(Invalid),
}

impl DecodeError {
    /// A short stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Invalid(_) => "invalid",
            _ => "undecodable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("postcard: {0}")]
    Postcard(postcard::Error),
    #[error("json: {0}")]
    Json(String),
}

/// Encodes `msg` for a topic of the given encoding.
pub fn encode<T: Serialize>(msg: &T, encoding: Encoding) -> Result<Vec<u8>, EncodeError> {
    match encoding {
        Encoding::Postcard => {
            let mut out = Vec::with_capacity(64);
            out.push(POSTCARD_FORMAT);
            postcard::to_extend(msg, out).map_err(EncodeError::Postcard)
        }
        Encoding::Json => serde_json::to_vec(msg).map_err(|e| EncodeError::Json(e.to_string())),
    }
}

/// Decodes and validates one message.
pub fn decode<T: DeserializeOwned + Validate>(
    bytes: &[u8],
    encoding: Encoding,
) -> Result<T, DecodeError> {
    let msg: T = match encoding {
        Encoding::Postcard => {
            let (&format, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
            if format != POSTCARD_FORMAT {
                return Err(DecodeError::UnknownFormat(format));
            }
            let (msg, rest) = postcard::take_from_bytes(body).map_err(DecodeError::Postcard)?;
            if !rest.is_empty() {
                return Err(DecodeError::TrailingBytes(rest.len()));
            }
            msg
        }
        Encoding::Json => {
            match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                None => return Err(DecodeError::Empty),
                Some(b'{') => {}
                // serde's derive takes a struct from an array too (`[1, 2, 3]` is a telemetry
                // message with boot 1, seq 2, time 3): only an object is a message.
                Some(_) => return Err(DecodeError::Json("a message must be a JSON object".into())),
            }
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?
        }
    };
    msg.validate().map_err(DecodeError::Invalid)?;
    Ok(msg)
}
