//! Sessions as state machines: the input is a script of operations (`Script::decode` in
//! `gateway/src/broker/fuzzing/script.rs`: CONNECTs of every kind, publishes, acknowledgements,
//! subscriptions, server-only packets, raw bytes, a device that stops reading, the writer
//! committing, failing or stalling, revocations, takeovers, shutdown) run against the real
//! front and its sessions over in-memory streams on tokio's paused clock. After every step the
//! simulation's model checks what the gateway did (`fuzzing/check.rs`): no acknowledgement
//! before its commit, none twice, none of a failed commit as a success, every protocol
//! violation ends the session and is counted, sessions end in bounded time, nothing delivered
//! after the end, the writer's queue within its bound. A failed check is a finding.
//!
//! rumqttd's decoder panics on some packets (see `mqtt_packets`); the sessions catch those, so
//! the hook that would report them is silenced. A panic in a gateway task is still seen: the
//! simulation checks that no connection task panicked.

#![no_main]

use libfuzzer_sys::fuzz_target;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Err(e) = fleetgate::broker::fuzzing::sessions(data) {
        let script = fleetgate::broker::fuzzing::script::Script::decode(data);
        // The hook is silent: the message goes to stderr before the abort.
        eprintln!("session check failed: {e}\nscript: {script:?}");
        std::process::abort();
    }
});
