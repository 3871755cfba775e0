//! Report arithmetic: latency percentiles from HDR histograms, rates over a phase, and the
//! `-` a human summary prints for a figure it does not have.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency a histogram holds, in microseconds (an hour); longer ones count as this.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Records `d` (at least 1 us, at most an hour).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    record_us(h, d.as_micros().min(u128::from(MAX_US)) as u64);
}

pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

/// Latency percentiles in milliseconds, in the shape the gateway reports its own:
/// `{count, p50_ms, p99_ms, p999_ms, max_ms}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// The percentiles of a microsecond histogram; `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        })
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// `count` per second over `d`; 0 over an empty phase.
pub fn per_second(count: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

/// `later - earlier` of two samples of a counter that only grows; 0 if it went back (a
/// restarted gateway).
pub fn delta(earlier: u64, later: u64) -> u64 {
    later.saturating_sub(earlier)
}

/// Of `acked` messages, how many are not among `stored` new ones (`stored` counts `duplicates`
/// twice): what was acknowledged but lost, by counts alone.
pub fn acked_lost(acked: u64, stored: u64, duplicates: u64) -> u64 {
    acked.saturating_sub(stored.saturating_sub(duplicates))
}

/// A figure a summary prints, or `-` when it was not measured.
#[derive(Debug)]
pub struct Opt<T>(pub Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A rate with one decimal, for summaries.
#[derive(Debug, Clone, Copy)]
pub struct Rate(pub f64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}/s", self.0)
    }
}

/// Bytes as MiB with one decimal, for summaries.
#[derive(Debug, Clone, Copy)]
pub struct Mib(pub u64);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MiB", self.0 as f64 / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests;
