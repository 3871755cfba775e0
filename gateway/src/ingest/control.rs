//! Operator requests to the writer: what the API may ask, the handle it asks through, and how
//! the writer carries each request out inside a batch (answered after the commit).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetgate_protocol::{Action, Command, DeviceId, Downlink, encode};
use tokio::sync::oneshot;

use super::{
    DeviceState, DriftAnswer, DriftQuery, Effects, RolloutCreated, RolloutRequest, UpdatePlan,
    UpdateRequest, Writer,
};
use crate::auth;
use crate::bus::Kick;
use crate::clock::now_ms;
use crate::model::{AlertRecord, AlertState, CommandRecord, CommandState, Device, Stamp};
use crate::storage::{self, Tables};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertAction {
    Acknowledge,
    Resolve,
}

/// A problem with an operator request, mapped to an HTTP status by the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("the gateway is shutting down")]
    Stopped,
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// Operator requests; each is answered after its change is committed.
#[derive(Debug)]
pub enum Control {
    Enroll {
        id: String,
        labels: BTreeMap<String, String>,
        reply: Reply<String>,
    },
    RotateCredential {
        id: String,
        reply: Reply<String>,
    },
    Revoke {
        id: String,
        reply: Reply<()>,
    },
    Alert {
        id: u64,
        action: AlertAction,
        by: String,
        reply: Reply<AlertRecord>,
    },
    Command {
        device: String,
        action: Action,
        by: String,
        reply: Reply<CommandRecord>,
    },
    StartUpdates {
        request: UpdateRequest,
        by: String,
        reply: Reply<UpdatePlan>,
    },
    CancelUpdate {
        id: u64,
        by: String,
        reply: Reply<crate::model::TransferRecord>,
    },
    Validate {
        request: super::ValidationRequest,
        by: String,
        reply: Reply<super::ValidationPlan>,
    },
    CreateRollout {
        request: Box<RolloutRequest>,
        by: String,
        reply: Reply<RolloutCreated>,
    },
    Rollout {
        id: u64,
        action: crate::rollouts::OperatorAction,
        by: String,
        reason: Option<String>,
        reply: Reply<crate::rollouts::model::RolloutRecord>,
    },
    /// Live views of one rollout, or of every rollout that may still act.
    RolloutViews {
        id: Option<u64>,
        reply: oneshot::Sender<Vec<crate::rollouts::View>>,
    },
    /// A model version's baseline was set or replaced.
    BaselineChanged {
        model: String,
        version: semver::Version,
    },
    Drift {
        query: DriftQuery,
        reply: oneshot::Sender<DriftAnswer>,
    },
    /// A destination of an outbox acknowledged it up to `upto` (the uplink's and webhooks'
    /// senders); answered once that is committed.
    OutboxAck {
        stream: storage::outbox::Stream,
        destination: String,
        upto: u64,
        reply: Reply<()>,
    },
    /// Answer once flush marker `upto` has arrived and what came before it is committed.
    Sync {
        upto: u64,
        reply: oneshot::Sender<()>,
    },
    /// Finish once flush marker `upto` has arrived (or at the deadline), then exit.
    Stop {
        upto: u64,
        deadline: Instant,
        reply: oneshot::Sender<()>,
    },
}

/// The API's handle on the writer.
#[derive(Debug, Clone)]
pub struct ControlTx(pub(super) flume::Sender<Control>);

