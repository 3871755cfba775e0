use std::sync::Arc;
use std::time::Duration;

use fleetgate_config::Config;

use super::*;
use crate::broker::DownlinkTx;
use crate::broker::front::Sessions;
use crate::metrics::Metrics;
use crate::storage::Store;

fn writer(dir: &std::path::Path) -> Writer {
    writer_on(Store::open(dir).unwrap())
}

fn writer_on(store: Store) -> Writer {
    let (downlink, _rx) = DownlinkTx::detached(8);
    Writer::new(
        store,
        &Config::default(),
        Arc::new(crate::auth::Credentials::default()),
        Arc::new(Sessions::default()),
        downlink,
        Arc::new(Metrics::new(Duration::from_secs(3600))),
    )
    .unwrap()
}

/// Issue 13: each new (model, version) a device named added a permanent cache entry and a
/// registry lookup; 40 KiB versions at 50 msg/s filled a 512 MB host in minutes. Versions are
/// now at most 64 bytes (protocol limits) and "no baseline" answers are kept up to a bound.
#[test]
fn versions_without_a_baseline_are_remembered_up_to_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    for i in 0..10_000u64 {
        let version = Version::new(1, 0, i);
        assert!(w.baseline("kws", &version).is_none());
        assert!(w.drift.known_versions() <= MAX_UNKNOWN_VERSIONS, "{i}");
    }
    // A repeat within the bound is answered from the cache.
    let v = Version::new(2, 0, 0);
    w.baseline("kws", &v);
    assert!(w.drift.knows("kws", &v));
    w.baseline("kws", &v);
    assert!(w.drift.known_versions() <= MAX_UNKNOWN_VERSIONS);
}

/// Issue 14: the open window was lost on restart. The writer saves the changed streams each
/// tick; a new writer on the same database continues the window where it was.
#[test]
fn the_open_window_survives_a_restart() {
    use crate::drift::baseline::FeatureBaseline;
    use crate::model::{ReleaseRecord, Stamp};
    use fleetgate_protocol::{ArtifactKind, InputSample, ModelMetrics};

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let values: Vec<f64> = (0..1000).map(|i| f64::from(i) / 100.0).collect();
    let v = Version::new(1, 0, 0);
    let release = ReleaseRecord {
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: v.clone(),
        release: 1,
        registered: Stamp {
            at_ms: 0,
            by: "test".into(),
        },
        lineage: Default::default(),
        tags: vec![],
        artifacts: vec![],
        baseline: Some(Baseline {
            features: vec![FeatureBaseline::build("x", &values, 10).unwrap()],
            prediction: None,
        }),
    };
    store.write(|t| t.put_release(&release)).unwrap();
    let tel = Telemetry {
        boot: 0,
        seq: 0,
        time_ms: 0,
        hw: Default::default(),
        model: Some(ModelMetrics {
            name: "kws".into(),
            version: v.clone(),
            inferences: 0,
            class_counts: vec![],
            mean_confidence: None,
        }),
        samples: (0..100)
            .map(|i| InputSample {
                values: vec![i as f32 / 10.0],
                prediction: None,
                confidence: None,
            })
            .collect(),
        bins: vec![],
    };
    let key = StreamKey {
        model: "kws".into(),
        version: v.clone(),
        cohort: ALL.into(),
    };
    let mut w = writer_on(store.clone());
    store
        .write(|t| {
            for i in 0..5 {
                w.drift_observe(t, "d1", &tel, i)?;
            }
            w.drift_tick(t, 10)
        })
        .unwrap();
    assert_eq!(w.drift.stream(&key).unwrap().features[0].open_samples, 500);
    drop(w);
    let mut w = writer_on(store.clone());
    store.write(|t| w.drift_observe(t, "d1", &tel, 20)).unwrap();
    let view = w.drift.stream(&key).unwrap();
    assert_eq!(view.features[0].open_samples, 600);
    assert_eq!(view.features[0].opened_ms, 0);
}
