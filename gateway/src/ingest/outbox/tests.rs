//! The writer records outbox entries with their events, in their transaction, and only for
//! destinations that are configured.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetgate_config::{Config, TelemetryForward};
use fleetgate_protocol::{Encoding, HardwareMetrics, Telemetry, Uplink, encode};
use serde_json::Value;
use tokio::sync::oneshot;

use super::super::testing::{RecordingLinks, hello};
use super::super::{Control, ControlError, Item, PresenceEvent, UplinkMsg, Writer, WriterMsg};
use crate::auth::Credentials;
use crate::bus::DownlinkTx;
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::storage::outbox::Stream;
use crate::storage::records::Record;
use crate::uplink::event::Entry;

struct H {
    _dir: tempfile::TempDir,
    store: Store,
    writer: Writer,
    clock_us: u64,
    seq: u32,
}

fn webhook(name: &str) -> fleetgate_config::Webhook {
    let text = format!("[[alerts.webhooks]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:9/\"\n");
    Config::from_toml_str(&text, "x").unwrap().alerts.webhooks[0].clone()
}

fn uplink_config(telemetry: TelemetryForward) -> Config {
    let mut c = Config::default();
    c.uplink.enabled = true;
    c.uplink.site = "site-a".into();
    c.uplink.forward.telemetry = telemetry;
    c.uplink.forward.telemetry_interval = Duration::from_secs(60);
    c
}

impl H {
    fn new(config: &Config) -> H {
        H::open(tempfile::tempdir().unwrap(), config)
    }

    fn open(dir: tempfile::TempDir, config: &Config) -> H {
        let mut config = config.clone();
        config.storage.data_dir = dir.path().to_owned();
        let store = Store::open(dir.path()).unwrap();
        let (downlink, _rx) = DownlinkTx::detached(1024);
        let writer = Writer::new(
            store.clone(),
            &config,
            std::sync::Arc::new(Credentials::default()),
            std::sync::Arc::new(RecordingLinks::default()),
            downlink,
            std::sync::Arc::new(Metrics::new(Duration::from_secs(3600))),
        )
        .unwrap();
        H {
            _dir: dir,
            store,
            writer,
            clock_us: 1_000_000_000,
            seq: 0,
        }
    }

    fn step(&mut self, items: Vec<Item>) {
        let fx = self.writer.apply_batch(items).unwrap();
        assert!(self.writer.finish_batch(fx).is_none());
    }

    fn control<T: Send + 'static>(
        &mut self,
        make: impl FnOnce(oneshot::Sender<Result<T, ControlError>>) -> Control,
    ) -> Result<T, ControlError> {
        let (tx, mut rx) = oneshot::channel();
        self.step(vec![Item::Control(make(tx))]);
        rx.try_recv().expect("replied after commit")
    }

    fn msg<T: serde::Serialize>(&mut self, device: &str, channel: Uplink, m: &T) -> Item {
        self.clock_us += 1_000_000;
        Item::Msg(WriterMsg::Uplink(UplinkMsg {
            device: device.into(),
            session: 1,
            channel,
            encoding: Encoding::Postcard,
            payload: encode(m, Encoding::Postcard).unwrap().into(),
            telemetry: None,
            received_us: self.clock_us,
            receipt: None,
            room: None,
            rejected: 0,
        }))
    }

    fn telemetry(&mut self, device: &str, temp: f32) -> Item {
        self.seq += 1;
        let t = Telemetry {
            boot: 1,
            seq: self.seq,
            time_ms: 0,
            hw: HardwareMetrics {
                temp_c: Some(temp),
                ..Default::default()
            },
            model: None,
            samples: vec![],
            bins: vec![],
        };
        self.msg(device, Uplink::Telemetry, &t)
    }

    /// An enrolled device, connected and said hello, in one batch.
    fn device(&mut self, id: &str) {
        let id = id.to_owned();
        let key = id.clone();
        self.control(|reply| Control::Enroll {
            id: key,
            labels: BTreeMap::new(),
            reply,
        })
        .unwrap();
        let online = Item::Msg(WriterMsg::Presence(PresenceEvent {
            device: id.clone(),
            session: 1,
            online: true,
            at_ms: 10,
            protocol: 4,
            peer: "127.0.0.1:1".into(),
            reason: None,
        }));
        let hi = self.msg(&id, Uplink::Hello, &hello("mcu", ("kws", "1.0.0", 1)));
        self.step(vec![online, hi]);
    }

    /// Every entry of `stream`: (seq, type, data).
    fn entries(&self, stream: Stream) -> Vec<(u64, String, Value)> {
        self.store
            .outbox_read(stream, 0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(seq, bytes)| {
                let e = Entry::decode(&bytes).unwrap();
                let v = e.value();
                (seq, e.kind, v)
            })
            .collect()
    }

    fn kinds(&self, stream: Stream) -> Vec<String> {
        self.entries(stream).into_iter().map(|e| e.1).collect()
    }
}

