use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use fleetgate_protocol::{
    Action, Alert, AlertKind, Command, CommandAck, Encoding, HardwareMetrics, Hello, LogLevel,
    LogLine, Severity, Telemetry, Uplink, decode, encode,
};

use super::testing::{self, RecordingLinks};
use super::*;
use crate::bus::Downlinked;
use crate::model::{AlertSource, AlertState, CommandState};
use crate::storage::AlertFilter;

struct Harness {
    _dir: tempfile::TempDir,
    store: Store,
    writer: Writer,
    credentials: Arc<Credentials>,
    downlink: flume::Receiver<Downlinked>,
    links: Arc<RecordingLinks>,
    metrics: Arc<Metrics>,
    clock_us: u64,
    /// Each device's current connection, as the last presence event said.
    sessions: HashMap<String, u64>,
}

fn config() -> Config {
    let mut c = Config::default();
    c.retention.telemetry_per_device = 5;
    c.retention.logs_per_device = 3;
    c
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness::open(dir)
    }

    fn open(dir: tempfile::TempDir) -> Harness {
        Harness::open_with(dir, &config())
    }

    fn open_with(dir: tempfile::TempDir, config: &Config) -> Harness {
        let mut config = config.clone();
        config.storage.data_dir = dir.path().to_owned();
        let config = &config;
        let store = Store::open(dir.path()).unwrap();
        let credentials = Arc::new(Credentials::default());
        let metrics = Arc::new(Metrics::new(Duration::from_secs(3600)));
        let (downlink, rx) = DownlinkTx::detached(1024);
        let links = Arc::new(RecordingLinks::default());
        let writer = Writer::new(
            store.clone(),
            config,
            credentials.clone(),
            links.clone(),
            downlink,
            metrics.clone(),
        )
        .unwrap();
        Harness {
            _dir: dir,
            store,
            writer,
            credentials,
            downlink: rx,
            links,
            metrics,
            clock_us: 1_000_000,
            sessions: HashMap::new(),
        }
    }

    fn step(&mut self, items: Vec<Item>) {
        let fx = self.writer.apply_batch(items).unwrap();
        assert!(self.writer.finish_batch(fx).is_none());
    }

    fn control<T: Send + 'static>(
        &mut self,
        make: impl FnOnce(Reply<T>) -> Control,
    ) -> Result<T, ControlError> {
        let (tx, mut rx) = oneshot::channel();
        self.step(vec![Item::Control(make(tx))]);
        rx.try_recv().expect("replied after commit")
    }

    fn enroll(&mut self, id: &str) -> String {
        let id = id.to_owned();
        self.control(|reply| Control::Enroll {
            id,
            labels: BTreeMap::new(),
            reply,
        })
        .unwrap()
    }

    fn uplink<T: serde::Serialize>(&mut self, device: &str, channel: Uplink, msg: &T) -> Item {
        self.clock_us += 1000;
        let payload = encode(msg, Encoding::Postcard).unwrap().into();
        self.raw(device, channel, Encoding::Postcard, payload)
    }

    /// A message as a device's current connection sends it.
    fn raw(&mut self, device: &str, channel: Uplink, encoding: Encoding, payload: Bytes) -> Item {
        Item::Msg(WriterMsg::Uplink(UplinkMsg {
            device: device.into(),
            session: self.sessions.get(device).copied().unwrap_or(0),
            channel,
            encoding,
            payload,
            telemetry: None,
            received_us: self.clock_us,
            receipt: None,
            room: None,
            rejected: 0,
        }))
    }

    fn telemetry(&mut self, device: &str, boot: u32, seq: u32, temp: f32) -> Item {
        let t = Telemetry {
            boot,
            seq,
            time_ms: 0,
            hw: HardwareMetrics {
                temp_c: Some(temp),
                ..Default::default()
            },
            model: None,
            samples: vec![],
            bins: vec![],
        };
        self.uplink(device, Uplink::Telemetry, &t)
    }

    fn presence(&mut self, device: &str, session: u64, online: bool) -> Item {
        if online {
            self.sessions.insert(device.to_owned(), session);
        }
        Item::Msg(WriterMsg::Presence(PresenceEvent {
            device: device.into(),
            session,
            online,
            at_ms: 10,
            protocol: 4,
            peer: "127.0.0.1:1".into(),
            reason: (!online).then_some("connection closed"),
        }))
    }

    fn device(&self, id: &str) -> Device {
        self.store.device(id).unwrap().unwrap()
    }
}

