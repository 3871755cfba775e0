//! The site's heartbeat: what a central consumer needs to list sites and see each at a glance
//! (devices and what they run per hardware class, unresolved alerts, rollouts, the outbox),
//! read from one storage snapshot. Published retained, so a consumer that subscribes later
//! sees every site's last one at once.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::clock::rfc3339;
use crate::model::AlertState;
use crate::storage::{AlertFilter, Store};

/// Newest rollouts looked at for the heartbeat.
const ROLLOUTS: usize = 100;

/// One hardware class: devices, and how many run each firmware and each model ("name version").
type Class = (u64, BTreeMap<String, u64>, BTreeMap<String, u64>);

/// The heartbeat's JSON. Blocking (reads storage).
pub fn heartbeat(store: &Store, site: &str, now_ms: u64) -> crate::storage::Result<Value> {
    let devices = store.devices()?;
    let (mut enrolled, mut online) = (0u64, 0u64);
    let mut classes: BTreeMap<String, Class> = BTreeMap::new();
    for d in &devices {
        if d.revoked() {
            continue;
        }
        enrolled += 1;
        online += u64::from(d.presence.online);
        let Some(h) = &d.hello else {
            let c = classes.entry("unknown".to_owned()).or_default();
            c.0 += 1;
            continue;
        };
        let c = classes.entry(h.hardware.class.clone()).or_default();
        c.0 += 1;
        *c.1.entry(format!("{} {}", h.firmware.name, h.firmware.version))
            .or_default() += 1;
        for m in &h.models {
            *c.2.entry(format!("{} {}", m.name, m.version)).or_default() += 1;
        }
    }
    let classes: BTreeMap<String, Value> = classes
        .into_iter()
        .map(|(class, (n, firmware, models))| {
            (
                class,
                json!({ "devices": n, "firmware": firmware, "models": models }),
            )
        })
        .collect();
    let mut alerts = BTreeMap::from([("info", 0u64), ("warning", 0), ("critical", 0)]);
    for state in [AlertState::Open, AlertState::Acknowledged] {
        let filter = AlertFilter {
            state: Some(state),
            ..AlertFilter::default()
        };
        for a in store.alerts(&filter, usize::MAX)? {
            *alerts.entry(a.severity.name()).or_default() += 1;
        }
    }
    let mut active = Vec::new();
    let mut recent: BTreeMap<&str, u64> = BTreeMap::new();
    for r in store.rollouts(ROLLOUTS)? {
        *recent.entry(r.state.name()).or_default() += 1;
        if r.state.is_active() {
            active.push(json!({
                "rollout": r.id,
                "kind": r.kind.name(),
                "name": r.name,
                "version": r.version.to_string(),
                "state": r.state.name(),
                "stage": r.stage + 1,
                "stages": r.policy.stages.len(),
                "planned": r.planned,
            }));
        }
    }
    let (backlogs, totals) = super::metrics::backlogs(store, now_ms)?;
    Ok(json!({
        "site": site,
        "at": rfc3339(now_ms),
        "gateway": { "version": env!("CARGO_PKG_VERSION") },
        "devices": { "enrolled": enrolled, "online": online },
        "classes": classes,
        "alerts": alerts,
        "rollouts": { "active": active, "recent": recent },
        "outbox": { "streams": totals, "destinations": backlogs },
    }))
}
