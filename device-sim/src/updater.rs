//! The simulated device's update client: the real checks from `fleetgate_protocol::update`
//! and `fleetgate_protocol::rollback`, A/B slots, resumable downloads, rollbacks, and faults to
//! inject.

use std::collections::HashMap;
use std::time::Duration;

use fleetgate_protocol::update::{Accepted, DevicePolicy, Download, Failure, check_offer};
use fleetgate_protocol::{
    AckStatus, Chunk, CommandAck, GoldenSet, Installed, RollbackError, RollbackFailure, Signed,
    UpdateError, UpdateOffer, UpdateReport, UpdateState, ValidateOffer, check_rollback,
};

use crate::behaviour::{Behaviour, Regression};

/// Chunks between two progress reports (the gateway's default window is 8).
pub const REPORT_EVERY: u64 = 4;

/// Keys the device trusts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Release keys, for update manifests.
    pub keys: Vec<[u8; 32]>,
    /// Distinct release keys a manifest must be signed by.
    pub threshold: usize,
    /// The gateway's keys, for rollback directives only (one signature suffices).
    pub rollback_keys: Vec<[u8; 32]>,
}

/// Misbehaviour to simulate.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Flip a byte of this chunk every time it arrives (transport corruption).
    pub corrupt_chunk: Option<u64>,
    /// Drop the last byte of this chunk (a truncated transfer).
    pub truncate_chunk: Option<u64>,
    /// Drop the connection once, when this fraction of the chunks is stored.
    pub disconnect_at: Option<f64>,
    /// Refuse every offer (a device whose user declines).
    pub decline: bool,
    /// The device's clock is this far ahead (negative: behind).
    pub clock_skew_ms: i64,
    /// Claim this device class in hello (the real one is used to check offers).
    pub claim_class: Option<String>,
    /// The install step fails after a good download.
    pub fail_install: bool,
    /// The link drops (no DISCONNECT) every so often and stays down for a while.
    pub flap: Option<Flap>,
    /// Wait this long before each telemetry and alert publish (a slow link).
    pub slow_link: Option<Duration>,
    /// After an install the device crashes instead of rebooting cleanly: it drops the link
    /// at once (its last reports unacknowledged), reboots into the new image and comes back
    /// after this long.
    pub crash_after_update: Option<Duration>,
    /// Every Nth telemetry message is garbage bytes (it takes no sequence number).
    pub malformed_every: Option<u64>,
    /// Every Nth telemetry message is also published on another device's telemetry topic
    /// (the gateway refuses it).
    pub impersonate_every: Option<u64>,
}

/// A flapping connection: connected for `every`, then down for `down`, again and again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flap {
    pub every: Duration,
    pub down: Duration,
}

/// How one device is set up for a simulation.
#[derive(Debug, Clone, Default)]
pub struct DeviceProfile {
    pub trust: Trust,
    pub faults: Faults,
    /// Installed release of the model (default 1).
    pub model_release: Option<u64>,
    /// How the device behaves worse on one model version.
    pub regression: Option<Regression>,
    /// The device's hardware class (default: the simulator's `sim-mcu`).
    pub class: Option<String>,
    /// A bench device: what it measures when it validates a release.
    pub bench: Option<crate::bench::Bench>,
}

/// What the runner does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateEffect {
    None,
    /// Drop the connection and come back (the `disconnect_at` fault).
    Reconnect,
    /// Reboot into the new image; send `pending` after the hello.
    Reboot,
}

/// How the device answered a rollback directive.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackOutcome {
    pub ack: CommandAck,
    /// Why it refused; `None`: it reverted.
    pub refused: Option<RollbackError>,
    /// [`UpdateEffect::Reboot`] after a revert, into the restored image.
    pub effect: UpdateEffect,
}

/// Counts of what the update client saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdaterStats {
    pub chunks_stored: u64,
    /// Chunks that arrived again after they were stored (what a resume re-sent).
    pub chunks_duplicate: u64,
    pub chunks_ahead: u64,
    pub installed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub validated: u64,
}

#[derive(Debug)]
pub struct Updater {
    profile: DeviceProfile,
    downloads: HashMap<u64, Download>,
    /// Downloads that validate: the golden set and how often to run it.
    validating: HashMap<u64, (GoldenSet, u32)>,
    disconnected: bool,
    /// Sent after the next hello (the outcome of an install, reported from the new image).
    pub pending: Option<UpdateReport>,
    pub stats: UpdaterStats,
}

impl Updater {
    pub fn new(profile: DeviceProfile) -> Updater {
        Updater {
            profile,
            downloads: HashMap::new(),
            validating: HashMap::new(),
            disconnected: false,
            pending: None,
            stats: UpdaterStats::default(),
        }
    }

