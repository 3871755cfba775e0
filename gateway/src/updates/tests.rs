use fleetgate_protocol::{ArtifactKind, UpdateError};
use semver::Version;

use super::*;
use crate::model::Stamp;

const W: u32 = 4;

fn engine(max_concurrent: usize) -> Engine {
    Engine::new(Settings {
        window: W,
        max_concurrent,
        stall_ms: 1000,
        retries: 2,
    })
}

fn record(id: u64, device: &str, chunks: u64) -> TransferRecord {
    TransferRecord {
        id,
        device: device.into(),
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::new(2, 0, 0),
        release: 2,
        sha256: [0; 32],
        size: chunks * 100,
        chunks,
        state: TransferState::Queued,
        next_chunk: 0,
        chunks_sent: 0,
        chunks_resent: 0,
        offers: 0,
        created: Stamp {
            at_ms: 0,
            by: "op".into(),
        },
        updated_ms: 0,
        finished_ms: None,
    }
}

fn report(device: &str, transfer: u64, state: UpdateState) -> Event {
    Event::Report {
        device: device.into(),
        report: UpdateReport { transfer, state },
    }
}

/// The offers and sends among `actions`, without the saves.
fn wire(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Save(_)))
        .cloned()
        .collect()
}

fn state(e: &Engine, id: u64) -> &'static str {
    e.transfer(id).map_or("gone", |r| r.state.name())
}

#[test]
fn a_download_runs_a_window_ahead_of_the_device() {
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    let a = e.on_event(Event::Start(record(1, "d1", 10)), 0).unwrap();
    assert_eq!(wire(&a), [Action::Offer { id: 1 }]);
    assert!(
        matches!(&a[0], Action::Save(r) if r.state == TransferState::Queued),
        "saved before it is offered"
    );
    let a = e
        .on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 0 }), 1)
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 0,
            to: 4
        }]
    );
    let a = e
        .on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: 1 }),
            2,
        )
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 4,
            to: 5
        }]
    );
    let a = e
        .on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: 3 }),
            3,
        )
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 5,
            to: 7
        }]
    );
    let a = e
        .on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: 3 }),
            4,
        )
        .unwrap();
    assert_eq!(wire(&a), [], "a repeated report sends nothing new");
    for next in 4..=10 {
        e.on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: next }),
            5,
        )
        .unwrap();
    }
    let r = e.transfer(1).unwrap();
    assert_eq!(
        (r.state.name(), r.next_chunk, r.chunks_sent, r.chunks_resent),
        ("downloading", 10, 10, 0)
    );
    e.on_event(report("d1", 1, UpdateState::Verifying), 6)
        .unwrap();
    e.on_event(report("d1", 1, UpdateState::Installing), 7)
        .unwrap();
    let a = e
        .on_event(
            report(
                "d1",
                1,
                UpdateState::Installed {
                    version: Version::new(2, 0, 0),
                    release: 2,
                },
            ),
            8,
        )
        .unwrap();
    let Some(Action::Save(last)) = a.last() else {
        panic!("{a:?}")
    };
    assert_eq!(
        (last.state.name(), last.finished_ms),
        ("installed", Some(8))
    );
    assert_eq!(state(&e, 1), "gone");
    assert!(e.transfer_of("d1").is_none());
}

#[test]
fn a_device_that_drops_out_resumes_where_it_says() {
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    e.on_event(Event::Start(record(1, "d1", 10)), 0).unwrap();
    e.on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 0 }), 1)
        .unwrap();
    for next in 1..=5 {
        e.on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: next }),
            2,
        )
        .unwrap();
    }
    // Sent up to 9 (5 + window 4); the device stored 0..5 and drops off.
    e.on_event(Event::Offline("d1".into()), 3).unwrap();
    assert_eq!(state(&e, 1), "queued");
    assert_eq!(e.active(), 0, "an offline device holds no slot");
    let a = e.on_event(Event::Online("d1".into()), 4).unwrap();
    assert_eq!(
        wire(&a),
        [Action::Offer { id: 1 }],
        "offered again as soon as it is back"
    );
    let a = e
        .on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 5 }), 5)
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 5,
            to: 9
        }]
    );
    let r = e.transfer(1).unwrap();
    assert_eq!((r.offers, r.chunks_resent, r.chunks_sent), (2, 4, 13));
}

/// The offline event overtook the last download report of the connection that ended: the
/// report changes nothing, and the device's next hello gets the offer again.
#[test]
fn a_download_report_that_arrives_after_the_offline_event_is_ignored() {
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    e.on_event(Event::Start(record(1, "d1", 10)), 0).unwrap();
    e.on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 0 }), 1)
        .unwrap();
    e.on_event(Event::Offline("d1".into()), 2).unwrap();
    let late = e
        .on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: 4 }),
            3,
        )
        .unwrap();
    assert_eq!(late, []);
    assert_eq!(state(&e, 1), "queued");
    let a = e.on_event(Event::Online("d1".into()), 4).unwrap();
    assert_eq!(wire(&a), [Action::Offer { id: 1 }]);
    // A final outcome is taken even from an offline device: it is the device's last word.
    e.on_event(Event::Offline("d1".into()), 5).unwrap();
    e.on_event(
        report(
            "d1",
            1,
            UpdateState::Installed {
                version: Version::new(2, 0, 0),
                release: 2,
            },
        ),
        6,
    )
    .unwrap();
    assert_eq!(state(&e, 1), "gone");
}

