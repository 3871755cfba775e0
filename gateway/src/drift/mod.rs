//! Drift detection (see docs/drift.md).

pub mod baseline;
pub mod engine;
pub mod metrics;
