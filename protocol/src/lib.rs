//! The fleetgate wire protocol: device identity, the MQTT topic scheme, every message a device
//! and the gateway exchange, and both encodings of them (postcard and JSON).
//!
//! This crate does no I/O and needs no `std`: it builds for `thumbv7em-none-eabihf`, so the same
//! code that the gateway uses to decode a message is what a device uses to encode it. Time,
//! randomness and keys are always arguments.
//!
//! Compatibility rules (see `docs/protocol.md`):
//! - postcard encodes enum variants by index: enums are append-only, never reordered;
//! - a postcard payload starts with a format byte ([`codec::POSTCARD_FORMAT`]) so a future
//!   layout can be told apart from this one;
//! - golden-byte tests pin every encoding.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod bytes;
pub mod codec;
pub mod id;
pub mod limits;
pub mod manifest;
pub mod merkle;
pub mod messages;
pub mod rollback;
pub mod sign;
pub mod topic;
pub mod update;
pub mod validation;

pub use codec::{DecodeError, Encoding, decode, encode};
pub use id::{DeviceId, IdError};
pub use manifest::{ArtifactKind, Compat, Manifest};
pub use messages::*;
pub use rollback::{RollbackDirective, RollbackError, RollbackFailure, SlotState, check_rollback};
pub use sign::{Domain, Signed};
pub use topic::{Channel, Downlink, Topic, TopicError, Uplink};
pub use update::UpdateError;
pub use validation::{GoldenCase, GoldenSet, Measure, Requirement, Requirements, ValidationResult};
