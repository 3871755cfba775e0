#!/usr/bin/env python3
"""Reference values for the gateway's drift metrics, computed independently with numpy/scipy.

Writes gateway/src/drift/fixtures.json, which the Rust unit tests read (tolerance 1e-9 on the
same bins). CI does not run this script; rerun it only when the cases change:

    pip install numpy scipy && python3 scripts/drift_reference.py

Definitions (docs/drift.md has them with their rationale):
- bins: K-1 interior edges; bin i holds x with edges[i-1] <= x < edges[i] (open outer bins);
- PSI = sum (c_i - r_i) ln(c_i / r_i), with shares below EPS raised to EPS = 1e-4;
- JS = Jensen-Shannon distance with base-2 logarithms (scipy.spatial.distance.jensenshannon);
- KS = max over edges of |F_r - F_c| (cumulative shares); bound = max_i max(r_i, c_i), so the
  true KS statistic lies in [KS, KS + bound];
- W1 = trapezoid integral of |F_r - F_c| over lo, edges..., hi, where lo/hi are the smallest /
  largest values seen in either sample, divided by the reference standard deviation (ddof=0);
- prediction JS (same as above) and L-infinity = max_i |c_i - r_i| on class frequencies;
- chi2 quantiles from scipy.stats.chi2.ppf.
"""

import json
import os

import numpy as np
from scipy import stats
from scipy.spatial import distance

SEED = 20261127
EPS = 1e-4
rng = np.random.default_rng(SEED)


def bin_counts(x, edges):
    return np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)


def psi(r, c):
    r = np.maximum(r, EPS)
    c = np.maximum(c, EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_bins(r, c):
    d = np.abs(np.cumsum(r)[:-1] - np.cumsum(c)[:-1])
    return float(d.max() if len(d) else 0.0), float(np.max(np.maximum(r, c)))


def w_bins(r, c, edges, lo, hi, std):
    xs = np.concatenate([[lo], edges, [hi]])
    d = np.concatenate([[0.0], np.cumsum(r)[:-1] - np.cumsum(c)[:-1], [0.0]])
    w = np.sum((np.abs(d[:-1]) + np.abs(d[1:])) / 2.0 * np.diff(xs))
    return float(w / max(std, 1e-12))


cases = []
for k, n_ref, m, shift, scale in [
    (10, 5000, 2000, 0.0, 1.0),
    (10, 5000, 2000, 0.5, 1.0),
    (10, 5000, 600, 0.0, 1.3),
    (5, 20000, 10000, 1.0, 1.0),
    (20, 3000, 800, -0.2, 0.8),
    (10, 5000, 2000, 3.0, 0.5),
]:
    ref = rng.normal(0.0, 1.0, n_ref)
    cur = rng.normal(shift, scale, m)
    edges = np.quantile(ref, np.arange(1, k) / k)
    r = bin_counts(ref, edges) / n_ref
    counts = bin_counts(cur, edges)
    c = counts / m
    lo, hi = min(ref.min(), cur.min()), max(ref.max(), cur.max())
    ks, bound = ks_bins(r, c)
    exact_ks = float(stats.ks_2samp(ref, cur).statistic)
    cases.append({
        "k": k, "n_ref": n_ref, "m": m, "shift": shift, "scale": scale,
        "edges": edges.tolist(), "reference": r.tolist(),
        "ref_min": float(ref.min()), "ref_max": float(ref.max()), "ref_std": float(ref.std()),
        "ref_mean": float(ref.mean()),
        "counts": counts.tolist(), "cur_min": float(cur.min()), "cur_max": float(cur.max()),
        "psi": psi(r, c),
        "js": float(distance.jensenshannon(r, c, base=2)),
        "ks": ks, "ks_bound": bound, "ks_exact_raw": exact_ks,
        "wasserstein": w_bins(r, c, edges, lo, hi, float(ref.std())),
        "wasserstein_exact_raw": float(stats.wasserstein_distance(ref, cur) / ref.std()),
        "psi_noise_floor": max(0.1, float(stats.chi2.ppf(0.99, k - 1)) * (1.0 / n_ref + 1.0 / m)),
    })

predictions = []
for ref_p, counts in [
    ([0.7, 0.2, 0.1], [1400, 400, 200]),
    ([0.7, 0.2, 0.1], [700, 900, 400]),
    ([0.25, 0.25, 0.25, 0.25], [10, 0, 30, 60]),
    ([0.5, 0.5], [1, 999]),
]:
    r = np.array(ref_p)
    c = np.array(counts) / np.sum(counts)
    predictions.append({
        "reference": ref_p, "counts": counts,
        "js": float(distance.jensenshannon(r, c, base=2)),
        "l_inf": float(np.max(np.abs(r - c))),
    })

chi2 = [{"p": p, "dof": d, "quantile": float(stats.chi2.ppf(p, d))}
        for p in (0.99, 0.95, 0.5) for d in (1, 2, 4, 9, 19, 99)]

out = {
    "generated_by": "scripts/drift_reference.py",
    "seed": SEED, "numpy": np.__version__, "scipy": __import__("scipy").__version__,
    "eps": EPS, "cases": cases, "predictions": predictions, "chi2": chi2,
}
path = os.path.join(os.path.dirname(__file__), "..", "gateway", "src", "drift", "fixtures.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print(f"wrote {os.path.normpath(path)}: {len(cases)} cases, {len(predictions)} prediction cases, {len(chi2)} quantiles")
