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

fn encoded(rows: impl IntoIterator<Item = (u64, TelemetryRow)>) -> Vec<(u64, Vec<u8>)> {
    rows.into_iter().map(|(k, r)| (k, r.encode())).collect()
}

fn seqs(v: Vec<TelemetryRow>) -> Vec<u32> {
    v.into_iter().map(|r| r.seq).collect()
}

#[test]
fn telemetry_blocks_read_newest_first_by_time_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // d1: two batches (blocks), d2: one.
    store
        .write(|t| {
            let first = (1..=3u32).map(|i| (u64::from(i) * 1000, row(u64::from(i), i)));
            t.append_rows(Stream::Telemetry, "d1", &encoded(first))?;
            t.append_rows(Stream::Telemetry, "d2", &encoded([(1000, row(1, 99))]))
        })
        .unwrap();
    store
        .write(|t| {
            let second = (4..=5u32).map(|i| (u64::from(i) * 1000, row(u64::from(i), i)));
            t.append_rows(Stream::Telemetry, "d1", &encoded(second))
        })
        .unwrap();
    assert_eq!(
        seqs(store.telemetry("d1", 0, u64::MAX, 100).unwrap()),
        [5, 4, 3, 2, 1]
    );
    assert_eq!(seqs(store.telemetry("d1", 0, u64::MAX, 2).unwrap()), [5, 4]);
    assert_eq!(
        seqs(store.telemetry("d1", 2000, 5000, 100).unwrap()),
        [4, 3, 2]
    );
    assert_eq!(seqs(store.telemetry("d1", 3500, 4001, 100).unwrap()), [4]);
    assert_eq!(seqs(store.telemetry("d2", 0, u64::MAX, 100).unwrap()), [99]);
    assert_eq!(
        seqs(store.telemetry("d3", 0, u64::MAX, 100).unwrap()),
        Vec::<u32>::new()
    );
    let counts = store.counts().unwrap();
    assert_eq!((counts.telemetry, counts.logs), (6, 0));
    assert!(counts.row_bytes > 0);
}

#[test]
fn a_device_is_trimmed_by_whole_blocks_to_at_least_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rows = 0u64;
    // Five batches of two rows: keys 1000..=10000.
    for batch in 0..5u64 {
        store
            .write(|t| {
                let new = (1..=2u64).map(|i| {
                    let k = (batch * 2 + i) * 1000;
                    (k, row(k / 1000, (k / 1000) as u32))
                });
                t.append_rows(Stream::Telemetry, "d1", &encoded(new))?;
                rows += 2;
                t.trim_device(Stream::Telemetry, "d1", 5, &mut rows)
            })
            .unwrap();
    }
    // Blocks go whole and only while 5 remain: 6 rows (3 blocks) stay.
    assert_eq!(rows, 6);
    assert_eq!(
        seqs(store.telemetry("d1", 0, u64::MAX, 100).unwrap()),
        [10, 9, 8, 7, 6, 5]
    );
    assert_eq!(store.counts().unwrap().telemetry, 6);
    // One block that alone holds more than the limit stays whole.
    let mut big = 0u64;
    store
        .write(|t| {
            let many = (1..=20u64).map(|i| (i, row(i, i as u32)));
            t.append_rows(Stream::Telemetry, "d2", &encoded(many))?;
            big = 20;
            t.trim_device(Stream::Telemetry, "d2", 5, &mut big)
        })
        .unwrap();
    assert_eq!(big, 20);
}

#[test]
fn the_oldest_rows_of_all_devices_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .write(|t| {
            t.append_rows(Stream::Telemetry, "old", &encoded([(1000, row(1, 1))]))?;
            t.append_rows(Stream::Telemetry, "new", &encoded([(3000, row(3, 3))]))?;
            let line = LogRow {
                received_ms: 2,
                level: LogLevel::Info,
                text: "middle".into(),
                device_time_ms: 0,
            };
            t.append_rows(Stream::Logs, "old", &[(2000, line.encode())])
        })
        .unwrap();
    // By age: telemetry that started before 2500 us only.
    let removed = store
        .write(|t| t.remove_oldest(u64::MAX, 2500, Some(Stream::Telemetry)))
        .unwrap();
    assert_eq!(
        removed
            .iter()
            .map(|r| (r.stream, r.device.as_str(), r.rows))
            .collect::<Vec<_>>(),
        [(Stream::Telemetry, "old", 1)]
    );
    assert_eq!(
        store.logs("old", 10).unwrap().len(),
        1,
        "logs have no age rule"
    );
    // By bytes: one byte to free takes the oldest block, the log line.
    let removed = store.write(|t| t.remove_oldest(1, u64::MAX, None)).unwrap();
    assert_eq!(
        removed
            .iter()
            .map(|r| (r.stream, r.device.as_str(), r.rows))
            .collect::<Vec<_>>(),
        [(Stream::Logs, "old", 1)]
    );
    assert_eq!(seqs(store.telemetry("new", 0, u64::MAX, 10).unwrap()), [3]);
    let counts = store.counts().unwrap();
    assert_eq!((counts.telemetry, counts.logs), (1, 0));
    let last = store
        .write(|t| t.remove_oldest(u64::MAX, u64::MAX, None))
        .unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        store.counts().unwrap().row_bytes,
        0,
        "the totals follow the blocks"
    );
}

#[test]
fn logs_read_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .write(|t| {
            let lines: Vec<(u64, Vec<u8>)> = (0..10u64)
                .map(|i| {
                    let line = LogRow {
                        received_ms: i,
                        level: LogLevel::Info,
                        text: format!("line {i}"),
                        device_time_ms: 0,
                    };
                    (i, line.encode())
                })
                .collect();
            t.append_rows(Stream::Logs, "d1", &lines)
        })
        .unwrap();
    let texts: Vec<_> = store
        .logs("d1", 4)
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(texts, ["line 9", "line 8", "line 7", "line 6"]);
}

/// A database of schema 1 (one row per message) opens: its rows move into blocks and read the
/// same, and its counts are right.
#[test]
fn a_schema_1_database_is_migrated_into_blocks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_SCHEMA_VERSION, 1).unwrap();
            meta.insert(META_NEXT_ALERT_ID, 1).unwrap();
            let mut tel = txn.open_table(TELEMETRY_V1).unwrap();
            for i in 1..=300u64 {
                tel.insert(("d1", i * 10), row(i, i as u32).encode().as_slice())
                    .unwrap();
            }
            tel.insert(("d2", 5), row(1, 7).encode().as_slice())
                .unwrap();
            let mut logs = txn.open_table(LOGS_V1).unwrap();
            let line = LogRow {
                received_ms: 1,
                level: LogLevel::Warn,
                text: "kept".into(),
                device_time_ms: 0,
            };
            logs.insert(("d1", 1), line.encode().as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let all = store.telemetry("d1", 0, u64::MAX, 1000).unwrap();
    assert_eq!(all.len(), 300);
    assert_eq!(all[0].seq, 300);
    assert_eq!(all[299].seq, 1);
    assert_eq!(seqs(store.telemetry("d2", 0, u64::MAX, 10).unwrap()), [7]);
    assert_eq!(store.logs("d1", 10).unwrap()[0].text, "kept");
    let counts = store.counts().unwrap();
    assert_eq!((counts.telemetry, counts.logs), (301, 1));
    // Opened again, nothing moves twice.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.counts().unwrap().telemetry, 301);
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
