use std::collections::BTreeMap;

use fleetgate_protocol::{AlertKind, HardwareMetrics, LogLevel, Severity};

use super::*;
use crate::model::{AlertSource, Stamp};

fn row(received_ms: u64, seq: u32) -> TelemetryRow {
    TelemetryRow {
        received_ms,
        boot: 0,
        seq,
        device_time_ms: 0,
        hw: HardwareMetrics {
            temp_c: Some(seq as f32),
            ..Default::default()
        },
        model: None,
        samples: 0,
        binned_features: 0,
    }
}

fn alert(id: u64, device: &str, state: AlertState, severity: Severity) -> AlertRecord {
    AlertRecord {
        id,
        device: device.into(),
        kind: AlertKind::Thermal,
        severity,
        state,
        source: AlertSource::Device,
        opened_ms: 1,
        last_ms: 1,
        count: 1,
        value: None,
        message: String::new(),
        acknowledged: None,
        resolved: (state == AlertState::Resolved).then(|| Stamp {
            at_ms: 1000,
            by: "op".into(),
        }),
    }
}

#[test]
fn devices_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Device::new(
        "d1".into(),
        BTreeMap::from([("site".into(), "a".into())]),
        [7; 32],
        5,
    );
    d.counters.telemetry = 3;
    {
        let store = Store::open(dir.path()).unwrap();
        store.write(|t| t.put_device(&d)).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.device("d1").unwrap(), Some(d.clone()));
    assert_eq!(store.devices().unwrap(), vec![d]);
    assert_eq!(store.device("nope").unwrap(), None);
    let loaded = store.load().unwrap();
    assert_eq!((loaded.next_alert_id, loaded.next_command_id), (1, 1));
}

#[test]
fn telemetry_is_trimmed_to_the_newest_rows_and_read_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rows = 0;
    store
        .write(|t| {
            for i in 1..=5u32 {
                t.insert_telemetry(
                    "d1",
                    u64::from(i) * 1000,
                    &row(u64::from(i), i),
                    3,
                    &mut rows,
                )?;
            }
            t.insert_telemetry("d2", 1000, &row(1, 99), 3, &mut 0)
        })
        .unwrap();
    assert_eq!(rows, 3);
    let seqs = |v: Vec<TelemetryRow>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(store.telemetry("d1", 0, u64::MAX, 100).unwrap()),
        [5, 4, 3]
    );
    assert_eq!(seqs(store.telemetry("d1", 0, u64::MAX, 2).unwrap()), [5, 4]);
    assert_eq!(seqs(store.telemetry("d1", 4000, 5000, 100).unwrap()), [4]);
    assert_eq!(seqs(store.telemetry("d2", 0, u64::MAX, 100).unwrap()), [99]);
    assert_eq!(store.counts().unwrap().telemetry, 4);

    let removed = store
        .write(|t| t.trim_telemetry_before("d1", 5000))
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(seqs(store.telemetry("d1", 0, u64::MAX, 100).unwrap()), [5]);
    let loaded = store.load().unwrap();
    assert!(
        loaded.last_keys.is_empty(),
        "no device records, so no keys loaded"
    );
}

#[test]
fn logs_keep_the_newest_lines() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rows = 0;
    store
        .write(|t| {
            for i in 0..10u64 {
                let line = LogRow {
                    received_ms: i,
                    level: LogLevel::Info,
                    text: format!("line {i}"),
                    device_time_ms: 0,
                };
                t.insert_log("d1", i, &line, 4, &mut rows)?;
            }
            Ok(())
        })
        .unwrap();
    let texts: Vec<_> = store
        .logs("d1", 100)
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["line 9", "line 8", "line 7", "line 6"]);
    assert_eq!(rows, 4);
}