#[test]
fn slots_limit_concurrent_downloads_and_free_up_in_order() {
    let mut e = engine(2);
    for d in ["a", "b", "c"] {
        e.on_event(Event::Online(d.into()), 0).unwrap();
    }
    let offered: Vec<_> = [(1, "a"), (2, "b"), (3, "c")]
        .into_iter()
        .flat_map(|(id, d)| wire(&e.on_event(Event::Start(record(id, d, 3)), 0).unwrap()))
        .collect();
    assert_eq!(offered, [Action::Offer { id: 1 }, Action::Offer { id: 2 }]);
    assert_eq!((state(&e, 3), e.active()), ("queued", 2));
    let a = e
        .on_event(
            report(
                "a",
                1,
                UpdateState::Rejected {
                    reason: UpdateError::Downgrade,
                    detail: "x".into(),
                },
            ),
            1,
        )
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Offer { id: 3 }],
        "the freed slot goes to the next in line"
    );
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Save(r) if r.id == 1 && r.state.name() == "rejected"))
    );
    // An offline device in line is skipped until it is back.
    e.on_event(Event::Offline("c".into()), 2).unwrap();
    e.on_event(Event::Online("d".into()), 2).unwrap();
    let a = e.on_event(Event::Start(record(4, "d", 3)), 2).unwrap();
    assert_eq!(wire(&a), [Action::Offer { id: 4 }]);
}

#[test]
fn silent_devices_are_offered_again_then_time_out() {
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    e.on_event(Event::Start(record(1, "d1", 3)), 0).unwrap();
    assert_eq!(wire(&e.on_event(Event::Tick, 999).unwrap()), []);
    assert_eq!(
        wire(&e.on_event(Event::Tick, 1000).unwrap()),
        [Action::Offer { id: 1 }]
    );
    assert_eq!(
        wire(&e.on_event(Event::Tick, 2000).unwrap()),
        [Action::Offer { id: 1 }]
    );
    let a = e.on_event(Event::Tick, 3000).unwrap();
    assert_eq!(wire(&a), []);
    assert!(
        matches!(a.last(), Some(Action::Save(r)) if r.state == TransferState::TimedOut && r.offers == 3)
    );
    assert_eq!(state(&e, 1), "gone");
}

#[test]
fn refusals() {
    let mut e = engine(10);
    e.on_event(Event::Start(record(1, "d1", 3)), 0).unwrap();
    assert_eq!(
        e.on_event(Event::Start(record(2, "d1", 3)), 0),
        Err(Refused::Busy("d1".into(), 1))
    );
    assert_eq!(
        e.on_event(report("d1", 7, UpdateState::Verifying), 0),
        Err(Refused::UnknownTransfer {
            device: "d1".into(),
            transfer: 7
        })
    );
    assert_eq!(
        e.on_event(report("d2", 1, UpdateState::Verifying), 0),
        Err(Refused::UnknownTransfer {
            device: "d2".into(),
            transfer: 1
        }),
        "a device cannot report on another device's transfer"
    );
    let a = e
        .on_event(
            Event::Cancel {
                id: 1,
                by: "op".into(),
            },
            5,
        )
        .unwrap();
    assert!(
        matches!(a.last(), Some(Action::Save(r)) if r.state == TransferState::Cancelled { by: "op".into() })
    );
    assert_eq!(
        e.on_event(
            Event::Cancel {
                id: 1,
                by: "op".into()
            },
            5
        ),
        Err(Refused::NotLive(1))
    );
}

#[test]
fn a_reloaded_transfer_waits_for_its_device() {
    let mut e = engine(10);
    let mut r = record(1, "d1", 10);
    r.state = TransferState::Downloading;
    r.next_chunk = 6;
    e.on_event(Event::Start(r), 0).unwrap();
    assert_eq!(state(&e, 1), "queued");
    assert_eq!(
        wire(&e.on_event(Event::Online("d1".into()), 1).unwrap()),
        [Action::Offer { id: 1 }]
    );
    let a = e
        .on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 6 }), 2)
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 6,
            to: 10
        }]
    );
}

