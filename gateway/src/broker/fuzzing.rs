//! Ways in for the cargo-fuzz targets (`fuzz/`) to code private to the broker: the packet
//! readers (target `mqtt_packets`), and a deterministic simulation of the front and its
//! sessions driven by a script of operations, with its checks (target `sessions`; built with
//! the `fuzzing` feature, and in tests, where a property test runs it too).

/// Runs the front's and the sessions' readers of device bytes over `bytes`: the protocol
/// level of a CONNECT, the QoS and packet id of a PUBLISH, and every packet as MQTT 3.1.1
/// and 5. Returns the packets found per version; it must never panic (rumqttd's decoder is
/// guarded, but the fuzzer reports a caught panic too, which is what we want to know).
pub fn mqtt_packets(bytes: &[u8], max: usize) -> (usize, usize) {
    let _ = super::front::connect_level(bytes);
    let _ = super::session::peek_publish(bytes);
    super::session::parse_all(bytes, max)
}

/// Runs `f` the way sessions run rumqttd's codec: a panic comes back as `None` and is not
/// printed; any other panic still is. For `gateway/tests/panics.rs`.
pub fn codec_guard<T>(f: impl FnOnce() -> T) -> Option<T> {
    super::session::guarded(f).ok()
}

#[cfg(any(test, feature = "fuzzing"))]
mod check;
#[cfg(any(test, feature = "fuzzing"))]
mod device;
#[cfg(any(test, feature = "fuzzing"))]
pub mod script;
#[cfg(any(test, feature = "fuzzing"))]
mod sim;
#[cfg(any(test, feature = "fuzzing"))]
mod writer;

#[cfg(any(test, feature = "fuzzing"))]
pub use check::Outcome;
/// Runs the script that `input` decodes to against the front and its sessions; `Err` names
/// the first check that failed. See `fuzzing/sim.rs` and `fuzzing/check.rs`.
#[cfg(any(test, feature = "fuzzing"))]
pub use sim::run as sessions;

#[cfg(test)]
mod tests;