#[test]
fn with_the_uplink_and_webhooks_off_nothing_is_recorded() {
    let mut h = H::new(&Config::default());
    h.device("d1");
    let hot = h.telemetry("d1", 95.0);
    h.step(vec![hot]);
    for stream in Stream::ALL {
        assert!(h.entries(stream).is_empty(), "{stream:?}");
        assert_eq!(h.store.outbox_snapshot(stream).unwrap().state.head, 0);
        assert!(h.store.outbox_snapshot(stream).unwrap().cursors.is_empty());
    }
}

#[test]
fn events_go_upstream_in_the_order_the_writer_applied_them() {
    let mut h = H::new(&uplink_config(TelemetryForward::All));
    h.device("d1");
    let hot = h.telemetry("d1", 95.0);
    let cool = h.telemetry("d1", 20.0);
    h.step(vec![hot, cool]);
    let id = h
        .store
        .alerts(&crate::storage::AlertFilter::default(), 10)
        .unwrap()[0]
        .id;
    h.control(|reply| Control::Alert {
        id,
        action: super::super::AlertAction::Acknowledge,
        by: "op".into(),
        reply,
    })
    .unwrap_err();
    let entries = h.entries(Stream::Upstream);
    let kinds: Vec<&str> = entries.iter().map(|e| e.1.as_str()).collect();
    // Online, the hello's inventory; then telemetry, the rule's alert opening; telemetry, the
    // rule resolving it. (Acknowledging a resolved alert is refused and records nothing.)
    assert_eq!(
        kinds,
        [
            "presence",
            "inventory",
            "telemetry",
            "alert",
            "telemetry",
            "alert"
        ]
    );
    assert_eq!(
        entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(entries[0].2["online"], true);
    assert_eq!(entries[1].2["hardware"]["class"], "mcu");
    assert_eq!(entries[1].2["models"][0]["name"], "kws");
    assert_eq!(entries[2].2["hw"]["temp_c"], 95.0);
    assert_eq!(entries[3].2["event"], "opened");
    assert_eq!(entries[3].2["alert"]["kind"], "thermal");
    assert_eq!(entries[3].2["alert"]["severity"], "critical");
    assert_eq!(entries[5].2["event"], "resolved");
    assert_eq!(entries[5].2["alert"]["state"], "resolved");
    // The same hello again changes nothing: no inventory; a new one does.
    let same = h.msg("d1", Uplink::Hello, &hello("mcu", ("kws", "1.0.0", 1)));
    let newer = h.msg("d1", Uplink::Hello, &hello("mcu", ("kws", "2.0.0", 2)));
    h.step(vec![same, newer]);
    assert_eq!(h.kinds(Stream::Upstream).len(), 7);
    assert_eq!(
        h.entries(Stream::Upstream)[6].2["models"][0]["version"],
        "2.0.0"
    );
    // Nothing was recorded for webhooks: none is configured.
    assert!(h.entries(Stream::Webhooks).is_empty());
}

#[test]
fn downsampled_telemetry_keeps_one_message_per_device_per_interval() {
    let mut h = H::new(&uplink_config(TelemetryForward::Downsampled));
    h.device("d1");
    h.device("d2");
    // 1 s apart: 0 s, 1 s, ... 119 s for d1; d2 once.
    let mut items = Vec::new();
    for _ in 0..120 {
        items.push(h.telemetry("d1", 20.0));
    }
    items.push(h.telemetry("d2", 20.0));
    h.step(items);
    let tel: Vec<Value> = h
        .entries(Stream::Upstream)
        .into_iter()
        .filter(|e| e.1 == "telemetry")
        .map(|e| e.2)
        .collect();
    let per: Vec<(String, u64)> = tel
        .iter()
        .map(|t| {
            (
                t["device"].as_str().unwrap().to_owned(),
                t["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    // d1's first, then 60 s later, and d2's.
    assert_eq!(
        per,
        [("d1".into(), 1), ("d1".into(), 61), ("d2".into(), 121)]
    );
}

#[test]
fn a_failed_commit_records_nothing_and_the_retry_records_once() {
    let mut h = H::new(&uplink_config(TelemetryForward::All));
    h.device("d1");
    let before = h.entries(Stream::Upstream).len();
    h.store.fail_next_commits(1);
    let hot = h.telemetry("d1", 95.0);
    let fx = h.writer.apply_batch(vec![hot]).unwrap();
    h.writer.finish_batch(fx);
    assert_eq!(h.entries(Stream::Upstream).len(), before);
    // The device sends it again (it was never acknowledged).
    h.seq -= 1;
    let again = h.telemetry("d1", 95.0);
    h.step(vec![again]);
    assert_eq!(
        h.kinds(Stream::Upstream)[before..],
        ["telemetry".to_owned(), "alert".to_owned()]
    );
}

#[test]
fn webhooks_get_alerts_and_rollout_trouble_only() {
    let mut c = Config::default();
    c.alerts.webhooks = vec![webhook("ops"), webhook("ml")];
    let mut h = H::new(&c);
    h.device("d1");
    let hot = h.telemetry("d1", 95.0);
    let cool = h.telemetry("d1", 20.0);
    h.step(vec![hot, cool]);
    let entries = h.entries(Stream::Webhooks);
    let events: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.1.as_str(), e.2["event"].as_str().unwrap()))
        .collect();
    assert_eq!(events, [("alert", "opened"), ("alert", "resolved")]);
    // No uplink: nothing upstream, and both webhooks are destinations from the oldest entry.
    assert!(h.entries(Stream::Upstream).is_empty());
    let snap = h.store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert_eq!(snap.cursor("ops"), Some(0));
    assert_eq!(snap.cursor("ml"), Some(0));
}

#[test]
fn acknowledgements_move_cursors_and_survive_a_restart() {
    let mut c = uplink_config(TelemetryForward::All);
    c.alerts.webhooks = vec![webhook("ops")];
    let mut h = H::new(&c);
    h.device("d1");
    let hot = h.telemetry("d1", 95.0);
    h.step(vec![hot]);
    let head = h
        .store
        .outbox_snapshot(Stream::Upstream)
        .unwrap()
        .state
        .head;
    assert_eq!(head, 4);
    h.control(|reply| Control::OutboxAck {
        stream: Stream::Upstream,
        destination: "upstream".into(),
        upto: 3,
        reply,
    })
    .unwrap();
    let snap = h.store.outbox_snapshot(Stream::Upstream).unwrap();
    assert_eq!(snap.cursor("upstream"), Some(3));
    assert_eq!(snap.state.len(), 1);
    // The webhook's cursor is its own.
    assert_eq!(
        h.store
            .outbox_snapshot(Stream::Webhooks)
            .unwrap()
            .cursor("ops"),
        Some(0)
    );
    // Restart on the same data dir with the uplink off: its outbox is emptied; the webhook
    // keeps its backlog and cursor; numbers go on.
    let H {
        _dir: dir,
        store,
        writer,
        ..
    } = h;
    drop((writer, store));
    let mut off = c.clone();
    off.uplink.enabled = false;
    let mut h = H::open(dir, &off);
    let up = h.store.outbox_snapshot(Stream::Upstream).unwrap();
    assert!(up.cursors.is_empty() && up.state.is_empty());
    assert_eq!(up.state.head, 4);
    let hooks = h.store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert_eq!(hooks.cursor("ops"), Some(0));
    assert_eq!(hooks.state.len(), 1);
    h.control(|reply| Control::OutboxAck {
        stream: Stream::Webhooks,
        destination: "ops".into(),
        upto: 1,
        reply,
    })
    .unwrap();
    let hooks = h.store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert!(hooks.state.is_empty());
    // An acknowledgement for the upstream, now not a destination, changes nothing.
    h.control(|reply| Control::OutboxAck {
        stream: Stream::Upstream,
        destination: "upstream".into(),
        upto: 4,
        reply,
    })
    .unwrap();
    assert!(
        h.store
            .outbox_snapshot(Stream::Upstream)
            .unwrap()
            .cursors
            .is_empty()
    );
}