#[test]
fn a_transfer_with_its_own_limits_times_out_by_them() {
    // The gateway: 1 s and 2 retries; this transfer (a rollout stage's): 5 s and none.
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    e.on_event(Event::Online("d2".into()), 0).unwrap();
    let limits = Limits {
        stall_ms: 5000,
        retries: 0,
    };
    e.on_event(Event::StartLimited(record(1, "d1", 4), limits), 0)
        .unwrap();
    e.on_event(Event::Start(record(2, "d2", 4)), 0).unwrap();
    let a = e.on_event(Event::Tick, 1000).unwrap();
    assert_eq!(
        wire(&a),
        [Action::Offer { id: 2 }],
        "only the gateway's 1 s passed"
    );
    assert_eq!(state(&e, 1), "offered");
    let a = e.on_event(Event::Tick, 5000).unwrap();
    assert!(
        a.iter().any(
            |a| matches!(a, Action::Save(r) if r.id == 1 && r.state == TransferState::TimedOut)
        ),
        "{a:?}"
    );
    assert_eq!(state(&e, 1), "gone");
}

/// A device that lost its connection mid-download sends again, on its new connection, the
/// download reports that were not acknowledged. One of them arriving after the new offer is
/// from the old offer: only the device's `accepted` says where it stands, and nothing is sent
/// twice because of the stale one.
#[test]
fn a_download_report_from_before_the_offer_sends_nothing() {
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    e.on_event(Event::Start(record(1, "d1", 20)), 0).unwrap();
    e.on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 0 }), 1)
        .unwrap();
    for next in 1..=8 {
        e.on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: next }),
            2,
        )
        .unwrap();
    }
    e.on_event(Event::Offline("d1".into()), 3).unwrap();
    let a = e.on_event(Event::Online("d1".into()), 4).unwrap();
    assert_eq!(wire(&a), [Action::Offer { id: 1 }]);
    let stale = e
        .on_event(
            report("d1", 1, UpdateState::Downloading { next_chunk: 5 }),
            5,
        )
        .unwrap();
    assert_eq!(wire(&stale), [], "a report of the old offer");
    assert_eq!(state(&e, 1), "offered");
    let a = e
        .on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 9 }), 6)
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 9,
            to: 13
        }]
    );
    assert_eq!(
        e.transfer(1).unwrap().chunks_resent,
        3,
        "12 went out before the cut"
    );
}

proptest::proptest! {
    /// Whatever happens, the engine's indexes (slots in use, transfers waiting) match a count
    /// from scratch, and no more transfers hold a slot than allowed.
    #[test]
    fn the_indexes_follow_every_event(events in proptest::collection::vec((0u8..9, 0u8..4, 0u32..12), 1..120)) {
        let mut e = engine(2);
        let mut next = 1u64;
        for (i, (what, device, n)) in events.into_iter().enumerate() {
            let d = format!("d{device}");
            let id = e.transfer_of(&d).map(|r| r.id).unwrap_or(0);
            let now = i as u64 * 400;
            let event = match what {
                0 => {
                    next += 1;
                    Event::Start(record(next, &d, 10))
                }
                1 => Event::Online(d.clone()),
                2 => Event::Offline(d.clone()),
                3 => report(&d, id, UpdateState::Accepted { next_chunk: n }),
                4 => report(&d, id, UpdateState::Downloading { next_chunk: n }),
                5 => report(&d, id, UpdateState::Installing),
                6 => report(&d, id, UpdateState::Installed { version: Version::new(2, 0, 0), release: 2 }),
                7 => Event::Cancel { id, by: "op".into() },
                _ => Event::Tick,
            };
            let _ = e.on_event(event, now);
            e.check_indexes();
            proptest::prop_assert!(e.active() <= 2);
        }
    }
}

/// Issue 12, defect 10: chunks re-sent after a gateway restart were not counted. The engine
/// restarted its count of chunks sent from the device's last reported position, so when the
/// device accepted the new offer from there, the chunks it had already been sent (up to the
/// window beyond that position) went out again with `chunks_resent` still 0.
#[test]
fn chunks_sent_before_a_restart_and_sent_again_count_as_resent() {
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 0).unwrap();
    e.on_event(Event::Start(record(1, "d1", 10)), 0).unwrap();
    e.on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 0 }), 1)
        .unwrap();
    e.on_event(
        report("d1", 1, UpdateState::Downloading { next_chunk: 2 }),
        2,
    )
    .unwrap();
    let before = e.transfer(1).unwrap().clone();
    assert_eq!((before.next_chunk, before.chunks_sent), (2, 6));

    // The gateway restarts: the stored record comes back, and the device accepts the new
    // offer where it stands.
    let mut e = engine(10);
    e.on_event(Event::Online("d1".into()), 10).unwrap();
    e.on_event(Event::Start(before), 10).unwrap();
    let a = e
        .on_event(report("d1", 1, UpdateState::Accepted { next_chunk: 2 }), 11)
        .unwrap();
    assert_eq!(
        wire(&a),
        [Action::Send {
            id: 1,
            from: 2,
            to: 6
        }]
    );
    let r = e.transfer(1).unwrap();
    assert_eq!(
        (r.chunks_sent, r.chunks_resent),
        (10, 4),
        "chunks 2..6 went out before the restart"
    );
}