    fn fail(&mut self, transfer: u64, f: Failure, rejected: bool) -> UpdateReport {
        let (reason, detail) = (f.code, f.detail);
        let state = if rejected {
            self.stats.rejected += 1;
            UpdateState::Rejected { reason, detail }
        } else {
            self.stats.failed += 1;
            UpdateState::Failed { reason, detail }
        };
        self.downloads.remove(&transfer);
        self.validating.remove(&transfer);
        UpdateReport { transfer, state }
    }

    /// Answers a `validate` command: the same checks as an offer (but any release: it is not
    /// activated, so anti-rollback does not apply), then the download into the spare slot.
    /// A device that is not a bench device declines.
    pub fn validate(
        &mut self,
        behaviour: &Behaviour,
        offer: &ValidateOffer,
        now_ms: u64,
    ) -> UpdateReport {
        let transfer = offer.transfer;
        if self.profile.bench.is_none() {
            let f = Failure {
                code: UpdateError::Declined,
                detail: "not a bench device".into(),
            };
            return self.fail(transfer, f, true);
        }
        let device_time = now_ms.saturating_add_signed(self.profile.faults.clock_skew_ms);
        let policy = DevicePolicy {
            trusted_keys: &self.profile.trust.keys,
            threshold: self.profile.trust.threshold,
            hardware: &behaviour.hardware,
            max_size: behaviour.hardware.flash_bytes,
        };
        let manifest = match check_offer(&offer.manifest, &policy, device_time, |_| 0) {
            Ok(m) => m,
            Err(f) => return self.fail(transfer, f, true),
        };
        self.downloads.retain(|t, _| *t == transfer);
        self.validating.retain(|t, _| *t == transfer);
        self.validating
            .insert(transfer, (offer.golden.clone(), offer.repeat));
        let download = self
            .downloads
            .entry(transfer)
            .or_insert_with(|| Download::new(manifest));
        UpdateReport {
            transfer,
            state: UpdateState::Accepted {
                next_chunk: download.next_chunk() as u32,
            },
        }
    }

    /// Answers an offer: accepted from the first missing chunk, or rejected with the reason.
    pub fn offer(
        &mut self,
        behaviour: &Behaviour,
        offer: &UpdateOffer,
        now_ms: u64,
    ) -> UpdateReport {
        let transfer = offer.transfer;
        // The transfer already installed what runs now (its report was lost, say to a crash
        // right after the install): say so again instead of refusing it as a downgrade.
        if let Some(running) = behaviour.installed_by_transfer(transfer) {
            return UpdateReport {
                transfer,
                state: UpdateState::Installed {
                    version: running.version.clone(),
                    release: running.release,
                },
            };
        }
        let device_time = now_ms.saturating_add_signed(self.profile.faults.clock_skew_ms);
        let policy = DevicePolicy {
            trusted_keys: &self.profile.trust.keys,
            threshold: self.profile.trust.threshold,
            hardware: &behaviour.hardware,
            max_size: behaviour.hardware.flash_bytes,
        };
        let manifest = match check_offer(&offer.manifest, &policy, device_time, |m| {
            behaviour.installed_release(m.kind, &m.name)
        }) {
            Ok(m) => m,
            Err(f) => return self.fail(transfer, f, true),
        };
        if self.profile.faults.decline {
            let f = Failure {
                code: UpdateError::Declined,
                detail: "declined by the device".into(),
            };
            return self.fail(transfer, f, true);
        }
        // A new transfer replaces any other download; the same one resumes.
        self.downloads.retain(|t, _| *t == transfer);
        let download = self
            .downloads
            .entry(transfer)
            .or_insert_with(|| Download::new(manifest));
        UpdateReport {
            transfer,
            state: UpdateState::Accepted {
                next_chunk: download.next_chunk() as u32,
            },
        }
    }

