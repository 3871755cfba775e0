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
        // Most records fit; postcard would otherwise grow the vector a few bytes at a time.
        let mut out = Vec::with_capacity(128);
        out.push(Self::VERSION);
        // Serializing our own plain structs into a Vec cannot fail.
        postcard::to_io(self, &mut out).expect("postcard encoding of a record");
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let (&version, body) = bytes.split_first().ok_or(RecordError::Empty)?;
        let decoded = if version == Self::VERSION {
            postcard::from_bytes(body)
        } else {
            Self::decode_older(version, body).ok_or(RecordError::UnknownVersion {
                kind: Self::KIND,
                version,
            })?
        };
        decoded.map_err(|source| RecordError::Decode {
            kind: Self::KIND,
            source,
        })
    }

    /// Decodes a record an older version of this code wrote; `None` for versions it never
    /// wrote.
    fn decode_older(_version: u8, _body: &[u8]) -> Option<Result<Self, postcard::Error>> {
        None
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

impl Record for Device {
    const KIND: &'static str = "device";
    /// 2: the sequence tracker follows two boots with a 256-number window.
    const VERSION: u8 = 2;

    fn decode_older(version: u8, body: &[u8]) -> Option<Result<Self, postcard::Error>> {
        (version == 1).then(|| postcard::from_bytes::<v1::Device>(body).map(Device::from))
    }
}

records! {
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
    crate::validation::ReleaseRequirements => "release requirements", version 1;
    crate::validation::ValidationRecord => "validation result", version 1;
    crate::validation::ValidationRun => "validation run", version 1;
    crate::rollouts::validate::ValidateStage => "rollout validate stage", version 1;
    crate::uplink::event::Entry => "outbox entry", version 1;
    crate::uplink::down::RequestRecord => "site request", version 1;
}

/// Encodings older versions of the gateway wrote.
mod v1 {
    use std::collections::BTreeMap;

    use fleetgate_protocol::{Encoding, HardwareMetrics, Hello};
    use serde::Deserialize;

    use crate::model::{DeviceCounters, Presence};
    use crate::seq::SeqTracker;

    /// A device record before version 2: the sequence tracker of one boot, 64 numbers wide.
    #[derive(Deserialize)]
    pub(super) struct Device {
        id: String,
        enrolled_at_ms: u64,
        credential_hash: Option<[u8; 32]>,
        labels: BTreeMap<String, String>,
        presence: Presence,
        encoding: Encoding,
        hello: Option<Hello>,
        last_hw: Option<HardwareMetrics>,
        counters: DeviceCounters,
        seq_boot: Option<u32>,
        seq_next: u32,
        seq_seen: u64,
        telemetry_rows: u64,
        log_rows: u64,
    }

    impl From<Device> for crate::model::Device {
        fn from(d: Device) -> Self {
            crate::model::Device {
                id: d.id,
                enrolled_at_ms: d.enrolled_at_ms,
                credential_hash: d.credential_hash,
                labels: d.labels,
                presence: d.presence,
                encoding: d.encoding,
                hello: d.hello,
                last_hw: d.last_hw,
                counters: d.counters,
                seq: SeqTracker::from_v1(d.seq_boot, d.seq_next, d.seq_seen),
                telemetry_rows: d.telemetry_rows,
                log_rows: d.log_rows,
            }
        }
    }
}
