use std::sync::Arc;
use std::time::Duration;

use fleetgate_config::Config;

use super::*;
use crate::broker::DownlinkTx;
use crate::broker::front::Sessions;
use crate::metrics::Metrics;
use crate::storage::Store;

fn writer(dir: &std::path::Path) -> Writer {
    let store = Store::open(dir).unwrap();
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
