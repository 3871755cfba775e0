//! Size limits on decoded messages, so that one message can cost the gateway only a bounded
//! amount of memory and work, and the semantic checks that go with them.

use core::fmt;

/// Longest name: model, firmware, architecture, device class, alert kind.
pub const MAX_NAME_LEN: usize = 64;
/// Longest alert message or rejection reason, in bytes.
pub const MAX_MESSAGE_LEN: usize = 256;
/// Longest log line, in bytes.
pub const MAX_LOG_LEN: usize = 1024;
/// Most models a device reports in its hello.
pub const MAX_MODELS: usize = 8;
/// Most raw input samples in one telemetry message.
pub const MAX_SAMPLES: usize = 256;
/// Most features in one sample, and most binned features in one message.
pub const MAX_FEATURES: usize = 64;
/// Most bins of one feature.
pub const MAX_BINS: usize = 256;
/// Most classes in a class histogram.
pub const MAX_CLASSES: usize = 256;
/// Longest version string (semver, pre-release and build metadata included), in bytes.
pub const MAX_VERSION_LEN: usize = 64;
/// Largest single count in a class histogram or a bin histogram, and largest sum of one
/// message's counts: a message covers one reporting interval, not a lifetime.
pub const MAX_COUNT: u32 = 1_000_000;
/// Largest magnitude of an alert's value and of a raw input value.
pub const MAX_VALUE: f32 = 1e12;

/// Plausible ranges of the hardware metrics (`hw.*`); a value outside is refused as `invalid`.
/// Wide enough for any real device, narrow enough that one device's reading cannot dominate a
/// fleet's average.
pub mod hw {
    /// Percent of CPU busy.
    pub const CPU_PCT: (f32, f32) = (0.0, 100.0);
    /// Free memory: at most 1 TiB.
    pub const MAX_FREE_MEM_BYTES: u64 = 1 << 40;
    /// Degrees Celsius: from below any outdoor temperature to above any junction limit.
    pub const TEMP_C: (f32, f32) = (-100.0, 200.0);
    /// Supply voltage in millivolts: at most 100 V.
    pub const MAX_BATTERY_MV: u32 = 100_000;
    /// Power draw in milliwatts: at most 1 kW.
    pub const POWER_MW: (f32, f32) = (0.0, 1_000_000.0);
    /// One inference, in microseconds: at least 1 us (leave the field out when not measured),
    /// at most 10 minutes.
    pub const LATENCY_US: (u32, u32) = (1, 600_000_000);
    /// RAM and flash of a device: at most 1 TiB each.
    pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
}

/// Longest signed body of a rollback directive, in bytes: a device id, two names and versions
/// and a few numbers fit in well under half of it.
pub const MAX_ROLLBACK_LEN: usize = 1024;

/// A decoded message that breaks a rule: which field, and what is wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub problem: &'static str,
}

impl Invalid {
    pub const fn new(field: &'static str, problem: &'static str) -> Self {
        Invalid { field, problem }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl core::error::Error for Invalid {}

/// Rules a message must satisfy beyond decoding.
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid>;
}

pub(crate) fn name(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    text(field, value, MAX_NAME_LEN)
}

pub(crate) fn text(field: &'static str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.len() > max {
        return Err(Invalid::new(field, "is too long"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Invalid::new(field, "contains control characters"));
    }
    Ok(())
}

pub(crate) fn count(field: &'static str, len: usize, max: usize) -> Result<(), Invalid> {
    if len > max {
        return Err(Invalid::new(field, "has too many entries"));
    }
    Ok(())
}

/// A version string's length, without formatting it.
pub(crate) fn version(field: &'static str, v: &semver::Version) -> Result<(), Invalid> {
    let digits = |n: u64| n.checked_ilog10().unwrap_or(0) as usize + 1;
    let mut len = digits(v.major) + digits(v.minor) + digits(v.patch) + 2;
    if !v.pre.is_empty() {
        len += 1 + v.pre.as_str().len();
    }
    if !v.build.is_empty() {
        len += 1 + v.build.as_str().len();
    }
    if len > MAX_VERSION_LEN {
        return Err(Invalid::new(field, "is too long"));
    }
    Ok(())
}

/// A finite value within `lo..=hi`, if present.
pub(crate) fn opt_range(
    field: &'static str,
    value: Option<f32>,
    (lo, hi): (f32, f32),
    problem: &'static str,
) -> Result<(), Invalid> {
    opt_finite(field, value)?;
    match value {
        Some(v) if !(lo..=hi).contains(&v) => Err(Invalid::new(field, problem)),
        _ => Ok(()),
    }
}

/// Counts of a histogram: each and their sum at most [`MAX_COUNT`].
pub(crate) fn counts(field: &'static str, counts: &[u32], max_len: usize) -> Result<(), Invalid> {
    count(field, counts.len(), max_len)?;
    let mut sum: u64 = 0;
    for &c in counts {
        sum += u64::from(c);
    }
    if sum > u64::from(MAX_COUNT) {
        return Err(Invalid::new(field, "counts add up to more than 1000000"));
    }
    Ok(())
}

pub(crate) fn opt_finite(field: &'static str, value: Option<f32>) -> Result<(), Invalid> {
    match value {
        Some(v) if !v.is_finite() => Err(Invalid::new(field, "must be a finite number")),
        _ => Ok(()),
    }
}
