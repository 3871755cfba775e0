//! Rollback directives: the gateway's signed order to one device to go back to the image its
//! other A/B slot still holds, and the checks a device runs before it obeys. Runs on the device
//! (no_std); the simulator uses the same code.
//!
//! A directive is signed by the gateway's own key in the [`Domain::Rollback`] domain, never by a
//! release key, and devices trust that key for nothing else. It can only send a device back to
//! what it ran before: it names the image running now, the transfer that installed it and the
//! image in the other slot, and the device refuses unless all three match what it holds. So a
//! directive can never make a device install an image it did not have.
//!
//! [`check_rollback`] checks, in order, and fails with the first problem:
//! 1. at least one trusted key signed the body (checked before anything is decoded);
//! 2. the body decodes as a [`RollbackDirective`] and is sane ([`Validate`]);
//! 3. it is for this device;
//! 4. it has not expired at the device's time;
//! 5. the device runs `from` (name, version, release);
//! 6. `from` was installed by `transfer`;
//! 7. the other slot holds an image;
//! 8. that image is `to`.

use alloc::format;
use alloc::string::String;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::codec::{Encoding, decode, encode};
use crate::id;
use crate::limits::{self, Invalid, Validate};
use crate::manifest::ArtifactKind;
use crate::messages::Installed;
use crate::sign::{Domain, SigError, Signed};

/// What a device must stop running and what it goes back to. Signed ([`Domain::Rollback`]) as
/// its postcard encoding (format byte, then postcard: the same canonical encoding as manifests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackDirective {
    /// The device id it is for.
    pub device: String,
    pub rollout: u64,
    /// The transfer that installed `from`.
    pub transfer: u64,
    pub kind: ArtifactKind,
    /// What the device runs now.
    pub from: Installed,
    /// What it ran before, still in its other slot (same name as `from`).
    pub to: Installed,
    pub issued_ms: u64,
    pub expires_ms: u64,
}

impl RollbackDirective {
    /// Signs the directive's postcard encoding with `key` (one signature).
    pub fn sign(&self, key: &SigningKey) -> Signed {
        // A directive is our own plain struct: encoding it into memory cannot fail.
        let body = encode(self, Encoding::Postcard).expect("rollback directive encodes");
        Signed::sign(Domain::Rollback, body, core::slice::from_ref(key))
    }
}

impl Validate for RollbackDirective {
    fn validate(&self) -> Result<(), Invalid> {
        if id::validate(&self.device).is_err() {
            return Err(Invalid::new("device", "is not a valid device id"));
        }
        limits::name("from.name", &self.from.name)?;
        limits::name("to.name", &self.to.name)?;
        if self.from.name != self.to.name {
            return Err(Invalid::new("to.name", "must be the name of `from`"));
        }
        if self.from == self.to {
            return Err(Invalid::new("to", "must differ from `from`"));
        }
        if self.expires_ms <= self.issued_ms {
            return Err(Invalid::new("expires_ms", "must be after issued_ms"));
        }
        Ok(())
    }
}

/// What the device knows about the slots of one artifact (kind and name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState<'a> {
    /// The image running now.
    pub running: &'a Installed,
    /// The transfer that installed the running image; `None` for a factory image.
    pub installed_by: Option<u64>,
    /// The image in the other slot, if it holds one.
    pub previous: Option<&'a Installed>,
}

/// Why a device refused a rollback directive. Append-only (the name travels in acks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackError {
    /// No valid signature from a key the device trusts for rollbacks.
    NoTrustedSignature,
    /// A trusted key's signature does not match: the directive was altered.
    BadSignature,
    /// The signed body is not a valid directive.
    Malformed,
    /// The directive is for another device.
    WrongDevice,
    /// The directive's expiry is not after the device's time.
    Expired,
    /// The device does not run the image the directive reverts (or has no such artifact).
    NotRunning,
    /// The running image was installed by another transfer (or is a factory image).
    NotInstalledByTransfer,
    /// The other slot holds nothing to go back to.
    NoPrevious,
    /// The other slot holds another image than the directive's `to`.
    NotPrevious,
}

impl RollbackError {
    pub const ALL: [RollbackError; 9] = [
        RollbackError::NoTrustedSignature,
        RollbackError::BadSignature,
        RollbackError::Malformed,
        RollbackError::WrongDevice,
        RollbackError::Expired,
        RollbackError::NotRunning,
        RollbackError::NotInstalledByTransfer,
        RollbackError::NoPrevious,
        RollbackError::NotPrevious,
    ];

