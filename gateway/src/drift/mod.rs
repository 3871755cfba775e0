//! Drift detection (see docs/drift.md).

pub mod baseline;
pub mod capped;
pub mod engine;
pub mod metrics;
pub mod null;