#[test]
fn alerts_filter_and_resolved_ones_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .write(|t| {
            t.put_alert(&alert(1, "d1", AlertState::Resolved, Severity::Info))?;
            t.put_alert(&alert(2, "d1", AlertState::Open, Severity::Critical))?;
            t.put_alert(&alert(3, "d2", AlertState::Acknowledged, Severity::Warning))
        })
        .unwrap();
    let ids = |f: AlertFilter, limit| {
        store
            .alerts(&f, limit)
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(AlertFilter::default(), 100), [3, 2, 1]);
    assert_eq!(ids(AlertFilter::default(), 2), [3, 2]);
    assert_eq!(
        ids(
            AlertFilter {
                device: Some("d1".into()),
                ..Default::default()
            },
            100
        ),
        [2, 1]
    );
    assert_eq!(
        ids(
            AlertFilter {
                state: Some(AlertState::Open),
                ..Default::default()
            },
            100
        ),
        [2]
    );
    assert_eq!(
        ids(
            AlertFilter {
                severity: Some(Severity::Warning),
                ..Default::default()
            },
            100
        ),
        [3]
    );
    let loaded = store.load().unwrap();
    let mut unresolved: Vec<_> = loaded.unresolved_alerts.iter().map(|a| a.id).collect();
    unresolved.sort_unstable();
    assert_eq!(unresolved, [2, 3]);

    assert_eq!(
        store
            .write(|t| t.delete_resolved_alerts_before(999))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .write(|t| t.delete_resolved_alerts_before(1001))
            .unwrap(),
        1
    );
    assert_eq!(ids(AlertFilter::default(), 100), [3, 2]);
}

#[test]
fn a_failed_write_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = Device::new("d1".into(), BTreeMap::new(), [1; 32], 1);
    let result: Result<()> = store.write(|t| {
        t.put_device(&d)?;
        Err(StorageError::NewerSchema { found: 99 })
    });
    assert!(result.is_err());
    assert_eq!(store.device("d1").unwrap(), None);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|t| t.set_meta(META_SCHEMA_VERSION, SCHEMA_VERSION + 1))
            .unwrap();
    }
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StorageError::NewerSchema { found } if found == SCHEMA_VERSION + 1),
        "{err}"
    );
}

#[test]
fn records_refuse_unknown_versions() {
    let d = Device::new("d1".into(), BTreeMap::new(), [1; 32], 1);
    let mut bytes = d.encode();
    assert_eq!(bytes[0], 2);
    assert_eq!(Device::decode(&bytes).unwrap(), d);
    bytes[0] = 3;
    assert!(matches!(
        Device::decode(&bytes),
        Err(RecordError::UnknownVersion {
            kind: "device",
            version: 3
        })
    ));
    assert!(matches!(Device::decode(&[]), Err(RecordError::Empty)));
}

/// A device record the previous gateway wrote (version 1: a 64-wide tracker of one boot)
/// still reads, its tracker carried over.
#[test]
fn a_version_1_device_record_still_reads() {
    #[derive(serde::Serialize)]
    struct TrackerV1 {
        boot: Option<u32>,
        next: u32,
        seen: u64,
    }
    #[derive(serde::Serialize)]
    struct DeviceV1<'a> {
        id: &'a str,
        enrolled_at_ms: u64,
        credential_hash: Option<[u8; 32]>,
        labels: BTreeMap<String, String>,
        presence: &'a crate::model::Presence,
        encoding: fleetgate_protocol::Encoding,
        hello: Option<fleetgate_protocol::Hello>,
        last_hw: Option<HardwareMetrics>,
        counters: &'a crate::model::DeviceCounters,
        seq: TrackerV1,
        telemetry_rows: u64,
        log_rows: u64,
    }
    let mut want = Device::new("d1".into(), BTreeMap::new(), [1; 32], 5);
    want.counters.telemetry = 20;
    want.telemetry_rows = 20;
    let v1 = DeviceV1 {
        id: "d1",
        enrolled_at_ms: 5,
        credential_hash: Some([1; 32]),
        labels: BTreeMap::new(),
        presence: &want.presence,
        encoding: want.encoding,
        hello: None,
        last_hw: None,
        counters: &want.counters,
        // Boot 3 seen up to 9, 8 missing.
        seq: TrackerV1 {
            boot: Some(3),
            next: 10,
            seen: 0b101,
        },
        telemetry_rows: 20,
        log_rows: 0,
    };
    let mut bytes = vec![1];
    bytes.extend(postcard::to_allocvec(&v1).unwrap());
    let mut got = Device::decode(&bytes).unwrap();
    assert_eq!(got.seq.observe(3, 8), crate::seq::SeqOutcome::Late);
    assert_eq!(got.seq.observe(3, 9), crate::seq::SeqOutcome::Duplicate);
    got.seq = want.seq.clone();
    assert_eq!(got, want);
}
