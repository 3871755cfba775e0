//! The storage writer as the sessions see it, faked: it takes what the sessions queue, in
//! order, and commits or fails what it has taken when the script says so (or at once, in auto
//! mode), through the same `Receipts` the real writer uses. Its verdict on a message depends
//! on the payload alone, so that the checks can tell what every acknowledgement must say.
//!
//! Everything observable (bytes on the wire, what the writer takes, commits and failures)
//! goes into one [`Trace`] in the order it happened: the simulation runs on one thread, so
//! that order is the real one, and the checks read it back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_protocol::{Downlink, Encoding, Uplink};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::bus::{DirectError, Receipts, Refusal, WriterMsg};

/// What happened, in order.
#[derive(Debug)]
pub(super) enum Event {
    /// A connection was opened in a slot.
    Opened {
        conn: usize,
    },
    /// The device put these bytes on its connection (they arrive in this order).
    Sent {
        conn: usize,
        bytes: Vec<u8>,
    },
    /// The device read these bytes from the gateway.
    Received {
        conn: usize,
        bytes: Vec<u8>,
    },
    /// The device reads nothing until then.
    ReadPaused {
        conn: usize,
        until: Instant,
    },
    /// The device closed its sending side (`dropped`: the whole connection).
    DeviceClosed {
        conn: usize,
        dropped: bool,
    },
    /// The gateway's task for the connection returned.
    Ended {
        conn: usize,
        panicked: bool,
    },
    Took(Taken),
    /// The writer's batch committed: the messages `(epoch, n)` in it, and how many messages
    /// with no receipt (wills).
    Committed {
        msgs: Vec<(u64, u64)>,
    },
    /// The writer's batch failed to commit.
    Failed {
        msgs: Vec<(u64, u64)>,
    },
    /// The writer takes nothing until then.
    WriterStalled {
        until: Instant,
    },
    Revoked {
        device: &'static str,
    },
    Enrolled {
        device: &'static str,
    },
    /// The gateway handed its session a message for `device`.
    Direct {
        device: &'static str,
        id: u32,
        channel: Downlink,
        encoding: Encoding,
        qos: u8,
        result: Result<(), DirectError>,
    },
    Shutdown,
}

/// What the writer took from its queue.
#[derive(Debug)]
pub(super) enum Taken {
    Uplink {
        epoch: u64,
        /// The message's number in its session; `None` for a will.
        n: Option<u64>,
        channel: Uplink,
        encoding: Encoding,
        payload: Bytes,
        rejected: u64,
        verdict: Option<Refusal>,
    },
    Presence {
        epoch: u64,
        device: String,
        online: bool,
        peer: String,
        reason: Option<&'static str>,
    },
    Rejected {
        device: String,
        count: u64,
    },
    Marker,
}

#[derive(Clone, Default)]
pub(super) struct Trace(Arc<Mutex<Vec<(Instant, Event)>>>);

impl Trace {
    pub fn push(&self, event: Event) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.push((Instant::now(), event));
    }

    /// Everything since the last call.
    pub fn take(&self) -> Vec<(Instant, Event)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The fake writer's verdict on a message: JSON objects are stored, arrays name something the
/// gateway does not know, anything else is invalid; a revoked device's messages are refused.
pub(super) fn verdict(payload: &[u8], revoked: bool) -> Option<Refusal> {
    if revoked {
        return Some(Refusal::NotAuthorized);
    }
    match payload.first() {
        Some(b'{') => None,
        Some(b'[') => Some(Refusal::Unknown),
        _ => Some(Refusal::Invalid),
    }
}

/// A message taken and not yet committed.
struct Pending {
    receipts: Arc<Receipts>,
    epoch: u64,
    n: u64,
    verdict: Option<Refusal>,
}

#[derive(Default)]
struct State {
    batch: Vec<Pending>,
    stalled_until: Option<Instant>,
    auto: bool,
    revoked: Vec<&'static str>,
}

/// The writer's controls; its task runs [`FakeWriter::run`].
#[derive(Clone)]
pub(super) struct FakeWriter {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    trace: Trace,
}

