//! The writer's side of updates: starting transfers, feeding the update engine, and turning its
//! actions into stored records, offers (through the broker) and chunks (straight to the
//! device's session).

use std::collections::HashMap;
use std::sync::Arc;

use fleetgate_protocol::manifest::chunk_leaves;
use fleetgate_protocol::{
    Action, ArtifactKind, Command, Downlink, Encoding, UpdateOffer, UpdateReport, encode, merkle,
};

use super::uplink::Handled;
use super::{ControlError, Effects, Writer};
use crate::bus::{Direct, Refusal};
use crate::clock::now_ms;
use crate::metrics::Reject;
use crate::model::{ArtifactRecord, ReleaseRecord, Stamp, TransferRecord, TransferState};
use crate::storage::{self, Tables, schema};
use crate::updates::{self, Event};

/// What to install where.
#[derive(Debug, Clone)]
pub struct UpdateRequest {
    pub kind: ArtifactKind,
    pub name: String,
    /// A version, or an alias such as `production`.
    pub version: String,
    /// Devices to update; `None`: every enrolled device.
    pub devices: Option<Vec<String>>,
    /// Offer even to devices that run the same or a newer release (they will refuse it: useful
    /// to check that they do).
    pub allow_downgrade: bool,
}

/// What [`Writer::start_updates`] did for each device.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdatePlan {
    pub version: semver::Version,
    pub release: u64,
    pub started: Vec<(String, u64)>,
    pub skipped: Vec<(String, String)>,
}

/// An artifact ready to be sent: the signed manifest, the bytes and every chunk's proof.
#[derive(Debug)]
pub(super) struct Prepared {
    signed: fleetgate_protocol::Signed,
    chunk_size: u64,
    data: Vec<u8>,
    proofs: Vec<Vec<merkle::Hash>>,
}

/// Chunks to send once the batch that decided them is committed.
#[derive(Debug)]
pub(super) struct ChunkSend {
    device: String,
    encoding: Encoding,
    transfer: u64,
    prepared: Arc<Prepared>,
    from: u64,
    to: u64,
}

/// Why a device cannot take a release now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Unfit {
    #[error("{0}")]
    Skip(String),
    #[error("update in progress (transfer {0})")]
    Busy(u64),
    #[error("already runs release {0}")]
    Runs(u64),
}

/// What a device runs of an artifact, by its hello.
pub(super) fn running(
    hello: &fleetgate_protocol::Hello,
    kind: ArtifactKind,
    name: &str,
) -> Option<fleetgate_protocol::Installed> {
    match kind {
        ArtifactKind::Firmware => (hello.firmware.name == name).then(|| hello.firmware.clone()),
        ArtifactKind::Model => hello.models.iter().find(|m| m.name == name).cloned(),
    }
}

/// Which artifact a transfer sends: the same bytes can be registered for several classes or
/// versions, each with its own signed manifest (and chunk size).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ArtifactKey {
    sha256: [u8; 32],
    kind: ArtifactKind,
    name: String,
    release: u64,
    class: String,
}

/// Artifacts of transfers in progress, loaded once.
pub(super) type PreparedCache = HashMap<ArtifactKey, Arc<Prepared>>;

impl Writer {
    /// A registered release by version or alias, or the operator's NotFound.
    pub(super) fn release_of(
        &self,
        kind: ArtifactKind,
        name: &str,
        version: &str,
    ) -> storage::Result<Result<ReleaseRecord, ControlError>> {
        Ok(self
            .store
            .release(kind, name, version)?
            .ok_or_else(|| ControlError::NotFound(format!("{} {name} {version}", kind.name()))))
    }

