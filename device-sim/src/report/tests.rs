//! Tests of the run report: rollback counts by reason and the times directives arrived.

use fleetgate_protocol::RollbackError;

use super::*;

#[test]
fn rollbacks_are_counted_by_reason_with_first_and_last_arrival() {
    let c = Counters::default();
    let quiet = Report::from_counters(1, 1, &c, Duration::from_secs(1));
    assert_eq!(
        (quiet.first_rollback_ms, quiet.last_rollback_ms),
        (None, None)
    );
    assert!(!quiet.to_string().contains("rollbacks:"), "{quiet}");

    for ms in [1_700_000_000_500, 1_700_000_000_100, 1_700_000_000_900] {
        c.rollback_received(ms);
    }
    c.bump(&c.rollbacks_done, 2);
    c.rollback_rejected(RollbackError::NotRunning);
    c.rollback_rejected(RollbackError::Expired);
    c.rollback_rejected(RollbackError::NotRunning);
    let r = Report::from_counters(3, 3, &c, Duration::from_secs(1));
    assert_eq!(
        (r.first_rollback_ms, r.last_rollback_ms),
        (Some(1_700_000_000_100), Some(1_700_000_000_900))
    );
    assert_eq!((r.rollbacks.done, r.rollbacks.rejected), (2, 3));
    let text = r.to_string();
    assert!(
        text.contains(
            "rollbacks: 2 done, 3 rejected (expired 1, not_running 2); \
             directives received over 800 ms"
        ),
        "{text}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["rollbacks"],
        serde_json::json!({"done": 2, "rejected": 3, "rejected_by": {"expired": 1, "not_running": 2}})
    );
    assert_eq!(json["first_rollback_ms"], 1_700_000_000_100u64);
    assert_eq!(json["last_rollback_ms"], 1_700_000_000_900u64);
}
