//! What a drift statistic looks like when nothing drifted: its distribution under the null,
//! simulated for the actual reference shares, reference size n and window size m.
//!
//! The chi-square approximation of PSI (K-1 degrees of freedom times 1/n + 1/m) holds only
//! when every bin expects many samples. With 100 bins and 500 samples a bin expects 5, some are
//! empty, and PSI's floored logarithm gives them a heavy right tail: a quarter of windows drawn
//! like the reference went over the chi-square quantile. So the gateway draws the reference and
//! the window from the reference shares (`DRAWS` times, deterministic for the inputs) and takes
//! the quantiles of the statistic itself. Results are cached per (shares, n, m rounded down to
//! a 1/8-octave grid): rounding m down only raises the threshold, never lowers it.

use std::collections::HashMap;

use super::metrics;

/// Simulated windows per null distribution: the 99.5 % quantile rests on its top 20 values.
pub const DRAWS: usize = 4000;
/// Cached null distributions before the cache starts over.
const CACHE: usize = 4096;

/// Which statistic a null distribution is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Statistic {
    /// PSI of a feature's bins.
    Psi,
    /// Jensen-Shannon distance (base 2) of the predicted classes.
    Js,
}

/// Summary of a statistic's null distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Null {
    pub mean: f64,
    /// The 99 % quantile: the warning level.
    pub q99: f64,
    /// The `1 - false_alarm` quantile: the level of an "over" window by chance alone.
    pub q_over: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    statistic: Statistic,
    /// Shares in millionths (what the simulation depends on, to well below its own noise).
    shares: Vec<u32>,
    n: u64,
    m: u64,
    /// `1 - false_alarm` in millionths.
    level: u32,
}

/// Cached null distributions.
#[derive(Debug, Default)]
pub struct NullTable {
    cache: HashMap<Key, Null>,
}

/// The largest value of the 1/8-octave grid (..., 500, 545, 595, ...) not above `m`.
pub fn round_down(m: u64) -> u64 {
    if m < 16 {
        return m;
    }
    let step = ((m as f64).log2() * 8.0).floor();
    let mut g = 2f64.powf(step / 8.0).round() as u64;
    // Floating point can land one above; the grid value must never exceed m.
    while g > m {
        g -= 1;
    }
    g
}

impl NullTable {
    /// The null distribution of `statistic` between a reference of `n` samples and a window
    /// of `m`, both drawn from `shares`; `level` is the quantile of an "over" window.
    pub fn get(
        &mut self,
        statistic: Statistic,
        shares: &[f64],
        n: u64,
        m: u64,
        level: f64,
    ) -> Null {
        let m = round_down(m.max(1));
        let key = Key {
            statistic,
            shares: shares.iter().map(|s| (s * 1e6).round() as u32).collect(),
            n: n.max(1),
            m,
            level: (level * 1e6).round() as u32,
        };
        if let Some(null) = self.cache.get(&key) {
            return *null;
        }
        if self.cache.len() >= CACHE {
            self.cache.clear();
        }
        let null = simulate(statistic, shares, key.n, m, level, seed(&key));
        self.cache.insert(key, null);
        null
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// FNV-1a over the key: the same inputs draw the same windows on every run and host.
fn seed(key: &Key) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(key.statistic as u64);
    key.shares.iter().for_each(|s| eat(u64::from(*s)));
    eat(key.n);
    eat(key.m);
    eat(u64::from(key.level));
    h
}

/// Simulates the null distribution of a statistic (see the module docs).
pub fn simulate(
    statistic: Statistic,
    shares: &[f64],
    n: u64,
    m: u64,
    level: f64,
    seed: u64,
) -> Null {
    let mut rng = Rng::new(seed);
    let total: f64 = shares.iter().sum();
    let p: Vec<f64> = shares
        .iter()
        .map(|s| s / total.max(f64::MIN_POSITIVE))
        .collect();
    let mut values = Vec::with_capacity(DRAWS);
    let (mut reference, mut window) = (vec![0u64; p.len()], vec![0u64; p.len()]);
    for _ in 0..DRAWS {
        rng.multinomial(n, &p, &mut reference);
        rng.multinomial(m, &p, &mut window);
        let (r, c) = (metrics::shares(&reference), metrics::shares(&window));
        values.push(match statistic {
            Statistic::Psi => metrics::psi(&r, &c),
            Statistic::Js => metrics::js_distance(&r, &c),
        });
    }
    values.sort_by(f64::total_cmp);
    let q = |p: f64| values[((p * DRAWS as f64).ceil() as usize).clamp(1, DRAWS) - 1];
    Null {
        mean: values.iter().sum::<f64>() / DRAWS as f64,
        q99: q(0.99),
        q_over: q(level),
    }
}

/// xoshiro256++ seeded by SplitMix64: fast, and the same stream on every platform.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Binomial(n, p): exact inversion while n·p is small (where the tails matter: nearly
    /// empty bins), the normal approximation with continuity correction above.
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        if p > 0.5 {
            return n - self.binomial(n, 1.0 - p);
        }
        let mean = n as f64 * p;
        if mean < 30.0 {
            // Inversion: walk the CDF from 0 (expected mean + 1 steps).
            let q = 1.0 - p;
            let ratio = p / q;
            let mut prob = q.powf(n as f64);
            let mut cdf = prob;
            let u = self.uniform();
            let mut k = 0u64;
            while u > cdf && k < n {
                prob *= ratio * (n - k) as f64 / (k + 1) as f64;
                k += 1;
                cdf += prob;
                if prob < 1e-300 && cdf < u {
                    // The remaining mass underflowed: the draw is in the far tail.
                    break;
                }
            }
            return k;
        }
        let sd = (mean * (1.0 - p)).sqrt();
        (mean + sd * self.normal()).round().clamp(0.0, n as f64) as u64
    }

    /// Multinomial(n, p) by conditional binomials.
    pub fn multinomial(&mut self, n: u64, p: &[f64], out: &mut [u64]) {
        let mut left = n;
        let mut mass = 1.0;
        for (i, (&pi, o)) in p.iter().zip(out.iter_mut()).enumerate() {
            if i + 1 == p.len() {
                *o = left;
                break;
            }
            let k = if mass <= 0.0 {
                0
            } else {
                self.binomial(left, (pi / mass).min(1.0))
            };
            *o = k;
            left -= k;
            mass -= pi;
        }
    }
}

#[cfg(test)]
mod tests;
