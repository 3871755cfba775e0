//! Counts on bins (or classes) where no device holds more than a set share of a window, so one
//! device cannot move a drift verdict by sending more (issue 13).
//!
//! Each device's first `light` counts of a window go to a shared pool; counts past that are
//! kept apart per device. When the window is judged, the share cap is solved exactly
//! ("water-filling"): the largest devices are scaled down until none holds more than
//! `max(share, 1/k)` of the effective total, k being the devices of the stream. A device under
//! `light` never needs scaling in a window big enough to judge (`light = share x min_samples`),
//! so only heavy devices cost memory: at most `window / light` of them per window.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A device within the engine (an interned id).
pub type Dev = u32;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capped {
    /// Counts of every device up to its light quota.
    pub pool: Vec<u64>,
    /// Counts per device in this window.
    pub devices: HashMap<Dev, u64>,
    /// Counts past the light quota, per device.
    pub heavy: HashMap<Dev, Vec<u64>>,
    /// Sum over devices of min(count, close quota): what closes the window by count.
    pub capped_total: u64,
}

/// The quotas of a stream: derived from the settings and the number of devices it has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// Counts per device that go to the pool.
    pub light: u64,
    /// Counts per device that count towards closing the window.
    pub close: u64,
    /// No device may hold more than this share (already relaxed to 1/k for k devices).
    pub share: f64,
}

impl Quota {
    /// `share` from the config, `devices` the stream's devices (at least 1).
    pub fn new(share: f64, devices: usize, min_samples: u64, window_samples: u64) -> Quota {
        let share = share.max(1.0 / devices.max(1) as f64).min(1.0);
        if share >= 1.0 {
            return Quota {
                light: u64::MAX,
                close: u64::MAX,
                share,
            };
        }
        Quota {
            light: ((share * min_samples as f64).floor() as u64).max(1),
            close: ((share * window_samples as f64).ceil() as u64).max(1),
            share,
        }
    }
}

/// A window's counts after the cap.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub counts: Vec<f64>,
    /// Sum of `counts`: the window's size for thresholds.
    pub n: f64,
    /// Counts before the cap.
    pub raw: u64,
    /// Devices that contributed.
    pub devices: usize,
    /// Most any one device holds of `n` after the cap.
    pub top_share: f64,
}

impl Capped {
    pub fn new(len: usize) -> Capped {
        Capped {
            pool: vec![0; len],
            ..Capped::default()
        }
    }

    pub fn raw(&self) -> u64 {
        self.devices.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn clear(&mut self) {
        self.pool.fill(0);
        self.devices.clear();
        self.heavy.clear();
        self.capped_total = 0;
    }

    fn grow(&mut self, len: usize) {
        if self.pool.len() < len {
            self.pool.resize(len, 0);
        }
    }

    /// Adds one count in bin `bin` from `dev`.
    pub fn add_one(&mut self, dev: Dev, bin: usize, q: Quota) {
        self.grow(bin + 1);
        let n = self.devices.entry(dev).or_insert(0);
        let before = *n;
        *n += 1;
        if before < q.light {
            self.pool[bin] += 1;
        } else {
            let h = self.heavy.entry(dev).or_default();
            if h.len() <= bin {
                h.resize(bin + 1, 0);
            }
            h[bin] += 1;
        }
        if before < q.close {
            self.capped_total += 1;
        }
    }

    /// Adds a vector of counts from `dev`: the part up to its light quota goes to the pool
    /// (proportionally over the bins), the rest apart.
    pub fn add(&mut self, dev: Dev, counts: &[u64], q: Quota) {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        self.grow(counts.len());
        let n = self.devices.entry(dev).or_insert(0);
        let before = *n;
        *n += total;
        let room = q.light.saturating_sub(before).min(total);
        // The pool's part of each bin: proportional, rounded down, the rounding left over given
        // to the first bins that still have counts, so the pool takes exactly `room`.
        let mut pooled: Vec<u64> = counts
            .iter()
            .map(|&c| (u128::from(c) * u128::from(room) / u128::from(total)) as u64)
            .collect();
        let mut short = room - pooled.iter().sum::<u64>();
        for (p, &c) in pooled.iter_mut().zip(counts) {
            if short == 0 {
                break;
            }
            if *p < c {
                *p += 1;
                short -= 1;
            }
        }
        for (p, &part) in self.pool.iter_mut().zip(&pooled) {
            *p += part;
        }
        if room < total {
            let h = self.heavy.entry(dev).or_default();
            if h.len() < counts.len() {
                h.resize(counts.len(), 0);
            }
            for ((h, &c), &part) in h.iter_mut().zip(counts).zip(&pooled) {
                *h += c - part;
            }
        }
        self.capped_total += (before + total).min(q.close) - before.min(q.close);
    }

    /// The window's counts with no device over its share (see the module docs).
    pub fn effective(&self, q: Quota) -> Effective {
        let raw = self.raw();
        let devices = self.devices.len();
        let mut counts: Vec<f64> = self.pool.iter().map(|&c| c as f64).collect();
        let cap = water_level(self.devices.values().copied(), q.share);
        let mut top = 0.0f64;
        for (dev, &n) in &self.devices {
            let eff = match cap {
                Some(c) if (n as f64) > c => c,
                _ => n as f64,
            };
            let scale = match (cap, self.heavy.get(dev)) {
                (Some(c), Some(_)) if (n as f64) > c => {
                    let light = (n as f64) - self.heavy_total(*dev) as f64;
                    ((c - light) / (n as f64 - light)).clamp(0.0, 1.0)
                }
                _ => 1.0,
            };
            if let Some(h) = self.heavy.get(dev) {
                if counts.len() < h.len() {
                    counts.resize(h.len(), 0.0);
                }
                for (c, &x) in counts.iter_mut().zip(h) {
                    *c += x as f64 * scale;
                }
            }
            top = top.max(eff);
        }
        let n: f64 = counts.iter().sum();
        Effective {
            counts,
            n,
            raw,
            devices,
            top_share: if n > 0.0 { (top / n).min(1.0) } else { 0.0 },
        }
    }

    fn heavy_total(&self, dev: Dev) -> u64 {
        self.heavy.get(&dev).map_or(0, |h| h.iter().sum())
    }
}

/// The cap C with C = share x sum_d min(n_d, C), if some device is over it; `None` when no
/// device needs scaling.
pub fn water_level(counts: impl Iterator<Item = u64>, share: f64) -> Option<f64> {
    let mut n: Vec<u64> = counts.filter(|&c| c > 0).collect();
    if n.is_empty() || share >= 1.0 {
        return None;
    }
    n.sort_unstable_by(|a, b| b.cmp(a));
    let mut rest: f64 = n.iter().map(|&c| c as f64).sum();
    for (j, &nj) in n.iter().enumerate() {
        // The j largest devices are capped at C, the others keep their counts.
        let denominator = 1.0 - share * j as f64;
        if denominator <= 0.0 {
            break;
        }
        let c = share * rest / denominator;
        if (nj as f64) <= c {
            return (j > 0).then_some(c);
        }
        rest -= nj as f64;
    }
    // Every device is at the cap: equal weights.
    n.last().map(|&c| c as f64)
}

#[cfg(test)]
mod tests;