#[test]
fn enrollment_sets_credentials_and_conflicts_are_refused() {
    let mut h = Harness::new();
    let secret = h.enroll("d1");
    assert!(h.credentials.check("d1", &secret));
    let again = h.control(|reply| Control::Enroll {
        id: "d1".into(),
        labels: BTreeMap::new(),
        reply,
    });
    assert!(matches!(again, Err(ControlError::Conflict(_))));
    let bad = h.control(|reply| Control::Enroll {
        id: "a/b".into(),
        labels: BTreeMap::new(),
        reply,
    });
    assert!(matches!(bad, Err(ControlError::BadRequest(_))));

    let rotated = h
        .control(|reply| Control::RotateCredential {
            id: "d1".into(),
            reply,
        })
        .unwrap();
    assert!(h.credentials.check("d1", &rotated) && !h.credentials.check("d1", &secret));
    h.control(|reply| Control::Revoke {
        id: "d1".into(),
        reply,
    })
    .unwrap();
    assert!(!h.credentials.check("d1", &rotated));
    assert!(h.device("d1").revoked());
    // A revoked device can be enrolled again; its history stays.
    let fresh = h.enroll("d1");
    assert!(h.credentials.check("d1", &fresh));
    let missing = h.control(|reply| Control::Revoke {
        id: "zz".into(),
        reply,
    });
    assert_eq!(missing, Err(ControlError::NotFound("device zz".into())));
}

#[test]
fn sequence_numbers_count_loss_and_duplicates_and_rows_are_bounded() {
    let mut h = Harness::new();
    h.enroll("d1");
    // One message per batch: a device is trimmed by whole batches (blocks).
    for seq in [1, 2, 2, 5, 3, 6, 7, 8] {
        let item = h.telemetry("d1", 0, seq, 20.0);
        h.step(vec![item]);
    }
    let d = h.device("d1");
    // 4 was never received; 2 came twice.
    assert_eq!(
        (d.counters.telemetry, d.counters.lost, d.counters.duplicates),
        (7, 1, 1)
    );
    assert_eq!(d.telemetry_rows, 5);
    let seqs: Vec<_> = h
        .store
        .telemetry("d1", 0, u64::MAX, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [8, 7, 6, 3, 5]);
    let c = h.metrics.counts();
    assert_eq!((c.stored["telemetry"], c.lost, c.duplicates), (7, 1, 1));
}

