//! Device identity: the one string that names a device in topics, credentials and storage.

use alloc::string::String;
use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest device id, in bytes. Short enough for an MQTT client id on any broker and for a
/// topic level on an MCU.
pub const MAX_LEN: usize = 64;

/// A validated device id: 1 to [`MAX_LEN`] ASCII characters from `A-Z a-z 0-9 - _ . :`,
/// starting with a letter or digit.
///
/// The character set keeps an id safe as an MQTT client id (no `/ + # $`), as one topic level,
/// as a URL path segment and as a file name, so no layer needs to escape it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("device id is empty")]
    Empty,
    #[error("device id is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("device id must start with a letter or digit")]
    BadFirst,
    #[error("device id contains {0:?}; allowed are A-Z a-z 0-9 - _ . :")]
    BadChar(char),
}

impl DeviceId {
    pub fn new(id: &str) -> Result<Self, IdError> {
        validate(id)?;
        Ok(DeviceId(String::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Checks `id` against the device id rules without allocating.
pub fn validate(id: &str) -> Result<(), IdError> {
    let first = id.chars().next().ok_or(IdError::Empty)?;
    if id.len() > MAX_LEN {
        return Err(IdError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadFirst);
    }
    match id.chars().find(|c| !is_id_char(*c)) {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl core::str::FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        DeviceId::new(s)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        validate(&s).map_err(serde::de::Error::custom)?;
        Ok(DeviceId(s))
    }
}

#[cfg(test)]
mod tests;
