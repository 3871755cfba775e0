//! Who goes in which stage. Deterministic per (rollout, device): the same inputs give the same
//! plan after a restart, and no device can pick its stage.
//!
//! Devices are grouped into strata (hardware class and the policy's `stratify` labels). Each
//! stratum is ordered by the hash of (rollout id, device id), and the strata are interleaved in
//! proportion to their sizes: the i-th of a stratum of n sits at (i + 0.5) / n. A stage that
//! takes the first k devices therefore takes about k x n / N of every stratum of n, and even a
//! canary of 5 spans the largest strata instead of one board revision at one site.

use fleetgate_config::StagePolicy;
use fleetgate_protocol::Installed;
use sha2::{Digest, Sha256};

/// A device a rollout may update.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub device: String,
    /// Hardware class and the values of the stratifying labels, e.g. `nrf53|site=north`.
    pub stratum: String,
    /// What it runs now of the rollout's artifact.
    pub running: Option<Installed>,
}

/// The device's place in a rollout, uniform in [0, 2^64).
pub fn hash(rollout: u64, device: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(rollout.to_le_bytes());
    h.update(device.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The candidates' indices in rollout order (strata interleaved, each in hash order).
pub fn order(rollout: u64, candidates: &[Candidate]) -> Vec<usize> {
    let mut strata: std::collections::BTreeMap<&str, Vec<(u64, usize)>> = Default::default();
    for (i, c) in candidates.iter().enumerate() {
        strata
            .entry(c.stratum.as_str())
            .or_default()
            .push((hash(rollout, &c.device), i));
    }
    let mut keyed: Vec<(f64, u64, usize)> = Vec::with_capacity(candidates.len());
    for members in strata.values_mut() {
        members.sort_unstable();
        let n = members.len() as f64;
        for (rank, &(h, i)) in members.iter().enumerate() {
            keyed.push(((rank as f64 + 0.5) / n, h, i));
        }
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, _, i)| i).collect()
}

/// Cumulative device counts of the stages for a plan of `planned` devices (never shrinking).
pub fn sizes(stages: &[StagePolicy], planned: u64) -> Vec<u64> {
    let mut out = Vec::with_capacity(stages.len());
    let mut last = 0;
    for s in stages {
        last = s.size.of(planned).max(last);
        out.push(last);
    }
    if let Some(l) = out.last_mut() {
        *l = planned;
    }
    out
}

/// The stage of the device at `position` in the order.
pub fn stage_of(position: u64, sizes: &[u64]) -> usize {
    sizes
        .iter()
        .position(|&s| position < s)
        .unwrap_or(sizes.len().saturating_sub(1))
}

/// The stage of a device that joins after the plan was made, with `per_stage` devices in each
/// stage now: where its hash falls among the stages' shares of the rollout as it will be, so
/// late joiners spread over the stages like everyone else, but never into a stage already as
/// large as the policy makes it for that many devices (then the next one that is not). A canary
/// of 3 devices stays 3 devices when the fleet turns out larger than it was at creation.
pub fn late_stage(rollout: u64, device: &str, stages: &[StagePolicy], per_stage: &[u64]) -> usize {
    let last = per_stage.len().saturating_sub(1);
    let total = per_stage.iter().sum::<u64>() + 1;
    let sizes = sizes(stages, total);
    let u = hash(rollout, device) as f64 / 2f64.powi(64);
    let by_hash = sizes
        .iter()
        .position(|&s| u < s as f64 / total as f64)
        .unwrap_or(last);
    let mut before = per_stage[..by_hash.min(last)].iter().sum::<u64>();
    for k in by_hash.min(last)..last {
        before += per_stage[k];
        if before < sizes[k] {
            return k;
        }
    }
    last
}

#[cfg(test)]
mod tests;