    pub(super) fn start_updates(
        &mut self,
        t: &mut Tables<'_>,
        req: UpdateRequest,
        by: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<UpdatePlan, ControlError>> {
        let release = match self.release_of(req.kind, &req.name, &req.version)? {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut devices = match req.devices {
            Some(list) => list,
            None => self.devices.keys().cloned().collect(),
        };
        devices.sort_unstable();
        devices.dedup();
        let mut plan = UpdatePlan {
            version: release.version.clone(),
            release: release.release,
            started: Vec::new(),
            skipped: Vec::new(),
        };
        for device in devices {
            match self.fit(&device, &release, req.kind, now, req.allow_downgrade) {
                Ok(artifact) => {
                    let record = self.new_transfer(&device, &release, &artifact, by, now);
                    let id = record.id;
                    self.update_event(t, Event::Start(record), now, fx)?;
                    plan.started.push((device, id));
                }
                Err(unfit) => plan.skipped.push((device, unfit.to_string())),
            }
        }
        t.set_meta(schema::META_NEXT_TRANSFER_ID, self.next_transfer_id)?;
        Ok(Ok(plan))
    }

    /// Whether `device` can take `release` now, and which of its artifacts.
    pub(super) fn fit(
        &self,
        device: &str,
        release: &ReleaseRecord,
        kind: ArtifactKind,
        now: u64,
        allow_downgrade: bool,
    ) -> Result<ArtifactRecord, Unfit> {
        let state = self
            .devices
            .get(device)
            .ok_or_else(|| Unfit::Skip("not enrolled".into()))?;
        if state.device.revoked() {
            return Err(Unfit::Skip("revoked".into()));
        }
        let hello = state.device.hello.as_ref().ok_or_else(|| {
            Unfit::Skip("hardware unknown: the device has not said hello yet".into())
        })?;
        let Some(artifact) = release.artifact_for(&hello.hardware) else {
            let hw = &hello.hardware;
            return Err(Unfit::Skip(format!(
                "no artifact for class {} ({}, {} bytes RAM)",
                hw.class, hw.arch, hw.ram_bytes
            )));
        };
        if now >= artifact.manifest.expires_ms {
            return Err(Unfit::Skip("the release's manifest has expired".into()));
        }
        if let Some(busy) = self.updates.transfer_of(device) {
            return Err(Unfit::Busy(busy.id));
        }
        if let Some(r) = running(hello, kind, &release.name)
            .map(|i| i.release)
            .filter(|r| *r >= release.release && !allow_downgrade)
        {
            return Err(Unfit::Runs(r));
        }
        Ok(artifact.clone())
    }

    /// A queued transfer of `artifact` to `device`, with a new id.
    pub(super) fn new_transfer(
        &mut self,
        device: &str,
        release: &ReleaseRecord,
        artifact: &ArtifactRecord,
        by: &str,
        now: u64,
    ) -> TransferRecord {
        let id = self.next_transfer_id;
        self.next_transfer_id += 1;
        TransferRecord {
            id,
            device: device.to_owned(),
            kind: release.kind,
            name: release.name.clone(),
            version: release.version.clone(),
            release: release.release,
            sha256: artifact.sha256,
            size: artifact.size,
            chunks: artifact.manifest.chunk_count(),
            state: TransferState::Queued,
            next_chunk: 0,
            chunks_sent: 0,
            chunks_resent: 0,
            offers: 0,
            created: Stamp {
                at_ms: now,
                by: by.to_owned(),
            },
            updated_ms: now,
            finished_ms: None,
        }
    }

    pub(super) fn cancel_update(
        &mut self,
        t: &mut Tables<'_>,
        id: u64,
        by: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<TransferRecord, ControlError>> {
        if self.updates.transfer(id).is_none() {
            return Ok(Err(match self.store.transfer(id)? {
                Some(t) => {
                    ControlError::Conflict(format!("transfer {id} is already {}", t.state.name()))
                }
                None => ControlError::NotFound(format!("transfer {id}")),
            }));
        }
        let mut record = self.updates.transfer(id).cloned();
        self.update_event(
            t,
            Event::Cancel {
                id,
                by: by.to_owned(),
            },
            now,
            fx,
        )?;
        if let Some(r) = record.as_mut() {
            r.state = TransferState::Cancelled { by: by.to_owned() };
            r.finished_ms = Some(now);
        }
        Ok(record.ok_or_else(|| ControlError::NotFound(format!("transfer {id}"))))
    }

    /// An update report from a device.
    pub(super) fn report(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        report: UpdateReport,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Handled> {
        tracing::debug!(device, transfer = report.transfer, state = ?report.state, "update report");
        if let Some(handled) = self.validation_report(t, device, &report, now, fx)? {
            return Ok(handled);
        }
        let event = Event::Report {
            device: device.to_owned(),
            report,
        };
        match self.updates.on_event(event, now) {
            Ok(actions) => {
                self.run_update_actions(t, actions, fx)?;
                Ok(Handled::Stored)
            }
            Err(e) => {
                self.reject(device, Reject::UnknownTransfer, &e);
                Ok(Handled::Refused(Refusal::Unknown))
            }
        }
    }

    /// Feeds one event to the engine and carries out what it decides.
    pub(super) fn update_event(
        &mut self,
        t: &mut Tables<'_>,
        event: Event,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        match self.updates.on_event(event, now) {
            Ok(actions) => self.run_update_actions(t, actions, fx),
            Err(e) => {
                tracing::warn!(error = %e, "update event refused");
                Ok(())
            }
        }
    }

    fn run_update_actions(
        &mut self,
        t: &mut Tables<'_>,
        actions: Vec<updates::Action>,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        for action in actions {
            match action {
                updates::Action::Save(record) => {
                    t.put_transfer(&record)?;
                    if record.state.is_final() {
                        let now = record.updated_ms;
                        self.validation_transfer_finished(t, &record, fx)?;
                        self.rollouts_transfer_finished(t, &record, now, fx)?;
                    }
                }
                updates::Action::Offer { id } => {
                    let Some(record) = self.updates.transfer(id).cloned() else {
                        continue;
                    };
                    let Some(prepared) = self.prepared(&record) else {
                        let now = now_ms();
                        let by = "gateway: the artifact is unreadable or damaged".to_owned();
                        self.update_event(t, Event::Cancel { id, by }, now, fx)?;
                        continue;
                    };
                    let encoding = self
                        .devices
                        .get(&record.device)
                        .map_or(Encoding::Postcard, |s| s.device.encoding);
                    if let Some(action) = self.validate_offer(&record, &prepared.signed) {
                        tracing::debug!(transfer = id, device = %record.device, offer = record.offers, "validation offered");
                        self.push_validate(record.device, encoding, action, fx);
                        continue;
                    }
                    let command = Command {
                        id: self.next_command_id,
                        action: Action::Update(UpdateOffer {
                            transfer: id,
                            manifest: prepared.signed.clone(),
                        }),
                    };
                    self.next_command_id += 1;
                    tracing::debug!(transfer = id, device = %record.device, offer = record.offers, "update offered");
                    match encode(&command, encoding) {
                        Ok(payload) => {
                            fx.downlinks
                                .push((record.device, Downlink::Command, encoding, payload))
                        }
                        Err(e) => {
                            tracing::error!(transfer = id, error = %e, "cannot encode an update offer")
                        }
                    }
                }
                updates::Action::Send { id, from, to } => {
                    tracing::trace!(transfer = id, from, to, "update chunks");
                    let Some(record) = self.updates.transfer(id).cloned() else {
                        continue;
                    };
                    let Some(prepared) = self.prepared(&record) else {
                        continue;
                    };
                    let encoding = self
                        .devices
                        .get(&record.device)
                        .map_or(Encoding::Postcard, |s| s.device.encoding);
                    fx.chunks.push(ChunkSend {
                        device: record.device,
                        encoding,
                        transfer: id,
                        prepared,
                        from,
                        to,
                    });
                }
            }
        }
        Ok(())
    }

    /// Which artifact `record` sends: the one of its release, with its bytes, that fits the
    /// device's hardware (one version has one artifact per class).
    fn artifact_key(&self, record: &TransferRecord) -> Option<ArtifactKey> {
        let hello = self.devices.get(&record.device)?.device.hello.as_ref()?;
        Some(ArtifactKey {
            sha256: record.sha256,
            kind: record.kind,
            name: record.name.clone(),
            release: record.release,
            class: hello.hardware.class.clone(),
        })
    }

    /// The artifact of a transfer, loaded and checked against its hash once.
    fn prepared(&mut self, record: &TransferRecord) -> Option<Arc<Prepared>> {
        let key = self.artifact_key(record)?;
        if let Some(p) = self.prepared.get(&key) {
            return Some(p.clone());
        }
        let hardware = self
            .devices
            .get(&record.device)?
            .device
            .hello
            .as_ref()?
            .hardware
            .clone();
        let release = self
            .store
            .release(record.kind, &record.name, &record.version.to_string())
            .ok()??;
        let artifact = release
            .artifacts
            .into_iter()
            .find(|a| a.sha256 == record.sha256 && a.compat.check(&hardware).is_ok())?;
        let data = match self.artifacts.read_verified(&record.sha256) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(transfer = record.id, error = %e, "cannot read the artifact");
                return None;
            }
        };
        let proofs = merkle::all_proofs(&chunk_leaves(&data, artifact.manifest.chunk_size));
        let p = Arc::new(Prepared {
            signed: artifact.signed,
            chunk_size: u64::from(artifact.manifest.chunk_size),
            data,
            proofs,
        });
        self.prepared.insert(key, p.clone());
        Some(p)
    }

    /// Forgets artifacts no transfer in progress needs.
    pub(super) fn trim_prepared(&mut self) {
        let needed: Vec<ArtifactKey> = self
            .updates
            .live()
            .filter_map(|r| self.artifact_key(r))
            .collect();
        self.prepared.retain(|key, _| needed.contains(key));
    }

    /// Encodes and hands chunks to the devices' sessions (after the commit).
    pub(super) fn send_chunks(&self, sends: Vec<ChunkSend>) {
        for s in sends {
            for index in s.from..s.to {
                let p = &s.prepared;
                let start = (index * p.chunk_size) as usize;
                let end = (start + p.chunk_size as usize).min(p.data.len());
                // The engine asks for chunks of the transfer's manifest; one beyond it is a
                // bug, and must not take the writer down.
                let (Some(data), Some(proof)) =
                    (p.data.get(start..end), p.proofs.get(index as usize))
                else {
                    tracing::error!(
                        transfer = s.transfer,
                        index,
                        "chunk beyond the artifact; not sent"
                    );
                    continue;
                };
                let chunk = fleetgate_protocol::Chunk {
                    transfer: s.transfer,
                    index: index as u32,
                    data: data.to_vec(),
                    proof: proof.clone(),
                };
                let Ok(payload) = encode(&chunk, s.encoding) else {
                    continue;
                };
                let msg = Direct {
                    channel: Downlink::Chunk,
                    encoding: s.encoding,
                    payload: payload.into(),
                    qos: 0,
                };
                match self.sessions.send_direct(&s.device, msg) {
                    Ok(()) => self.metrics.chunks_sent.inc(),
                    Err(_) => self.metrics.direct_dropped.inc(),
                };
            }
        }
    }
}
