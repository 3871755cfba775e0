//! Versioned value encodings: one version byte, then postcard. A reader accepts every version
//! it knows, so a database written by an older gateway still opens.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::drift::engine::Evaluation;
use crate::model::{
    AlertRecord, AuditRecord, CommandRecord, Device, LogRow, ReleaseRecord, TelemetryRow,
    TokenRecord, TransferRecord,
};
use crate::rollouts::model::{AuditEntry, RolloutDevice, RolloutRecord};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("{kind} record has unknown version {version}")]
    UnknownVersion { kind: &'static str, version: u8 },
    #[error("{kind} record does not decode: {source}")]
    Decode {
        kind: &'static str,
        source: postcard::Error,
    },
}

/// A value stored in a table.
pub trait Record: Serialize + DeserializeOwned {
    const KIND: &'static str;
    /// The version this code writes.
    const VERSION: u8;

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![Self::VERSION];
        // Serializing our own plain structs into a Vec cannot fail.
        postcard::to_io(self, &mut out).expect("postcard encoding of a record");
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let (&version, body) = bytes.split_first().ok_or(RecordError::Empty)?;
        if version != Self::VERSION {
            return Err(RecordError::UnknownVersion {
                kind: Self::KIND,
                version,
            });
        }
        postcard::from_bytes(body).map_err(|source| RecordError::Decode {
            kind: Self::KIND,
            source,
        })
    }
}

macro_rules! records {
    ($($t:ty => $kind:literal, version $version:literal;)*) => {$(
        impl Record for $t {
            const KIND: &'static str = $kind;
            const VERSION: u8 = $version;
        }
    )*};
}

records! {
    Device => "device", version 1;
    TelemetryRow => "telemetry", version 1;
    LogRow => "log", version 1;
    AlertRecord => "alert", version 1;
    CommandRecord => "command", version 1;
    ReleaseRecord => "release", version 1;
    TransferRecord => "transfer", version 1;
    Evaluation => "drift window", version 1;
    RolloutRecord => "rollout", version 1;
    RolloutDevice => "rollout device", version 1;
    AuditEntry => "rollout audit entry", version 1;
    TokenRecord => "token", version 1;
    AuditRecord => "audit entry", version 1;
}