    /// Takes one chunk; returns the reports to send and what to do next.
    pub fn chunk(
        &mut self,
        behaviour: &mut Behaviour,
        chunk: &Chunk,
    ) -> (Vec<UpdateReport>, UpdateEffect) {
        let transfer = chunk.transfer;
        let Some(download) = self.downloads.get_mut(&transfer) else {
            return (Vec::new(), UpdateEffect::None);
        };
        let index = u64::from(chunk.index);
        let faults = &self.profile.faults;
        let mut data = chunk.data.clone();
        if faults.corrupt_chunk == Some(index) && !data.is_empty() {
            data[0] ^= 0xff;
        }
        if faults.truncate_chunk == Some(index) {
            data.pop();
        }
        match download.accept(index, &data, &chunk.proof) {
            Ok(Accepted::Duplicate) => {
                self.stats.chunks_duplicate += 1;
                return (Vec::new(), UpdateEffect::None);
            }
            Ok(Accepted::Ahead) => {
                self.stats.chunks_ahead += 1;
                return (Vec::new(), UpdateEffect::None);
            }
            Ok(Accepted::Stored) => self.stats.chunks_stored += 1,
            Err(f) => return (vec![self.fail(transfer, f, false)], UpdateEffect::None),
        }
        let next = download.next_chunk();
        let count = download.manifest().chunk_count();
        // Progress every few chunks keeps the gateway's window full without a report per chunk.
        let mut reports = Vec::new();
        if next % REPORT_EVERY == 0 || next == count {
            reports.push(UpdateReport {
                transfer,
                state: UpdateState::Downloading {
                    next_chunk: next as u32,
                },
            });
        }
        if !download.is_complete() {
            let at = self.profile.faults.disconnect_at;
            if !self.disconnected && at.is_some_and(|f| next as f64 >= f * count as f64) {
                self.disconnected = true;
                return (reports, UpdateEffect::Reconnect);
            }
            return (reports, UpdateEffect::None);
        }
        let Some(done) = self.downloads.remove(&transfer) else {
            return (reports, UpdateEffect::None);
        };
        reports.push(UpdateReport {
            transfer,
            state: UpdateState::Verifying,
        });
        let manifest = match done.finish() {
            Ok(m) => m,
            Err(f) => {
                reports.push(self.fail(transfer, f, false));
                return (reports, UpdateEffect::None);
            }
        };
        if let Some((golden, repeat)) = self.validating.remove(&transfer) {
            // Into the spare slot and run from there; the active slot does not change.
            if self.profile.faults.fail_install {
                let f = Failure {
                    code: UpdateError::InstallFailed,
                    detail: "flash write failed".into(),
                };
                reports.push(self.fail(transfer, f, false));
                return (reports, UpdateEffect::None);
            }
            let bench = self.profile.bench.clone().unwrap_or_default();
            let result = bench.run(
                &manifest.name,
                &manifest.version,
                &golden,
                repeat,
                behaviour.regression.as_ref(),
            );
            self.stats.validated += 1;
            reports.push(UpdateReport {
                transfer,
                state: UpdateState::Validated(result),
            });
            return (reports, UpdateEffect::None);
        }
        reports.push(UpdateReport {
            transfer,
            state: UpdateState::Installing,
        });
        if self.profile.faults.fail_install {
            let f = Failure {
                code: UpdateError::InstallFailed,
                detail: "flash write failed".into(),
            };
            reports.push(self.fail(transfer, f, false));
            return (reports, UpdateEffect::None);
        }
        let installed = Installed {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            release: manifest.release,
        };
        behaviour.install(manifest.kind, installed, transfer);
        self.stats.installed += 1;
        self.pending = Some(UpdateReport {
            transfer,
            state: UpdateState::Installed {
                version: manifest.version,
                release: manifest.release,
            },
        });
        (reports, UpdateEffect::Reboot)
    }

    /// Answers rollback directive `id`: the protocol's checks against the device's slots, at
    /// the device's (possibly skewed) time; on success the artifact's other slot becomes the
    /// running one and the device reboots into it.
    pub fn rollback(
        &mut self,
        behaviour: &mut Behaviour,
        id: u64,
        directive: &Signed,
        now_ms: u64,
    ) -> RollbackOutcome {
        let device_time = now_ms.saturating_add_signed(self.profile.faults.clock_skew_ms);
        let checked = check_rollback(
            directive,
            &self.profile.trust.rollback_keys,
            &behaviour.id,
            device_time,
            |kind, name| behaviour.slot(kind, name),
        );
        let failure = match checked {
            Ok(d) if behaviour.revert(d.kind, &d.from.name) => None,
            // The checks found the other slot, so activating it cannot fail; were it to, the
            // device would still run `from`.
            Ok(_) => Some(RollbackFailure {
                code: RollbackError::NoPrevious,
                detail: "the other slot could not be activated".into(),
            }),
            Err(f) => Some(f),
        };
        match failure {
            None => RollbackOutcome {
                ack: CommandAck {
                    id,
                    status: AckStatus::Done,
                },
                refused: None,
                effect: UpdateEffect::Reboot,
            },
            Some(f) => RollbackOutcome {
                ack: CommandAck {
                    id,
                    status: AckStatus::Rejected { reason: f.reason() },
                },
                refused: Some(f.code),
                effect: UpdateEffect::None,
            },
        }
    }
}

#[cfg(test)]
mod tests;