impl ControlTx {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Control) -> Result<T, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send_async(make(tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    pub async fn enroll(
        &self,
        id: String,
        labels: BTreeMap<String, String>,
    ) -> Result<String, ControlError> {
        self.ask(|reply| Control::Enroll { id, labels, reply })
            .await
    }

    pub async fn rotate_credential(&self, id: String) -> Result<String, ControlError> {
        self.ask(|reply| Control::RotateCredential { id, reply })
            .await
    }

    pub async fn revoke(&self, id: String) -> Result<(), ControlError> {
        self.ask(|reply| Control::Revoke { id, reply }).await
    }

    pub async fn alert(
        &self,
        id: u64,
        action: AlertAction,
        by: String,
    ) -> Result<AlertRecord, ControlError> {
        self.ask(|reply| Control::Alert {
            id,
            action,
            by,
            reply,
        })
        .await
    }

    pub async fn command(
        &self,
        device: String,
        action: Action,
        by: String,
    ) -> Result<CommandRecord, ControlError> {
        self.ask(|reply| Control::Command {
            device,
            action,
            by,
            reply,
        })
        .await
    }

    pub async fn start_updates(
        &self,
        request: UpdateRequest,
        by: String,
    ) -> Result<UpdatePlan, ControlError> {
        self.ask(|reply| Control::StartUpdates { request, by, reply })
            .await
    }

    pub async fn cancel_update(
        &self,
        id: u64,
        by: String,
    ) -> Result<crate::model::TransferRecord, ControlError> {
        self.ask(|reply| Control::CancelUpdate { id, by, reply })
            .await
    }

    pub async fn validate(
        &self,
        request: super::ValidationRequest,
        by: String,
    ) -> Result<super::ValidationPlan, ControlError> {
        self.ask(|reply| Control::Validate { request, by, reply })
            .await
    }

    pub async fn create_rollout(
        &self,
        request: RolloutRequest,
        by: String,
    ) -> Result<RolloutCreated, ControlError> {
        let request = Box::new(request);
        self.ask(|reply| Control::CreateRollout { request, by, reply })
            .await
    }

    pub async fn rollout(
        &self,
        id: u64,
        action: crate::rollouts::OperatorAction,
        by: String,
        reason: Option<String>,
    ) -> Result<crate::rollouts::model::RolloutRecord, ControlError> {
        self.ask(|reply| Control::Rollout {
            id,
            action,
            by,
            reason,
            reply,
        })
        .await
    }

    pub async fn rollout_views(
        &self,
        id: Option<u64>,
    ) -> Result<Vec<crate::rollouts::View>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send_async(Control::RolloutViews { id, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }

    pub async fn baseline_changed(&self, model: String, version: semver::Version) {
        let _ = self
            .0
            .send_async(Control::BaselineChanged { model, version })
            .await;
    }

    pub async fn drift(&self, query: DriftQuery) -> Result<DriftAnswer, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send_async(Control::Drift { query, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }

    /// Moves a destination's outbox cursor to `upto`; returns once that is committed.
    pub async fn outbox_ack(
        &self,
        stream: storage::outbox::Stream,
        destination: String,
        upto: u64,
    ) -> Result<(), ControlError> {
        self.ask(|reply| Control::OutboxAck {
            stream,
            destination,
            upto,
            reply,
        })
        .await
    }

    /// Registers a wait for flush marker `upto`. Send the marker after this returns; the
    /// receiver fires once everything before the marker is committed.
    pub async fn sync(&self, upto: u64) -> Result<oneshot::Receiver<()>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send_async(Control::Sync { upto, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        Ok(rx)
    }

    /// Asks the writer to finish once flush marker `upto` has arrived: it commits everything
    /// before the marker and exits. Send the marker after this returns.
    pub async fn stop(&self, upto: u64, grace: Duration) -> Option<oneshot::Receiver<()>> {
        let (reply, rx) = oneshot::channel();
        let stop = Control::Stop {
            upto,
            deadline: Instant::now() + grace,
            reply,
        };
        self.0.send_async(stop).await.ok().map(|()| rx)
    }
}

impl Writer {
    pub(super) fn apply_control(
        &mut self,
        t: &mut Tables<'_>,
        c: Control,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let now = now_ms();
        match c {
            Control::Enroll { id, labels, reply } => {
                let result = self.enroll(&id, labels, now, fx);
                fx.reply(reply, result);
            }
            Control::RotateCredential { id, reply } => {
                let result = match self.devices.get_mut(&id) {
                    None => Err(ControlError::NotFound(format!("device {id}"))),
                    Some(s) => new_credential().map(|(secret, digest)| {
                        s.device.credential_hash = Some(digest);
                        s.dirty = true;
                        fx.credentials.push((id.clone(), Some(digest)));
                        fx.kicks.push((id.clone(), Kick::Revoked));
                        secret
                    }),
                };
                fx.reply(reply, result);
            }
            Control::Revoke { id, reply } => {
                let result = match self.devices.get_mut(&id) {
                    None => Err(ControlError::NotFound(format!("device {id}"))),
                    Some(s) => {
                        s.device.credential_hash = None;
                        s.dirty = true;
                        fx.credentials.push((id.clone(), None));
                        fx.kicks.push((id.clone(), Kick::Revoked));
                        Ok(())
                    }
                };
                fx.reply(reply, result);
            }
            Control::Alert {
                id,
                action,
                by,
                reply,
            } => {
                let result = self.alert_action(t, id, action, &by, now)?;
                fx.reply(reply, result);
            }
            Control::Command {
                device,
                action,
                by,
                reply,
            } => {
                let result = self.command(t, device, action, by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::StartUpdates { request, by, reply } => {
                let result = self.start_updates(t, request, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::CancelUpdate { id, by, reply } => {
                let result = self.cancel_update(t, id, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::Validate { request, by, reply } => {
                let result = self.start_validation(t, request, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::CreateRollout { request, by, reply } => {
                let result = self.create_rollout(t, *request, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::Rollout {
                id,
                action,
                by,
                reason,
                reply,
            } => {
                let result = self.rollout_operator(t, id, action, &by, reason, now, fx)?;
                fx.reply(reply, result);
            }
            Control::RolloutViews { id, reply } => {
                let _ = reply.send(self.rollout_views(id));
            }
            Control::BaselineChanged { model, version } => {
                self.baseline_changed(&model, &version, fx)
            }
            Control::Drift { query, reply } => {
                let _ = reply.send(self.drift_query(query));
            }
            Control::OutboxAck {
                stream,
                destination,
                upto,
                reply,
            } => {
                self.outbox_acknowledged(t, stream, &destination, upto)?;
                fx.reply(reply, Ok(()));
            }
            Control::Sync { upto, reply } => self.sync_waiters.push((upto, reply)),
            Control::Stop {
                upto,
                deadline,
                reply,
            } => fx.stop = Some((upto, deadline, reply)),
        }
        Ok(())
    }

    fn enroll(
        &mut self,
        id: &str,
        labels: BTreeMap<String, String>,
        now: u64,
        fx: &mut Effects,
    ) -> Result<String, ControlError> {
        DeviceId::new(id)
            .map_err(|e| ControlError::BadRequest(format!("device id {id:?}: {e}")))?;
        if self.devices.get(id).is_some_and(|s| !s.device.revoked()) {
            return Err(ControlError::Conflict(format!(
                "device {id} is already enrolled; rotate its credential instead"
            )));
        }
        let (secret, digest) = new_credential()?;
        match self.devices.get_mut(id) {
            // Re-enrolling a revoked device keeps its history.
            Some(s) => {
                s.device.credential_hash = Some(digest);
                s.device.labels = labels;
                s.dirty = true;
            }
            None => {
                let device = Device::new(id.to_owned(), labels, digest, now);
                self.devices.insert(
                    id.to_owned(),
                    DeviceState {
                        device,
                        last_telemetry_key: 0,
                        last_log_key: 0,
                        dirty: true,
                    },
                );
            }
        }
        fx.credentials.push((id.to_owned(), Some(digest)));
        Ok(secret)
    }

    fn alert_action(
        &mut self,
        t: &mut Tables<'_>,
        id: u64,
        action: AlertAction,
        by: &str,
        now: u64,
    ) -> storage::Result<Result<AlertRecord, ControlError>> {
        if !self.unresolved.contains_key(&id) {
            return Ok(Err(if self.store.alert(id)?.is_some() {
                ControlError::Conflict(format!("alert {id} is already resolved"))
            } else {
                ControlError::NotFound(format!("alert {id}"))
            }));
        }
        match action {
            AlertAction::Acknowledge => {
                let Some(alert) = self.unresolved.get_mut(&id) else {
                    return Ok(Err(ControlError::NotFound(format!("alert {id}"))));
                };
                if alert.state == AlertState::Open {
                    alert.state = AlertState::Acknowledged;
                    alert.acknowledged = Some(Stamp {
                        at_ms: now,
                        by: by.to_owned(),
                    });
                    t.put_alert(alert)?;
                    let alert = alert.clone();
                    self.record_alert(
                        t,
                        &alert,
                        crate::uplink::event::AlertEvent::Acknowledged,
                        now,
                    )?;
                    return Ok(Ok(alert));
                }
                Ok(Ok(alert.clone()))
            }
            AlertAction::Resolve => Ok(self
                .resolve(t, id, now, by)?
                .ok_or_else(|| ControlError::NotFound(format!("alert {id}")))),
        }
    }

    fn command(
        &mut self,
        t: &mut Tables<'_>,
        device: String,
        action: Action,
        by: String,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<CommandRecord, ControlError>> {
        let Some(s) = self.devices.get(&device) else {
            return Ok(Err(ControlError::NotFound(format!("device {device}"))));
        };
        if s.device.revoked() {
            return Ok(Err(ControlError::Conflict(format!(
                "device {device} is revoked"
            ))));
        }
        if !s.device.presence.online {
            return Ok(Err(ControlError::Conflict(format!(
                "device {device} is offline"
            ))));
        }
        let encoding = s.device.encoding;
        let id = self.next_command_id;
        let payload = match encode(
            &Command {
                id,
                action: action.clone(),
            },
            encoding,
        ) {
            Ok(p) => p,
            Err(e) => return Ok(Err(ControlError::BadRequest(e.to_string()))),
        };
        self.next_command_id += 1;
        let record = CommandRecord {
            id,
            device: device.clone(),
            action,
            created: Stamp { at_ms: now, by },
            state: CommandState::Sent,
            answered_ms: None,
        };
        t.put_command(&record)?;
        fx.downlinks
            .push((device, Downlink::Command, encoding, payload));
        Ok(Ok(record))
    }
}

fn new_credential() -> Result<(String, auth::Digest32), ControlError> {
    let secret =
        auth::new_secret().map_err(|e| ControlError::Storage(format!("no randomness: {e}")))?;
    let digest = auth::digest(&secret);
    Ok((secret, digest))
}