impl FakeWriter {
    pub fn new(trace: Trace, auto: bool) -> FakeWriter {
        FakeWriter {
            state: Arc::new(Mutex::new(State {
                auto,
                ..State::default()
            })),
            wake: Arc::new(Notify::new()),
            trace,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes messages from the queue until it closes, unless stalled.
    pub async fn run(self, rx: flume::Receiver<WriterMsg>) {
        loop {
            let stalled = self.state().stalled_until.filter(|u| *u > Instant::now());
            if let Some(until) = stalled {
                tokio::select! {
                    biased;
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            let msg = tokio::select! {
                biased;
                _ = self.wake.notified() => continue,
                m = rx.recv_async() => m,
            };
            let Ok(msg) = msg else { return };
            self.take(msg);
            if self.state().auto {
                self.commit();
            }
        }
    }

    fn take(&self, msg: WriterMsg) {
        let taken = match msg {
            WriterMsg::Uplink(mut m) => {
                // The real writer lets go of a message's queue bytes once it has applied it,
                // before its commit.
                m.room = None;
                let mut state = self.state();
                let revoked = state.revoked.contains(&m.device.as_str());
                let verdict = verdict(&m.payload, revoked);
                let n = m.receipt.as_ref().map(|(_, n)| *n);
                if let Some((receipts, n)) = m.receipt.take() {
                    state.batch.push(Pending {
                        receipts,
                        epoch: m.session,
                        n,
                        verdict,
                    });
                }
                Taken::Uplink {
                    epoch: m.session,
                    n,
                    channel: m.channel,
                    encoding: m.encoding,
                    payload: m.payload,
                    rejected: m.rejected,
                    verdict,
                }
            }
            WriterMsg::Presence(p) => Taken::Presence {
                epoch: p.session,
                device: p.device,
                online: p.online,
                peer: p.peer,
                reason: p.reason,
            },
            WriterMsg::Rejected { device, count } => Taken::Rejected { device, count },
            WriterMsg::FlushMarker(_) => Taken::Marker,
        };
        self.trace.push(Event::Took(taken));
    }

    /// Commits the batch: refusals first, then "committed up to" per session, as the real
    /// writer does.
    pub fn commit(&self) {
        let batch = std::mem::take(&mut self.state().batch);
        if batch.is_empty() {
            return;
        }
        self.trace.push(Event::Committed {
            msgs: batch.iter().map(|p| (p.epoch, p.n)).collect(),
        });
        for p in &batch {
            if let Some(why) = p.verdict {
                p.receipts.refuse(p.n, why);
            }
        }
        for p in &batch {
            p.receipts.committed(p.n);
        }
    }

    /// Fails the batch's commit: its refusals were recorded already (the real writer records
    /// them while applying), then every session in it is told.
    pub fn fail(&self) {
        let batch = std::mem::take(&mut self.state().batch);
        if batch.is_empty() {
            return;
        }
        self.trace.push(Event::Failed {
            msgs: batch.iter().map(|p| (p.epoch, p.n)).collect(),
        });
        for p in &batch {
            if let Some(why) = p.verdict {
                p.receipts.refuse(p.n, why);
            }
        }
        for p in &batch {
            p.receipts.failed();
        }
    }

    pub fn stall(&self, d: Duration) {
        let until = Instant::now() + d;
        self.state().stalled_until = Some(until);
        self.trace.push(Event::WriterStalled { until });
        self.wake.notify_one();
    }

    /// Healthy again: takes and commits everything from now on.
    pub fn heal(&self) {
        {
            let mut s = self.state();
            s.stalled_until = None;
            s.auto = true;
        }
        self.commit();
        self.wake.notify_one();
    }

    pub fn set_auto(&self, auto: bool) {
        self.state().auto = auto;
        if auto {
            self.commit();
        }
    }

    pub fn revoke(&self, device: &'static str) {
        let mut s = self.state();
        if !s.revoked.contains(&device) {
            s.revoked.push(device);
        }
    }

    pub fn enroll(&self, device: &'static str) {
        self.state().revoked.retain(|d| *d != device);
    }
}