#[test]
fn bad_payloads_are_rejected_and_the_rest_of_the_batch_is_stored() {
    let mut h = Harness::new();
    h.enroll("d1");
    let good1 = h.telemetry("d1", 0, 1, 20.0);
    let good2 = h.telemetry("d1", 0, 2, 20.0);
    let garbage = h.raw(
        "d1",
        Uplink::Telemetry,
        Encoding::Json,
        Bytes::from_static(b"{not json"),
    );
    let invalid = h.raw(
        "d1",
        Uplink::Telemetry,
        Encoding::Json,
        Bytes::from_static(br#"{"seq": 3, "hw": {"cpu_pct": 250}}"#),
    );
    let stranger = h.telemetry("ghost", 0, 1, 20.0);
    h.step(vec![good1, garbage, invalid, stranger, good2]);
    let c = h.metrics.counts();
    assert_eq!(c.stored["telemetry"], 2);
    assert_eq!(c.rejected["undecodable"], 1);
    assert_eq!(c.rejected["invalid"], 1);
    assert_eq!(c.rejected["unknown_device"], 1);
    let d = h.device("d1");
    assert_eq!((d.counters.telemetry, d.counters.rejected), (2, 2));
}

#[test]
fn device_alerts_are_deduplicated_while_unresolved() {
    let mut h = Harness::new();
    h.enroll("d1");
    let thermal = Alert {
        kind: AlertKind::Thermal,
        severity: Severity::Warning,
        value: Some(80.0),
        message: "warm".into(),
        time_ms: 0,
    };
    let hotter = Alert {
        severity: Severity::Critical,
        value: Some(95.0),
        message: "hot".into(),
        ..thermal.clone()
    };
    let oom = Alert {
        kind: AlertKind::OutOfMemory,
        ..thermal.clone()
    };
    let items = vec![
        h.uplink("d1", Uplink::Alert, &thermal),
        h.uplink("d1", Uplink::Alert, &hotter),
        h.uplink("d1", Uplink::Alert, &oom),
    ];
    h.step(items);
    let all = h.store.alerts(&AlertFilter::default(), 100).unwrap();
    assert_eq!(all.len(), 2);
    let t = all.iter().find(|a| a.kind == AlertKind::Thermal).unwrap();
    assert_eq!(
        (t.count, t.severity, t.value, t.message.as_str()),
        (2, Severity::Critical, Some(95.0), "hot")
    );
    let id = t.id;

    let acked = h
        .control(|reply| Control::Alert {
            id,
            action: AlertAction::Acknowledge,
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(acked.state, AlertState::Acknowledged);
    let item = h.uplink("d1", Uplink::Alert, &thermal);
    h.step(vec![item]);
    assert_eq!(
        h.store.alert(id).unwrap().unwrap().count,
        3,
        "acknowledged alerts still fold repeats"
    );
    let resolved = h
        .control(|reply| Control::Alert {
            id,
            action: AlertAction::Resolve,
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(resolved.state, AlertState::Resolved);
    assert_eq!(resolved.resolved.as_ref().unwrap().by, "op");
    let again = h.control(|reply| Control::Alert {
        id,
        action: AlertAction::Resolve,
        by: "op".into(),
        reply,
    });
    assert!(matches!(again, Err(ControlError::Conflict(_))));
    let item = h.uplink("d1", Uplink::Alert, &thermal);
    h.step(vec![item]);
    assert_eq!(
        h.store.alerts(&AlertFilter::default(), 100).unwrap().len(),
        3,
        "a new thermal alert after resolving"
    );
    assert_eq!(h.metrics.counts().stored["alert"], 5);
}

#[test]
fn rule_alerts_open_above_the_threshold_and_clear_below_the_clear_value() {
    let mut h = Harness::new();
    h.enroll("d1");
    let items = vec![
        h.telemetry("d1", 0, 1, 70.0),
        h.telemetry("d1", 0, 2, 90.0),
        h.telemetry("d1", 0, 3, 91.0),
        h.telemetry("d1", 0, 4, 82.0),
    ];
    h.step(items);
    let alerts = h.store.alerts(&AlertFilter::default(), 100).unwrap();
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!(
        (a.kind.clone(), a.state, a.count, a.value),
        (AlertKind::Thermal, AlertState::Open, 2, Some(91.0))
    );
    assert_eq!(
        a.source,
        AlertSource::Rule {
            metric: fleetgate_protocol::HwMetric::TempC
        }
    );
    assert_eq!(a.message, "temp_c 91 above 85");
    // 82 is below the threshold but above `clear` (80): still open.
    let item = h.telemetry("d1", 0, 5, 79.5);
    h.step(vec![item]);
    let a = h.store.alert(a.id).unwrap().unwrap();
    assert_eq!(
        (a.state, a.resolved.map(|r| r.by)),
        (AlertState::Resolved, Some("rule".into()))
    );
}

#[test]
fn logs_are_bounded_per_device() {
    let mut h = Harness::new();
    h.enroll("d1");
    for i in 0..5 {
        let item = h.uplink(
            "d1",
            Uplink::Log,
            &LogLine {
                level: LogLevel::Info,
                text: format!("l{i}"),
                time_ms: 0,
            },
        );
        h.step(vec![item]);
    }
    // A batch's lines are one block, kept whole: at the limit plus at most one batch.
    let burst: Vec<_> = (5..9)
        .map(|i| {
            h.uplink(
                "d1",
                Uplink::Log,
                &LogLine {
                    level: LogLevel::Info,
                    text: format!("l{i}"),
                    time_ms: 0,
                },
            )
        })
        .collect();
    h.step(burst);
    assert_eq!(h.device("d1").log_rows, 4);
    let texts: Vec<_> = h
        .store
        .logs("d1", 10)
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["l8", "l7", "l6", "l5"]);
    assert_eq!(h.device("d1").counters.logs, 9);
}

#[test]
fn commands_go_to_online_devices_and_acks_update_them() {
    let mut h = Harness::new();
    h.enroll("d1");
    h.enroll("d2");
    let offline = h.control(|reply| Control::Command {
        device: "d1".into(),
        action: Action::Ping,
        by: "op".into(),
        reply,
    });
    assert_eq!(
        offline,
        Err(ControlError::Conflict("device d1 is offline".into()))
    );
    let online = vec![h.presence("d1", 7, true), h.presence("d2", 8, true)];
    h.step(online);
    let hello = Hello {
        firmware: fleetgate_protocol::Installed {
            name: "fw".into(),
            version: "1.0.0".parse().unwrap(),
            release: 1,
        },
        models: vec![],
        hardware: fleetgate_protocol::HardwareProfile {
            arch: "x".into(),
            class: "c".into(),
            ram_bytes: 1,
            flash_bytes: 1,
            accelerator: None,
            runtime: None,
        },
        boot: 1,
        telemetry_interval_ms: 1000,
    };
    let Item::Msg(WriterMsg::Uplink(mut m)) = h.uplink("d1", Uplink::Hello, &hello) else {
        unreachable!()
    };
    m.encoding = Encoding::Json;
    m.payload = encode(&hello, Encoding::Json).unwrap().into();
    h.step(vec![Item::Msg(WriterMsg::Uplink(m))]);

    let cmd = h
        .control(|reply| Control::Command {
            device: "d1".into(),
            action: Action::Reboot,
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(cmd.state, CommandState::Sent);
    let sent = h.downlink.try_recv().unwrap();
    assert_eq!(
        (sent.device.as_str(), sent.channel, sent.encoding),
        ("d1", Downlink::Command, Encoding::Json),
        "sent in the encoding of the device's hello"
    );
    let sent: Command = decode(&sent.payload, Encoding::Json).unwrap();
    assert_eq!(
        sent,
        Command {
            id: cmd.id,
            action: Action::Reboot
        }
    );

    let wrong_device = h.uplink(
        "d2",
        Uplink::Ack,
        &CommandAck {
            id: cmd.id,
            status: fleetgate_protocol::AckStatus::Done,
        },
    );
    let right = h.uplink(
        "d1",
        Uplink::Ack,
        &CommandAck {
            id: cmd.id,
            status: fleetgate_protocol::AckStatus::Done,
        },
    );
    h.step(vec![wrong_device, right]);
    assert_eq!(h.metrics.counts().rejected["unknown_command"], 1);
    let stored = h.store.command(cmd.id).unwrap().unwrap();
    assert_eq!(stored.state, CommandState::Done);
    assert!(stored.answered_ms.is_some());
}

#[test]
fn a_replaced_sessions_offline_event_does_not_hide_the_new_session() {
    let mut h = Harness::new();
    h.enroll("d1");
    let items = vec![
        h.presence("d1", 1, true),
        h.presence("d1", 2, true),
        h.presence("d1", 1, false),
    ];
    h.step(items);
    let d = h.device("d1");
    assert!(d.presence.online);
    assert_eq!(d.presence.connections, 2);
    let item = h.presence("d1", 2, false);
    h.step(vec![item]);
    let d = h.device("d1");
    assert!(!d.presence.online);
    assert_eq!(
        d.presence.disconnect_reason.as_deref(),
        Some("connection closed")
    );
}

#[test]
fn state_reloads_after_a_restart() {
    let mut h = Harness::new();
    let secret = h.enroll("d1");
    let items = vec![
        h.presence("d1", 1, true),
        h.telemetry("d1", 4, 10, 90.0),
        h.telemetry("d1", 4, 11, 90.0),
    ];
    h.step(items);
    let clock = h.clock_us;
    let dir = h._dir;
    drop(h.writer);
    drop(h.store);
    let mut h = Harness::open(dir);
    h.clock_us = clock;
    assert!(h.credentials.check("d1", &secret));
    let d = h.device("d1");
    assert_eq!(d.counters.telemetry, 2);
    // Still online in storage until the writer writes again; the reloaded writer knows better.
    let items = vec![
        h.telemetry("d1", 4, 11, 90.0),
        h.telemetry("d1", 4, 12, 90.0),
    ];
    h.step(items);
    let d = h.device("d1");
    assert!(!d.presence.online);
    assert_eq!(
        (d.counters.telemetry, d.counters.duplicates, d.counters.lost),
        (3, 1, 0)
    );
    let alerts = h.store.alerts(&AlertFilter::default(), 100).unwrap();
    assert_eq!(alerts.len(), 1, "the open rule alert is still the same one");
    assert_eq!(alerts[0].count, 3);
}

#[test]
fn unique_keys_never_repeat() {
    let mut last = 0;
    use super::uplink::unique_key;
    assert_eq!(unique_key(&mut last, 100), 100);
    assert_eq!(unique_key(&mut last, 100), 101);
    assert_eq!(unique_key(&mut last, 50), 102);
    assert_eq!(unique_key(&mut last, 500), 500);
}

/// A flood into a database with a quota: the file stays within 1.1 x `storage.max_bytes`, the
/// oldest rows make room (the newest are all there), and every row removed is counted.
#[test]
fn a_flood_keeps_the_database_within_its_quota_oldest_rows_first() {
    const QUOTA: u64 = 4 << 20;
    const DEVICES: u32 = 10;
    let mut c = config();
    c.storage.max_bytes = QUOTA;
    c.retention.telemetry_per_device = 1_000_000;
    let mut h = Harness::open_with(tempfile::tempdir().unwrap(), &c);
    for d in 0..DEVICES {
        h.enroll(&format!("d{d}"));
    }
    let mut seq = 0;
    let mut largest = 0;
    let mut sent = 0u64;
    while h.metrics.storage_quota_rows.get() < 3 * sent / 4 || sent < 20_000 {
        seq += 1;
        let items = (0..DEVICES)
            .flat_map(|d| (0..20).map(move |i| (d, seq * 20 + i)))
            .map(|(d, s)| h.telemetry(&format!("d{d}"), 1, s, 20.0))
            .collect::<Vec<_>>();
        sent += items.len() as u64;
        h.step(items);
        largest = largest.max(h.store.file_size());
        assert!(
            largest as f64 <= QUOTA as f64 * 1.1,
            "after {sent} rows the file is {largest} bytes"
        );
        assert!(sent < 2_000_000, "the quota never took hold");
    }
    let counts = h.store.counts().unwrap();
    assert_eq!(counts.telemetry + h.metrics.storage_quota_rows.get(), sent);
    for d in 0..DEVICES {
        let id = format!("d{d}");
        let rows = h.store.telemetry(&id, 0, u64::MAX, usize::MAX).unwrap();
        assert_eq!(rows.len() as u64, h.device(&id).telemetry_rows, "{id}");
        assert_eq!(rows[0].seq, seq * 20 + 19, "{id}: the newest row is there");
        let seqs: Vec<u32> = rows.iter().map(|r| r.seq).collect();
        let oldest = *seqs.last().unwrap();
        assert_eq!(
            seqs,
            (oldest..=seq * 20 + 19).rev().collect::<Vec<_>>(),
            "{id}: only the oldest went"
        );
    }
}

/// An idle gateway does not write: timers and retention find nothing to change and commit
/// nothing (a commit costs a disk sync on an SD card).
#[test]
fn an_idle_writer_commits_nothing() {
    let mut h = Harness::new();
    h.enroll("d1");
    let item = h.presence("d1", 1, true);
    h.step(vec![item]);
    let before = h.store.commits();
    for _ in 0..5 {
        h.writer.tick().unwrap();
    }
    h.writer.retention();
    h.step(vec![Item::Msg(WriterMsg::FlushMarker(1))]);
    assert_eq!(h.store.commits(), before);
    let item = h.telemetry("d1", 1, 1, 20.0);
    h.step(vec![item]);
    assert_eq!(h.store.commits(), before + 1);
}

impl Harness {
    /// Registers a bundle through the registry, as the API does.
    fn register(&self, bundle: &[u8]) {
        let registry = crate::registry::Registry::new(
            self.store.clone(),
            self._dir.path(),
            &testing::registry_config(),
        );
        registry.register(bundle, now_ms(), "op").unwrap();
    }

    /// Connects `device` (session `session`) and says `hello`, in one batch.
    fn connect(&mut self, device: &str, session: u64, hello: &Hello) {
        let online = self.presence(device, session, true);
        let hi = self.uplink(device, Uplink::Hello, hello);
        self.step(vec![online, hi]);
    }

    /// The commands the writer published so far, decoded.
    fn commands(&self) -> Vec<(String, Command)> {
        self.downlink
            .try_iter()
            .map(|d| (d.device, decode(&d.payload, d.encoding).unwrap()))
            .collect()
    }
}

fn offer(cmd: &Command) -> Option<&fleetgate_protocol::UpdateOffer> {
    match &cmd.action {
        Action::Update(o) => Some(o),
        _ => None,
    }
}

/// Issue 12, defect 6: the same bytes registered for two hardware classes, with different
/// chunk sizes. Each device must be offered the manifest of its own class and get chunks of
/// that manifest; before, the artifact was found by its hash alone, the wrong manifest went
/// out, and sending its chunks indexed past the end and panicked the writer.
#[test]
fn the_same_bytes_for_two_classes_go_out_with_each_class_manifest() {
    let mut h = Harness::new();
    let data = (0..4096u32).map(|i| (i % 251) as u8).collect::<Vec<_>>();
    let now = now_ms();
    h.register(&testing::model_bundle(
        "kws",
        "2.0.0",
        2,
        &["big"],
        data.clone(),
        1024,
        now,
    ));
    h.register(&testing::model_bundle(
        "kws",
        "2.0.0",
        2,
        &["small"],
        data,
        256,
        now,
    ));
    for (i, (device, class)) in [("d-big", "big"), ("d-small", "small")].iter().enumerate() {
        h.enroll(device);
        h.connect(
            device,
            i as u64 + 1,
            &testing::hello(class, ("kws", "1.0.0", 1)),
        );
    }
    let plan = h
        .control(|reply| Control::StartUpdates {
            request: UpdateRequest {
                kind: fleetgate_protocol::ArtifactKind::Model,
                name: "kws".into(),
                version: "2.0.0".into(),
                devices: None,
                allow_downgrade: false,
            },
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(plan.started.len(), 2, "{plan:?}");
    let mut transfers = HashMap::new();
    for (device, cmd) in h.commands() {
        let offer = offer(&cmd).expect("an offer");
        let body = &offer.manifest.body;
        let m: fleetgate_protocol::Manifest = decode(body, Encoding::Postcard).unwrap();
        let class = if device == "d-big" { "big" } else { "small" };
        assert_eq!(
            m.compat.classes,
            [class],
            "{device} got another class's manifest"
        );
        assert_eq!(m.chunk_size, if class == "big" { 1024 } else { 256 });
        transfers.insert(device, offer.transfer);
    }
    assert_eq!(transfers.len(), 2);
    // Both accept from the start: each gets its window of its own chunks.
    let items: Vec<Item> = transfers
        .iter()
        .map(|(device, t)| {
            let report = fleetgate_protocol::UpdateReport {
                transfer: *t,
                state: fleetgate_protocol::UpdateState::Accepted { next_chunk: 0 },
            };
            h.uplink(device, Uplink::Report, &report)
        })
        .collect();
    h.step(items);
    let mut sizes: HashMap<String, Vec<usize>> = HashMap::new();
    for (device, direct) in h.links.take() {
        let chunk: fleetgate_protocol::Chunk = decode(&direct.payload, direct.encoding).unwrap();
        sizes.entry(device).or_default().push(chunk.data.len());
    }
    assert_eq!(sizes["d-big"], vec![1024; 4], "all four chunks of 1024");
    assert_eq!(
        sizes["d-small"],
        vec![256; 8],
        "a window of 8 chunks of 256"
    );
}

/// Issue 12, defect 4: a hello can reach the writer after its connection ended (before,
/// disconnects went straight to the writer and hellos through the broker). It must not bring
/// the device back: no engine counts it online, no offer goes into the void.
#[test]
fn a_hello_of_an_ended_connection_does_not_bring_the_device_back() {
    let mut h = Harness::new();
    let data = vec![7u8; 2048];
    h.register(&testing::model_bundle(
        "kws",
        "2.0.0",
        2,
        &["c"],
        data,
        1024,
        now_ms(),
    ));
    h.enroll("d1");
    let hello = testing::hello("c", ("kws", "1.0.0", 1));
    h.connect("d1", 1, &hello);
    // Connection 1 ends; its hello (sent again on it, say) arrives after the end.
    let late_hello = h.uplink("d1", Uplink::Hello, &hello);
    let offline = h.presence("d1", 1, false);
    h.step(vec![offline, late_hello]);
    assert!(!h.device("d1").presence.online);
    let plan = h
        .control(|reply| Control::StartUpdates {
            request: UpdateRequest {
                kind: fleetgate_protocol::ArtifactKind::Model,
                name: "kws".into(),
                version: "2.0.0".into(),
                devices: None,
                allow_downgrade: false,
            },
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(plan.started.len(), 1);
    assert!(h.commands().is_empty(), "no offer to an offline device");
    let t = h.store.transfers(Some("d1"), 1).unwrap();
    assert_eq!(t[0].state.name(), "queued");
    // Connection 2 says hello: now it is offered.
    h.connect("d1", 2, &hello);
    let sent = h.commands();
    assert_eq!(sent.len(), 1);
    assert!(offer(&sent[0].1).is_some());
}

/// Issue 12, defect 7: after a failed commit the writer reloaded and marked every connected
/// device offline (and emptied the engines' online sets). Now only the sessions whose messages
/// were in the failed batch are failed (they disconnect unacknowledged); everyone else stays
/// connected, in storage and for the engines.
#[test]
fn a_failed_commit_fails_its_sessions_only_and_keeps_everyone_connected() {
    let mut h = Harness::new();
    h.register(&testing::model_bundle(
        "kws",
        "2.0.0",
        2,
        &["c"],
        vec![1u8; 2048],
        1024,
        now_ms(),
    ));
    let hello = testing::hello("c", ("kws", "1.0.0", 1));
    for (i, d) in ["d1", "d2", "d3"].iter().enumerate() {
        h.enroll(d);
        h.connect(d, i as u64 + 1, &hello);
    }
    let receipts = Arc::new(Receipts::default());
    let mut msg = h.telemetry("d2", 1, 1, 20.0);
    if let Item::Msg(WriterMsg::Uplink(m)) = &mut msg {
        m.receipt = Some((receipts.clone(), 1));
    }
    h.store.fail_next_commits(1);
    h.step(vec![msg]);
    assert!(receipts.is_failed(), "d2's session must not acknowledge");
    assert_eq!(receipts.upto(), 0);
    assert_eq!(h.store.telemetry("d2", 0, u64::MAX, 10).unwrap().len(), 0);
    for d in ["d1", "d2", "d3"] {
        assert!(h.device(d).presence.online, "{d} is still connected");
    }
    // The engines still count d1 and d3 online: an update is offered to them at once. d2's
    // hello is owed again (its session is closing), so it waits.
    let plan = h
        .control(|reply| Control::StartUpdates {
            request: UpdateRequest {
                kind: fleetgate_protocol::ArtifactKind::Model,
                name: "kws".into(),
                version: "2.0.0".into(),
                devices: None,
                allow_downgrade: false,
            },
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(plan.started.len(), 3);
    let mut offered: Vec<String> = h.commands().into_iter().map(|(d, _)| d).collect();
    offered.sort();
    assert_eq!(offered, ["d1", "d3"]);
}

/// Issue 12, defect 7: a failed commit of a timer batch did not reload, so what the engines
/// decided in it (state in memory, nothing stored, nothing sent) was lost. Now it reloads
/// and the decision is taken again by the next tick.
#[test]
fn a_failed_timer_commit_is_decided_again() {
    let mut c = config();
    c.updates.stall_timeout = Duration::from_secs(1);
    c.updates.retries = 5;
    let mut h = Harness::open_with(tempfile::tempdir().unwrap(), &c);
    h.register(&testing::model_bundle(
        "kws",
        "2.0.0",
        2,
        &["c"],
        vec![1u8; 2048],
        1024,
        now_ms(),
    ));
    h.enroll("d1");
    h.connect("d1", 1, &testing::hello("c", ("kws", "1.0.0", 1)));
    h.control(|reply| Control::StartUpdates {
        request: UpdateRequest {
            kind: fleetgate_protocol::ArtifactKind::Model,
            name: "kws".into(),
            version: "2.0.0".into(),
            devices: None,
            allow_downgrade: false,
        },
        by: "op".into(),
        reply,
    })
    .unwrap();
    assert_eq!(h.commands().len(), 1, "offered");
    // The device stays silent past the stall timeout: the timer offers again, but that
    // commit fails. The writer reloads and decides again (the device is still connected and
    // said hello): every offer that goes out is one that was committed.
    let now = now_ms() * 1000;
    crate::clock::set_thread_clock(Some(now + 1_100_000));
    h.store.fail_next_commits(1);
    h.writer.tick().unwrap();
    let sent = h.commands().len() as u32;
    let stored = h.store.transfers(Some("d1"), 1).unwrap()[0].offers;
    assert_eq!(
        (sent, stored),
        (1, 2),
        "sent {sent}, stored {stored} offers"
    );
    crate::clock::set_thread_clock(Some(now + 2_200_000));
    h.writer.tick().unwrap();
    crate::clock::set_thread_clock(None);
    assert_eq!(h.commands().len(), 1, "the next stall, the next offer");
    assert_eq!(h.store.transfers(Some("d1"), 1).unwrap()[0].offers, 3);
}

/// Issue 12, defect 3: a rollout whose target matches no device (a label typo) was accepted
/// with nothing to do, stayed running and blocked every other rollout of its model. It is
/// refused with why, and the next rollout of the model goes ahead.
#[test]
fn a_rollout_matching_no_device_is_refused_and_blocks_nothing() {
    let mut h = Harness::new();
    h.register(&testing::model_bundle(
        "kws",
        "2.0.0",
        2,
        &["c"],
        vec![1u8; 2048],
        1024,
        now_ms(),
    ));
    h.enroll("d1");
    h.connect("d1", 1, &testing::hello("c", ("kws", "1.0.0", 1)));
    let request = |target| RolloutRequest {
        kind: fleetgate_protocol::ArtifactKind::Model,
        name: "kws".into(),
        version: "2.0.0".into(),
        target,
        policy: Config::default().rollouts.policy,
        validate: None,
    };
    let typo = crate::rollouts::model::Target::Labels(BTreeMap::from([(
        "site".to_owned(),
        "nrth".to_owned(),
    )]));
    let refused = h.control(|reply| Control::CreateRollout {
        request: Box::new(request(typo)),
        by: "op".into(),
        reply,
    });
    assert_eq!(
        refused.unwrap_err(),
        ControlError::BadRequest(
            "the target matches no enrolled device (check the labels or ids)".into()
        )
    );
    let created = h
        .control(|reply| Control::CreateRollout {
            request: Box::new(request(crate::rollouts::model::Target::All)),
            by: "op".into(),
            reply,
        })
        .unwrap();
    assert_eq!(created.record.planned, 1);
}

/// A batch takes from the queues as the writer applies it: at most `ingest.batch` items
/// (the rest stay queued for the next), operator requests before the messages queued with
/// them, and no waiting once its deadline has passed.
#[test]
fn a_batch_takes_at_most_its_size_with_operator_requests_first() {
    let (msg_tx, msgs) = flume::unbounded();
    let (control_tx, controls) = flume::unbounded();
    for n in 1..=10 {
        msg_tx.send(WriterMsg::FlushMarker(n)).unwrap();
    }
    let (reply, _answer) = oneshot::channel();
    control_tx
        .send(Control::Revoke {
            id: "d1".into(),
            reply,
        })
        .unwrap();
    let first = next_item(&msgs, &controls, Instant::now()).expect("queued");
    let intake = Intake {
        msgs: &msgs,
        controls: &controls,
        buffer: VecDeque::from([first]),
        taken: 1,
        max: 4,
        close_at: Instant::now() + Duration::from_secs(60),
    };
    let taken: Vec<String> = intake
        .map(|item| match item {
            Item::Msg(WriterMsg::FlushMarker(n)) => format!("marker {n}"),
            Item::Control(Control::Revoke { id, .. }) => format!("revoke {id}"),
            _ => "other".into(),
        })
        .collect();
    // The selector takes the operator request first, then the batch fills up to 4.
    assert_eq!(taken, ["revoke d1", "marker 1", "marker 2", "marker 3"]);
    assert_eq!(msgs.len(), 7, "the rest stays queued");

    // Past its deadline, with nothing queued, a batch closes without waiting.
    let (_tx, empty) = flume::unbounded::<WriterMsg>();
    let mut intake = Intake {
        msgs: &empty,
        controls: &controls,
        buffer: VecDeque::new(),
        taken: 1,
        max: 4,
        close_at: Instant::now(),
    };
    assert!(intake.next().is_none());
}
