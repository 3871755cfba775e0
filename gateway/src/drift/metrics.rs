//! Drift metrics on binned distributions. Pure functions; `docs/drift.md` has the formulas and
//! why these were chosen. `fixtures.json` (made by `scripts/drift_reference.py` with numpy and
//! scipy) pins every one of them.

/// Shares below this are raised to it before PSI takes logarithms (empty bins).
pub const EPSILON: f64 = 1e-4;

/// Counts to shares; all zero for an empty window.
pub fn shares(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![0.0; counts.len()];
    }
    counts.iter().map(|&c| c as f64 / total as f64).collect()
}

/// Population stability index: sum (c - r) ln(c / r), shares floored at [`EPSILON`].
pub fn psi(reference: &[f64], current: &[f64]) -> f64 {
    reference
        .iter()
        .zip(current)
        .map(|(&r, &c)| {
            let (r, c) = (r.max(EPSILON), c.max(EPSILON));
            (c - r) * (c / r).ln()
        })
        .sum()
}

/// Jensen-Shannon distance with base-2 logarithms, in [0, 1].
pub fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    if sp <= 0.0 || sq <= 0.0 {
        return 0.0;
    }
    let mut d = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        let (a, b) = (a / sp, b / sq);
        let m = (a + b) / 2.0;
        if a > 0.0 {
            d += a * (a / m).log2();
        }
        if b > 0.0 {
            d += b * (b / m).log2();
        }
    }
    (d / 2.0).max(0.0).sqrt()
}

/// Largest absolute difference between two distributions.
pub fn l_inf(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// The Kolmogorov-Smirnov statistic estimated from bins, and its error bound: the largest
/// difference of the cumulative shares at the bin edges is a lower bound of the true statistic,
/// which exceeds it by at most the largest share of any single bin (the CDFs can only move that
/// much between two edges).
pub fn ks(reference: &[f64], current: &[f64]) -> (f64, f64) {
    let (mut fr, mut fc, mut d) = (0.0, 0.0, 0.0f64);
    let last = reference.len().saturating_sub(1);
    for (&r, &c) in reference.iter().zip(current).take(last) {
        fr += r;
        fc += c;
        d = d.max((fr - fc).abs());
    }
    let bound = reference
        .iter()
        .zip(current)
        .map(|(r, c)| r.max(*c))
        .fold(0.0, f64::max);
    (d, bound)
}

/// Wasserstein-1 distance estimated from bins: the trapezoid integral of |F_r - F_c| over
/// `lo`, the edges, `hi` (the outer bins closed at the smallest and largest values seen),
/// divided by the reference standard deviation.
pub fn wasserstein(
    reference: &[f64],
    current: &[f64],
    edges: &[f64],
    lo: f64,
    hi: f64,
    ref_std: f64,
) -> f64 {
    let first = lo.min(edges.first().copied().unwrap_or(lo));
    let last = hi.max(edges.last().copied().unwrap_or(hi));
    // Walk the points lo, edges..., hi with the CDF difference at each (0 at both ends).
    let (mut fr, mut fc) = (0.0, 0.0);
    let (mut x, mut d, mut w) = (first, 0.0f64, 0.0);
    for (i, &edge) in edges.iter().enumerate() {
        fr += reference.get(i).copied().unwrap_or(0.0);
        fc += current.get(i).copied().unwrap_or(0.0);
        let next = fr - fc;
        w += (d.abs() + next.abs()) / 2.0 * (edge - x);
        (x, d) = (edge, next);
    }
    w += d.abs() / 2.0 * (last - x);
    w / ref_std.max(1e-12)
}

/// 99 % chi-square quantiles by degrees of freedom, computed once each: a window evaluation
/// needs one per feature, and the bisection behind [`chi2_quantile`] is not cheap.
#[derive(Debug, Default)]
pub struct Chi2Table {
    q99: std::cell::RefCell<std::collections::HashMap<usize, f64>>,
}

impl Chi2Table {
    pub fn q99(&self, dof: usize) -> f64 {
        let dof = dof.max(1);
        *self
            .q99
            .borrow_mut()
            .entry(dof)
            .or_insert_with(|| chi2_quantile(0.99, dof as f64))
    }

    /// The PSI a window shows by chance alone, at 99 %: under no drift, PSI is approximately
    /// chi-square with K-1 degrees of freedom times (1/n + 1/m) for reference size n and window
    /// size m. The warning threshold is this or `floor`, whichever is larger.
    pub fn psi_noise(&self, bins: usize, n_ref: u64, m: u64, floor: f64) -> f64 {
        let noise =
            self.q99(bins.saturating_sub(1)) * (1.0 / n_ref.max(1) as f64 + 1.0 / m.max(1) as f64);
        noise.max(floor)
    }

    /// The JS distance two class distributions show by chance alone, at 99 %: JS divergence in
    /// bits is approximately chi-square (C-1 degrees of freedom) times (1/n + 1/m) / (8 ln 2).
    pub fn js_noise(&self, classes: usize, n_ref: u64, m: u64, floor: f64) -> f64 {
        let divergence = self.q99(classes.saturating_sub(1))
            * (1.0 / n_ref.max(1) as f64 + 1.0 / m.max(1) as f64)
            / (8.0 * std::f64::consts::LN_2);
        divergence.sqrt().max(floor)
    }
}

/// Natural log of the gamma function (Lanczos, g = 7, n = 9; ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularized lower incomplete gamma P(a, x): a series below a + 1, a continued fraction above.
fn gamma_p(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let lead = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-17 {
                break;
            }
        }
        return (sum.ln() + lead).exp();
    }
    // Lentz's method for the continued fraction of Q(a, x).
    let tiny = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / tiny;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..10_000 {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < tiny {
            d = tiny;
        }
        c = b + an / c;
        if c.abs() < tiny {
            c = tiny;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-17 {
            break;
        }
    }
    1.0 - (lead.exp() * h)
}

/// The `p` quantile of the chi-square distribution with `dof` degrees of freedom.
pub fn chi2_quantile(p: f64, dof: f64) -> f64 {
    let cdf = |x: f64| gamma_p(dof / 2.0, x / 2.0);
    let (mut lo, mut hi) = (0.0, dof.max(1.0));
    while cdf(hi) < p {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-13 * hi {
            break;
        }
    }
    (lo + hi) / 2.0
}

#[cfg(test)]
mod tests;
