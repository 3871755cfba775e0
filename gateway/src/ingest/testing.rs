//! Test support for the writer: sessions that record what the writer hands them, signed
//! release bundles, and hellos. Shared by the writer's unit tests and its simulation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ed25519_dalek::SigningKey;
use fleetgate_protocol::manifest::{ManifestSpec, RuntimeReq};
use fleetgate_protocol::{ArtifactKind, Compat, HardwareProfile, Hello, Installed};

use crate::bus::{Direct, DirectError, Kick, Links};
use crate::registry::bundle::BundleFile;

/// Sessions as the writer sees them: every device is connected, and what it is sent is
/// recorded in order.
#[derive(Debug, Default)]
pub(crate) struct RecordingLinks {
    pub sent: Mutex<Vec<(String, Direct)>>,
    pub kicked: Mutex<Vec<(String, Kick)>>,
}

impl RecordingLinks {
    /// Takes what was sent so far.
    pub fn take(&self) -> Vec<(String, Direct)> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

impl Links for RecordingLinks {
    fn send_direct(&self, device: &str, msg: Direct) -> Result<(), DirectError> {
        self.sent.lock().unwrap().push((device.to_owned(), msg));
        Ok(())
    }

    fn kick(&self, device: &str, why: Kick) -> bool {
        self.kicked.lock().unwrap().push((device.to_owned(), why));
        true
    }
}

/// The release key of the tests.
pub(crate) fn release_key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

/// A hello of a device of `class` running `model` at `release` (and firmware 1.0.0).
pub(crate) fn hello(class: &str, model: (&str, &str, u64)) -> Hello {
    Hello {
        firmware: Installed {
            name: "fw".into(),
            version: "1.0.0".parse().unwrap(),
            release: 1,
        },
        models: vec![Installed {
            name: model.0.into(),
            version: model.1.parse().unwrap(),
            release: model.2,
        }],
        hardware: HardwareProfile {
            arch: "armv7em".into(),
            class: class.into(),
            ram_bytes: 1 << 20,
            flash_bytes: 4 << 20,
            accelerator: None,
            runtime: Some(Installed {
                name: "tflm".into(),
                version: "2.14.0".parse().unwrap(),
                release: 0,
            }),
        },
        boot: 1,
        telemetry_interval_ms: 1000,
    }
}

/// A bundle of model `name` `version` (counter `release`) for `classes`, holding `data` cut
/// into chunks of `chunk_size`, valid from `now_ms` for a day.
pub(crate) fn model_bundle(
    name: &str,
    version: &str,
    release: u64,
    classes: &[&str],
    data: Vec<u8>,
    chunk_size: u32,
    now_ms: u64,
) -> Vec<u8> {
    let spec = ManifestSpec {
        kind: ArtifactKind::Model,
        name: name.into(),
        version: version.parse().unwrap(),
        release,
        compat: Compat {
            classes: classes.iter().map(|c| c.to_string()).collect(),
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: "2.0.0".parse().unwrap(),
            }),
            ..Compat::default()
        },
        chunk_size,
        created_ms: now_ms,
        expires_ms: now_ms + 86_400_000,
    };
    BundleFile::sign(data, spec, &[release_key()], BTreeMap::new(), vec![]).encode()
}

/// The registry config trusting [`release_key`].
pub(crate) fn registry_config() -> fleetgate_config::Registry {
    fleetgate_config::Registry {
        trusted_keys: vec![release_key().verifying_key().to_bytes()],
        threshold: 1,
        max_bundle_bytes: 16 << 20,
        max_chunk_bytes: 64 << 10,
    }
}
