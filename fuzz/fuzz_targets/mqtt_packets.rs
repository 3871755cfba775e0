//! MQTT packets as devices send them to the gateway's front: the protocol level of a CONNECT,
//! the QoS and packet id of a PUBLISH, and every packet in the bytes as MQTT 3.1.1 and 5
//! through rumqttd's decoder (which the sessions run under `catch_unwind`). Nothing may panic,
//! and a packet over the size limit is never returned as a packet.
//!
//! rumqttd 0.20's MQTT 5 decoder panics on packet types only a server sends (CONNACK, SUBACK,
//! ...): `unreachable!()` in `protocol/v5/mod.rs`. The sessions catch that and treat it as a
//! malformed packet (`fuzz/regressions/mqtt_packets/`, and the unit test
//! `a_panicking_decoder_is_a_malformed_packet`). libFuzzer's panic hook would report every
//! caught panic as a crash, so this target puts a silent hook back: a panic that escapes the
//! gateway's code still aborts the run through libfuzzer-sys's own `catch_unwind`.

#![no_main]

use libfuzzer_sys::fuzz_target;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    // A small limit, so that the over-the-limit path is reached as well.
    let max = 1024;
    let (v4, v5) = fleetgate::broker::fuzzing::mqtt_packets(data, max);
    // Every packet needs at least two bytes.
    assert!(v4 <= data.len() / 2 && v5 <= data.len() / 2);
});
