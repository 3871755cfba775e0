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

pub(crate) fn opt_finite(field: &'static str, value: Option<f32>) -> Result<(), Invalid> {
    match value {
        Some(v) if !v.is_finite() => Err(Invalid::new(field, "must be a finite number")),
        _ => Ok(()),
    }
}