    /// The snake_case name, as in JSON and at the start of a rejection's reason.
    pub const fn name(self) -> &'static str {
        match self {
            RollbackError::NoTrustedSignature => "no_trusted_signature",
            RollbackError::BadSignature => "bad_signature",
            RollbackError::Malformed => "malformed",
            RollbackError::WrongDevice => "wrong_device",
            RollbackError::Expired => "expired",
            RollbackError::NotRunning => "not_running",
            RollbackError::NotInstalledByTransfer => "not_installed_by_transfer",
            RollbackError::NoPrevious => "no_previous",
            RollbackError::NotPrevious => "not_previous",
        }
    }

    pub fn from_name(name: &str) -> Option<RollbackError> {
        RollbackError::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// A refused directive: the reason and a human-readable detail. Displays as
/// `"<code name>: <detail>"`, the reason a device puts in its rejecting ack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", code.name())]
pub struct RollbackFailure {
    pub code: RollbackError,
    pub detail: String,
}

impl RollbackFailure {
    /// The reason for a rejecting [`CommandAck`](crate::CommandAck): `"<code name>: <detail>"`,
    /// cut to [`limits::MAX_MESSAGE_LEN`] bytes so that the ack is always valid.
    pub fn reason(&self) -> String {
        let mut reason = format!("{self}");
        if reason.len() > limits::MAX_MESSAGE_LEN {
            let mut end = limits::MAX_MESSAGE_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        reason
    }
}

fn fail<T>(code: RollbackError, detail: String) -> Result<T, RollbackFailure> {
    Err(RollbackFailure { code, detail })
}

fn image(i: &Installed) -> String {
    format!("{} {} (release {})", i.name, i.version, i.release)
}

/// Checks a signed rollback directive for the device `device_id` at the device's time `now_ms`.
/// `trusted_keys` are the keys the device trusts for rollbacks (one signature suffices);
/// `slot` looks up what the device holds for an artifact kind and name. On success the caller
/// reverts that artifact to its other slot.
pub fn check_rollback<'a>(
    signed: &Signed,
    trusted_keys: &[[u8; 32]],
    device_id: &str,
    now_ms: u64,
    slot: impl FnOnce(ArtifactKind, &str) -> Option<SlotState<'a>>,
) -> Result<RollbackDirective, RollbackFailure> {
    let body = signed
        .verify(Domain::Rollback, trusted_keys, 1)
        .map_err(|e| {
            let code = match e {
                SigError::BadSignature | SigError::TooManySignatures => RollbackError::BadSignature,
                SigError::NoTrustedSignature | SigError::BelowThreshold { .. } => {
                    RollbackError::NoTrustedSignature
                }
            };
            RollbackFailure {
                code,
                detail: format!("{e}"),
            }
        })?;
    if body.len() > limits::MAX_ROLLBACK_LEN {
        return fail(
            RollbackError::Malformed,
            format!(
                "{} bytes, at most {} allowed",
                body.len(),
                limits::MAX_ROLLBACK_LEN
            ),
        );
    }
    let directive: RollbackDirective =
        decode(body, Encoding::Postcard).map_err(|e| RollbackFailure {
            code: RollbackError::Malformed,
            detail: format!("{e}"),
        })?;
    if directive.device != device_id {
        return fail(
            RollbackError::WrongDevice,
            format!("for device {}", directive.device),
        );
    }
    if now_ms >= directive.expires_ms {
        return fail(
            RollbackError::Expired,
            format!(
                "expired at {} ms, device time {now_ms} ms",
                directive.expires_ms
            ),
        );
    }
    let (kind, name) = (directive.kind, directive.from.name.as_str());
    let Some(state) = slot(kind, name) else {
        return fail(
            RollbackError::NotRunning,
            format!("no {} named {name}", kind.name()),
        );
    };
    if *state.running != directive.from {
        return fail(
            RollbackError::NotRunning,
            format!(
                "runs {}, not {}",
                image(state.running),
                image(&directive.from)
            ),
        );
    }
    if state.installed_by != Some(directive.transfer) {
        let by = match state.installed_by {
            Some(t) => format!("transfer {t}"),
            None => String::from("the factory"),
        };
        return fail(
            RollbackError::NotInstalledByTransfer,
            format!(
                "{} was installed by {by}, not transfer {}",
                image(state.running),
                directive.transfer
            ),
        );
    }
    let Some(previous) = state.previous else {
        return fail(
            RollbackError::NoPrevious,
            format!("no other slot holds a {} named {name}", kind.name()),
        );
    };
    if *previous != directive.to {
        return fail(
            RollbackError::NotPrevious,
            format!(
                "the other slot holds {}, not {}",
                image(previous),
                image(&directive.to)
            ),
        );
    }
    Ok(directive)
}

#[cfg(test)]
mod tests;
