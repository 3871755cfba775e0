//! Presence: the writer is its one owner, and the engines learn it from the writer, in commit
//! order.
//!
//! Invariants:
//! - A connection's events reach the writer in the order its session queued them (online,
//!   its messages, offline), and a device's next connection starts only after the previous one
//!   has ended. Each event carries its connection's epoch (the session id); an event of a
//!   connection that is not the device's current one (a late hello, a late "offline") changes
//!   nothing.
//! - The engines (updates, rollouts) count a device as online from its hello on its current
//!   connection until that connection ends.
//! - Connections are facts about sockets, not stored state: `connections` survives a reload
//!   after a failed commit, and [`Writer::resume_connections`] puts them back into the reloaded
//!   device records and engines. At start nobody is connected.

use super::{Effects, Writer};
use crate::bus::PresenceEvent;
use crate::clock::now_ms;
use crate::storage::{self, Tables};
use crate::updates;

/// A device's live connection, as the writer knows it.
#[derive(Debug, Clone)]
pub(super) struct Connection {
    pub session: u64,
    pub at_ms: u64,
    pub protocol: u8,
    pub peer: String,
    /// It said hello on this connection: the engines count it as online.
    pub hello: bool,
}

impl Writer {
    /// Applies a connection's start or end; a stale one (of a connection that is not the
    /// device's current one) changes nothing.
    pub(super) fn apply_presence(
        &mut self,
        t: &mut Tables<'_>,
        p: PresenceEvent,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let Some(state) = self.devices.get_mut(&p.device) else {
            return Ok(());
        };
        let current = self.connections.get(&p.device).map(|c| c.session);
        if p.online {
            if current.is_some_and(|s| s > p.session) {
                tracing::debug!(device = %p.device, session = p.session, "stale connection start ignored");
                return Ok(());
            }
            let presence = &mut state.device.presence;
            presence.online = true;
            presence.connected_at_ms = Some(p.at_ms);
            presence.protocol = Some(p.protocol);
            presence.peer = Some(p.peer.clone());
            presence.connections += 1;
            state.device.touch(p.at_ms);
            state.dirty = true;
            self.record_presence(t, &p.device, true, None, p.at_ms)?;
            let previous = self.connections.insert(
                p.device.clone(),
                Connection {
                    session: p.session,
                    at_ms: p.at_ms,
                    protocol: p.protocol,
                    peer: p.peer,
                    hello: false,
                },
            );
            // The previous connection's end was not seen (it cannot be: its session ends
            // before the next starts); the engines must not keep it online.
            if previous.is_some_and(|c| c.hello) {
                self.engines_offline(t, &p.device, p.at_ms, fx)?;
            }
            return Ok(());
        }
        if current != Some(p.session) {
            tracing::debug!(device = %p.device, session = p.session, "stale connection end ignored");
            return Ok(());
        }
        let presence = &mut state.device.presence;
        presence.online = false;
        presence.disconnected_at_ms = Some(p.at_ms);
        presence.disconnect_reason = p.reason.map(str::to_owned);
        state.dirty = true;
        self.record_presence(t, &p.device, false, p.reason, p.at_ms)?;
        let helloed = self.connections.remove(&p.device).is_some_and(|c| c.hello);
        if helloed {
            self.engines_offline(t, &p.device, p.at_ms, fx)?;
        }
        Ok(())
    }

    /// Whether a message of connection `session` comes from the device's current connection.
    pub(super) fn is_current(&self, device: &str, session: u64) -> bool {
        self.connections
            .get(device)
            .is_some_and(|c| c.session == session)
    }

    /// A hello on the device's current connection: the engines count it as online from now.
    pub(super) fn said_hello(&mut self, device: &str) {
        if let Some(c) = self.connections.get_mut(device) {
            c.hello = true;
        }
    }

    fn engines_offline(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        self.update_event(t, updates::Event::Offline(device.to_owned()), now, fx)?;
        self.rollouts_offline(t, device, now, fx)
    }

    /// After a reload: the live connections go back into the device records, and the devices
    /// that said hello on them back into the engines (as if they said it again), in one
    /// transaction. Failing that, the writer cannot go on.
    pub(super) fn resume_connections(&mut self) -> storage::Result<()> {
        if self.connections.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut fx = Effects::default();
        let mut live: Vec<(String, Connection)> = self
            .connections
            .iter()
            .map(|(d, c)| (d.clone(), c.clone()))
            .collect();
        live.sort_by_key(|(_, c)| c.session);
        let store = self.store.clone();
        store.write(|t| {
            for (device, c) in &live {
                let Some(state) = self.devices.get_mut(device) else {
                    continue;
                };
                let presence = &mut state.device.presence;
                presence.online = true;
                presence.connected_at_ms = Some(c.at_ms);
                presence.protocol = Some(c.protocol);
                presence.peer = Some(c.peer.clone());
                state.dirty = true;
                if c.hello {
                    self.update_event(t, updates::Event::Online(device.clone()), now, &mut fx)?;
                    self.rollouts_hello(t, device, now, &mut fx)?;
                }
            }
            self.write_dirty(t)
        })?;
        self.finish_batch(fx);
        Ok(())
    }
}
