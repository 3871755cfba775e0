use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;

use super::script::*;
use super::sessions;

/// Runs `bytes` on a thread of its own: a script that never finishes (a task that spins keeps
/// the paused clock from moving) fails instead of hanging the suite. The bound is real time,
/// far above what any script takes (a few milliseconds).
fn run(bytes: &[u8]) -> Result<super::Outcome, String> {
    let (tx, rx) = mpsc::channel();
    let input = bytes.to_vec();
    std::thread::spawn(move || {
        let _ = tx.send(sessions(&input));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| Err("the script did not finish within 60 s of real time".into()))
}

/// A failing script, one operation a line, and its bytes (for `fuzz/regressions/sessions/`).
fn describe(bytes: &[u8]) -> String {
    let script = Script::decode(bytes);
    let mut out = format!("{:?}\n", script.settings);
    for (i, op) in script.ops.iter().enumerate() {
        out += &format!("{i:3}: {op:?}\n");
    }
    out + &format!("bytes: {:?}", script.encode())
}

fn script(settings: Settings, ops: Vec<Op>) -> Vec<u8> {
    let bytes = Script { settings, ops }.encode();
    // What the tests write is what the fuzzer reads.
    assert_eq!(Script::decode(&bytes).encode(), bytes);
    bytes
}

/// A CONNECT of `d1` with the right password and its own client id, keep alive 30 s.
fn connect(slot: u8, v5: bool) -> Op {
    Op::Connect {
        slot,
        level: if v5 { 1 } else { 0 },
        user: 0,
        password: 0,
        client_id: 1,
        keep_alive: 4,
        will: 0,
    }
}

/// A publish of `d1` with the next packet id.
fn publish(slot: u8, qos: u8, topic: u8, payload: u8) -> Op {
    Op::Publish {
        slot,
        qos,
        topic,
        payload,
        pkid: 0,
        flags: 0,
    }
}

const TELEMETRY: u8 = 0;
const ALERT: u8 = 5;
const JSON: u8 = 0;
const ARRAY: u8 = 3;
const COMMIT: u8 = 0;
const FAIL: u8 = 3;

#[test]
fn an_empty_script_runs() {
    let outcome = run(&[]).unwrap();
    assert_eq!(outcome, super::Outcome::default());
}

#[test]
fn every_script_decodes_to_one_that_encodes_back() {
    let mut x: u32 = 1;
    for _ in 0..200 {
        let bytes: Vec<u8> = (0..300)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let s = Script::decode(&bytes);
        assert_eq!(Script::decode(&s.encode()), s);
    }
}

#[test]
fn committed_publishes_are_acknowledged_in_order_and_the_session_ends_on_disconnect() {
    for v5 in [false, true] {
        let bytes = script(
            Settings::default(),
            vec![
                connect(0, v5),
                publish(0, 1, TELEMETRY, JSON),
                publish(0, 2, TELEMETRY, JSON),
                publish(0, 0, TELEMETRY, JSON),
                Op::Writer { action: COMMIT },
                Op::Ack {
                    slot: 0,
                    kind: 2,
                    id: 0,
                },
                Op::Disconnect { slot: 0, will: 0 },
            ],
        );
        let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
        assert_eq!(outcome.sessions, 1);
        assert_eq!(outcome.delivered, 3);
        assert_eq!(outcome.acks, 2);
        assert_eq!(outcome.ends.get("disconnect"), Some(&1), "{outcome:?}");
    }
}

#[test]
fn a_failed_commit_ends_the_session_without_acknowledgements() {
    let bytes = script(
        // 64 in flight: both publishes reach the writer before any commit.
        Settings {
            inflight: 3,
            ..Settings::default()
        },
        vec![
            connect(0, true),
            publish(0, 1, TELEMETRY, JSON),
            publish(0, 2, TELEMETRY, JSON),
            Op::Writer { action: FAIL },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.delivered, 2);
    assert_eq!(outcome.acks, 0);
    assert_eq!(outcome.failed_commits, 1);
    assert_eq!(outcome.ends.get("storage failed"), Some(&1), "{outcome:?}");
}

#[test]
fn a_server_only_packet_and_a_second_connect_are_counted_violations() {
    let bytes = script(
        Settings::default(),
        vec![
            connect(0, false),
            Op::ServerOnly { slot: 0, kind: 0 },
            connect(1, true),
            connect(1, true),
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    // The second connection of d1 took over from the first (which may already have ended).
    assert_eq!(outcome.sessions, 2);
    assert_eq!(
        outcome.ends.get("protocol violation"),
        Some(&2),
        "{outcome:?}"
    );
}

#[test]
fn a_revoked_device_is_kicked_and_a_takeover_replaces_the_session() {
    let bytes = script(
        Settings::default(),
        vec![
            connect(0, true),
            connect(1, true),
            publish(1, 1, TELEMETRY, JSON),
            Op::Revoke { device: 0 },
            Op::Wait { ms: 5 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.sessions, 2);
    assert_eq!(outcome.ends.get("replaced by a new connection"), Some(&1));
    assert_eq!(
        outcome.ends.get("enrollment revoked"),
        Some(&1),
        "{outcome:?}"
    );
}

/// Found by the simulation: a QoS 2 publish the writer refused as unknown got PUBREC 0x83
/// (which docs/protocol.md gives to oversize payloads) where the same publish at QoS 1 gets
/// PUBACK 0x80.
#[test]
fn a_refused_qos2_publish_gets_the_code_of_its_qos1_twin() {
    let bytes = script(
        Settings {
            auto_commit: 1,
            ..Settings::default()
        },
        vec![
            connect(0, true),
            publish(0, 1, ALERT, ARRAY),
            publish(0, 2, ALERT, ARRAY),
            Op::Disconnect { slot: 0, will: 0 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.acks, 2);
    assert_eq!(outcome.delivered, 2);
}

/// Found by the simulation: a device revoked while its new connection waited for its previous
/// session to end got a session anyway (the credential was checked before the wait, and the
/// revocation's kick went to the previous session).
#[test]
fn a_device_revoked_during_a_takeover_gets_no_session() {
    let bytes = script(
        // The writer's queue holds one message: the previous session's "offline" waits for
        // the stalled writer, and so does the takeover.
        Settings {
            queue: 3,
            ..Settings::default()
        },
        vec![
            Op::Writer { action: 5 },
            connect(0, true),
            connect(1, true),
            Op::Revoke { device: 0 },
            Op::Wait { ms: 6 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.connections, 2);
    assert_eq!(outcome.sessions, 1, "{outcome:?}");
    assert_eq!(outcome.ends.get("replaced by a new connection"), Some(&1));
}

/// What a device sends before it closes is taken even when the session holds the device's
/// publishes in flight at `mqtt.max_inflight` when the stream ends.
#[test]
fn packets_read_before_the_end_of_the_stream_are_taken() {
    let bytes = script(
        // One publish in flight at a time; the writer commits when told.
        Settings::default(),
        vec![
            connect(0, true),
            publish(0, 1, TELEMETRY, JSON),
            publish(0, 0, TELEMETRY, JSON),
            Op::Disconnect { slot: 0, will: 0 },
            Op::Close { slot: 0, how: 0 },
            Op::Writer { action: COMMIT },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.delivered, 2);
    assert_eq!(outcome.acks, 1);
    assert_eq!(outcome.ends.get("disconnect"), Some(&1), "{outcome:?}");
}

/// Found by the simulation: a session that held a publish it had refused itself (at
/// `mqtt.max_inflight`) acknowledged it and then read again without taking the packets it
/// had read already; when that read was the end of the stream, they were lost (here the
/// DISCONNECT: the session ended as "connection closed" and would have sent a will).
#[test]
fn packets_after_a_refused_publish_are_taken_before_the_end_of_the_stream() {
    let bytes = script(
        // One publish in flight at a time.
        Settings::default(),
        vec![
            // The writer takes nothing for 5 s: the first publish holds the session's only
            // slot, and the rest waits in the connection.
            Op::Writer { action: 5 },
            connect(0, true),
            publish(0, 1, TELEMETRY, JSON),
            // `$SYS/x`: refused by the session itself.
            publish(0, 1, 17, JSON),
            Op::Disconnect { slot: 0, will: 0 },
            Op::Close { slot: 0, how: 0 },
            Op::Wait { ms: 6 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.delivered, 1);
    assert_eq!(outcome.acks, 2);
    assert_eq!(outcome.ends.get("disconnect"), Some(&1), "{outcome:?}");
}

/// Found by the simulation: a publish held by the device's rate limit, woken a rounding error
/// before its token, was told to wait zero and spun its session (on the paused clock, for
/// ever: the script never finished). `TokenBucket::until_token` now waits at least 1 ms.
#[test]
fn a_publish_held_by_the_rate_limit_does_not_spin_its_session() {
    let bytes = script(
        // 5 messages a second, a burst of 3; a writer queue of one message.
        Settings {
            queue: 3,
            inflight: 3,
            ..Settings::default()
        },
        vec![
            connect(0, false),
            publish(0, 0, TELEMETRY, JSON),
            publish(0, 0, TELEMETRY, JSON),
            publish(0, 0, TELEMETRY, JSON),
            publish(0, 0, TELEMETRY, JSON),
            publish(0, 1, TELEMETRY, JSON),
            Op::Writer { action: 4 },
            Op::Writer { action: 7 },
            Op::Wait { ms: 5 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.delivered, 5);
    assert_eq!(outcome.acks, 1);
}

/// Found by cargo-fuzz: a failed commit that held only QoS 0 messages of a session left the
/// session running (nothing waited for an acknowledgement), to end it as "storage failed" at
/// its next QoS 1 publish, whenever that came.
#[test]
fn a_failed_commit_of_qos0_messages_ends_the_session() {
    let bytes = script(
        Settings::default(),
        vec![
            connect(0, true),
            publish(0, 0, TELEMETRY, JSON),
            Op::Writer { action: FAIL },
            Op::Wait { ms: 6 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.failed_commits, 1);
    assert_eq!(outcome.ends.get("storage failed"), Some(&1), "{outcome:?}");
}

/// Found by cargo-fuzz: with `ingest.ack = "receipt"` a failed commit left its sessions
/// running (their publishes were acknowledged when queued), although the gateway counts them
/// as disconnected (`ingest_sessions_failed`) and ARCHITECTURE.md says they end. They end.
#[test]
fn in_receipt_mode_a_failed_commit_ends_the_session_too() {
    let bytes = script(
        Settings {
            ack: 3,
            ..Settings::default()
        },
        vec![
            connect(0, true),
            publish(0, 1, TELEMETRY, JSON),
            Op::Writer { action: FAIL },
            Op::Wait { ms: 6 },
        ],
    );
    let outcome = run(&bytes).unwrap_or_else(|e| panic!("{e}\n{}", describe(&bytes)));
    assert_eq!(outcome.failed_commits, 1);
    assert_eq!(outcome.ends.get("storage failed"), Some(&1), "{outcome:?}");
}

/// The fuzzer's seeds (`fuzz/corpus/sessions/`), and every input it once failed on, fixed
/// since (`fuzz/regressions/sessions/`).
#[test]
fn the_fuzzers_seeds_and_regressions_pass() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for dir in ["corpus/sessions", "regressions/sessions"] {
        let dir = fuzz.join(dir);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if let Err(e) = run(&bytes) {
                panic!("{}: {e}\n{}", path.display(), describe(&bytes));
            }
            count += 1;
        }
        assert!(count >= 3, "{count} inputs in {}", dir.display());
    }
}

proptest! {
    // Each case takes a few milliseconds in a debug build.
    #![proptest_config(ProptestConfig {
        cases: 1500,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_scripts_keep_every_invariant(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Err(e) = run(&bytes) {
            prop_assert!(false, "{e}\n{}", describe(&bytes));
        }
    }
}
