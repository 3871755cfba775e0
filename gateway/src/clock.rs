//! Wall-clock time for the async shells. Pure cores take `now` as an argument instead.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    #[cfg(test)]
    if let Some(us) = FAKE_US.get() {
        return us;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
thread_local! {
    static FAKE_US: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Tests: makes this thread's clock read `us` (None: the real clock again). Deterministic
/// simulations drive the writer on one thread with it.
#[cfg(test)]
pub fn set_thread_clock(us: Option<u64>) {
    FAKE_US.set(us);
}

/// RFC 3339 with milliseconds, UTC, for API output.
pub fn rfc3339(ms: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
