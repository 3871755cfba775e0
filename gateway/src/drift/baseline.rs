//! A model version's baseline: what its inputs and predictions looked like on reference data.
//!
//! Each feature is cut into K bins at the reference quantiles j/K (numpy's default "linear"
//! definition), with open outer bins: bin i holds x with `edges[i-1] <= x < edges[i]`. Ties can
//! merge edges, so a feature may end up with fewer than K bins. A value the reference holds many
//! times (a tie: a constant, an integer feature, a sensor's dropout value) gets a bin of its own,
//! `[v, next float above v)`, so a move off it in either direction changes the bins. Devices that
//! know the edges send counts per bin instead of raw samples.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// In the model's input order: a telemetry sample's value `i` is feature `i`.
    pub features: Vec<FeatureBaseline>,
    #[serde(default)]
    pub prediction: Option<PredictionBaseline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureBaseline {
    pub name: String,
    /// Interior bin edges, strictly increasing.
    pub edges: Vec<f64>,
    /// Share of the reference in each bin (edges + 1 of them).
    pub reference: Vec<f64>,
    pub n: u64,
    pub mean: f64,
    /// Population standard deviation (ddof = 0).
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionBaseline {
    /// Share of each predicted class, by class id.
    pub classes: Vec<f64>,
    pub n: u64,
    pub mean_confidence: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BaselineError {
    #[error("reference CSV: {0}")]
    Csv(String),
    #[error("{0}")]
    Invalid(String),
}

/// Most features and bins a baseline may have (bounded memory per window).
pub const MAX_FEATURES: usize = fleetgate_protocol::limits::MAX_FEATURES;
pub const MAX_BINS: usize = 100;
/// Fewest reference samples of a feature or of the predictions: below it the reference's own
/// sampling noise swamps any drift.
pub const MIN_REFERENCE: u64 = 100;

/// The bin of `x` for these edges.
pub fn bin_of(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|e| *e <= x)
}

/// numpy's default ("linear") quantile of sorted data.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The smallest value above `v` that is a 32-bit float (edges travel to devices as f32), so
/// `[v, above_f32(v))` holds v as a device sends it.
pub fn above_f32(v: f64) -> f64 {
    let f = v as f32;
    let f = if f64::from(f) < v { f.next_up() } else { f };
    f64::from(f.next_up())
}

impl FeatureBaseline {
    /// A robust standard deviation: the interquartile range / 1.349 (equal to the standard
    /// deviation for normal data, untouched by a few outliers), read off the reference's CDF at
    /// the edges; the standard deviation when ties make the IQR 0; `None` for a constant.
    pub fn scale(&self) -> Option<f64> {
        if self.std <= 0.0 {
            return None;
        }
        let q = |p: f64| -> f64 {
            let mut cum = 0.0;
            let mut x0 = self.min;
            for (i, r) in self.reference.iter().enumerate() {
                let x1 = self.edges.get(i).copied().unwrap_or(self.max);
                if cum + r >= p && *r > 0.0 {
                    // A tied value's own bin is a point, not an interval.
                    if x1 <= above_f32(x0) {
                        return x0;
                    }
                    return x0 + (x1 - x0) * ((p - cum) / r).clamp(0.0, 1.0);
                }
                cum += r;
                x0 = x1;
            }
            self.max
        };
        let iqr = (q(0.75) - q(0.25)) / 1.349;
        if iqr.is_finite() && iqr > 0.0 {
            Some(iqr)
        } else {
            Some(self.std)
        }
    }

    /// Builds a feature's baseline from its reference values.
    pub fn build(
        name: &str,
        values: &[f64],
        bins: usize,
    ) -> Result<FeatureBaseline, BaselineError> {
        let mut sorted: Vec<f64> = values.to_vec();
        if sorted.iter().any(|v| !v.is_finite()) {
            return Err(BaselineError::Invalid(format!(
                "feature {name}: values must be finite"
            )));
        }
        if (sorted.len() as u64) < MIN_REFERENCE {
            return Err(BaselineError::Invalid(format!(
                "feature {name}: at least {MIN_REFERENCE} reference values needed, found {}",
                sorted.len()
            )));
        }
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = (1..bins)
            .map(|j| quantile(&sorted, j as f64 / bins as f64))
            .collect();
        edges.dedup();
        // Ties: an edge on a value holding at least half a bin's share gets the value's own bin.
        let atom = (sorted.len() / (2 * bins)).max(2);
        let mut room = (MAX_BINS - 1).saturating_sub(edges.len());
        let mut with_atoms = Vec::with_capacity(edges.len() * 2);
        for (i, &e) in edges.iter().enumerate() {
            with_atoms.push(e);
            let ties = sorted.partition_point(|v| *v <= e) - sorted.partition_point(|v| *v < e);
            let above = above_f32(e);
            let next = edges.get(i + 1).copied().unwrap_or(f64::INFINITY);
            if ties >= atom && above < next && room > 0 {
                with_atoms.push(above);
                room -= 1;
            }
        }
        let edges = with_atoms;
        let mut counts = vec![0u64; edges.len() + 1];
        for &v in &sorted {
            counts[bin_of(&edges, v)] += 1;
        }
        let n = sorted.len() as u64;
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        Ok(FeatureBaseline {
            name: name.to_owned(),
            reference: counts.iter().map(|&c| c as f64 / n as f64).collect(),
            edges,
            n,
            mean,
            std: var.sqrt(),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

impl Baseline {
    /// Builds a baseline from a reference CSV: a header, then one row per sample with one
    /// numeric column per feature; `prediction` (class id) and `confidence` columns are
    /// optional and named by the caller.
    pub fn from_csv(
        text: &str,
        prediction: Option<&str>,
        confidence: Option<&str>,
        bins: usize,
    ) -> Result<Baseline, BaselineError> {
        if !(2..=MAX_BINS).contains(&bins) {
            return Err(BaselineError::Invalid(format!(
                "bins must be within 2..={MAX_BINS}"
            )));
        }
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| BaselineError::Csv(e.to_string()))?
            .iter()
            .map(str::to_owned)
            .collect();
        let column = |name: Option<&str>| -> Result<Option<usize>, BaselineError> {
            name.map(|n| {
                headers
                    .iter()
                    .position(|h| h == n)
                    .ok_or_else(|| BaselineError::Csv(format!("no column {n:?}")))
            })
            .transpose()
        };
        let (pred_col, conf_col) = (column(prediction)?, column(confidence)?);
        let feature_cols: Vec<usize> = (0..headers.len())
            .filter(|i| Some(*i) != pred_col && Some(*i) != conf_col)
            .collect();
        if feature_cols.is_empty() || feature_cols.len() > MAX_FEATURES {
            return Err(BaselineError::Csv(format!(
                "1 to {MAX_FEATURES} feature columns needed, found {}",
                feature_cols.len()
            )));
        }
        let mut columns = vec![Vec::new(); feature_cols.len()];
        let (mut classes, mut conf_sum, mut conf_n) = (Vec::<u64>::new(), 0.0, 0u64);
        for (row, record) in reader.records().enumerate() {
            let record = record.map_err(|e| BaselineError::Csv(e.to_string()))?;
            let field = |i: usize| -> Result<f64, BaselineError> {
                let raw = record.get(i).unwrap_or("");
                raw.parse::<f64>().map_err(|_| {
                    BaselineError::Csv(format!(
                        "row {}: column {:?}: {raw:?} is not a number",
                        row + 2,
                        headers[i]
                    ))
                })
            };
            for (k, &i) in feature_cols.iter().enumerate() {
                columns[k].push(field(i)?);
            }
            if let Some(i) = pred_col {
                let class = field(i)?;
                if class < 0.0 || class.fract() != 0.0 || class >= 256.0 {
                    return Err(BaselineError::Csv(format!(
                        "row {}: prediction must be a class id 0..255",
                        row + 2
                    )));
                }
                let class = class as usize;
                if classes.len() <= class {
                    classes.resize(class + 1, 0);
                }
                classes[class] += 1;
            }
            if let Some(i) = conf_col {
                conf_sum += field(i)?;
                conf_n += 1;
            }
        }
        let features = feature_cols
            .iter()
            .zip(&columns)
            .map(|(&i, values)| FeatureBaseline::build(&headers[i], values, bins))
            .collect::<Result<Vec<_>, _>>()?;
        let n_pred: u64 = classes.iter().sum();
        let prediction = (n_pred > 0).then(|| PredictionBaseline {
            classes: classes.iter().map(|&c| c as f64 / n_pred as f64).collect(),
            n: n_pred,
            mean_confidence: (conf_n > 0).then(|| conf_sum / conf_n as f64),
        });
        let baseline = Baseline {
            features,
            prediction,
        };
        baseline.validate()?;
        Ok(baseline)
    }

    /// Checks a baseline (one built elsewhere and uploaded, too).
    pub fn validate(&self) -> Result<(), BaselineError> {
        let bad = |m: String| Err(BaselineError::Invalid(m));
        if self.features.is_empty() || self.features.len() > MAX_FEATURES {
            return bad(format!("1 to {MAX_FEATURES} features needed"));
        }
        for f in &self.features {
            let name = &f.name;
            if f.edges.is_empty() || f.edges.len() >= MAX_BINS {
                return bad(format!(
                    "feature {name}: 1 to {} edges needed",
                    MAX_BINS - 1
                ));
            }
            // Devices receive the edges as f32 (`edges`): they must stay finite and apart there.
            let as_sent: Vec<f32> = f.edges.iter().map(|&e| e as f32).collect();
            if as_sent.iter().any(|e| !e.is_finite()) || as_sent.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!(
                    "feature {name}: edges must be finite and strictly increasing as 32-bit floats (what devices receive)"
                ));
            }
            if f.reference.len() != f.edges.len() + 1 {
                return bad(format!(
                    "feature {name}: {} reference shares for {} bins",
                    f.reference.len(),
                    f.edges.len() + 1
                ));
            }
            let total: f64 = f.reference.iter().sum();
            if f.reference.iter().any(|r| !(0.0..=1.0).contains(r)) || (total - 1.0).abs() > 1e-6 {
                return bad(format!(
                    "feature {name}: reference shares must be within 0..=1 and sum to 1"
                ));
            }
            if f.n < MIN_REFERENCE {
                return bad(format!(
                    "feature {name}: at least {MIN_REFERENCE} reference samples needed (n is {})",
                    f.n
                ));
            }
            if !f.std.is_finite()
                || f.std < 0.0
                || !f.mean.is_finite()
                || !f.min.is_finite()
                || !f.max.is_finite()
                || f.min > f.max
            {
                return bad(format!(
                    "feature {name}: n, mean, std, min and max must be sane"
                ));
            }
        }
        if let Some(p) = &self.prediction {
            let total: f64 = p.classes.iter().sum();
            if p.classes.is_empty()
                || p.classes.len() > 256
                || p.classes.iter().any(|c| !(0.0..=1.0).contains(c))
                || (total - 1.0).abs() > 1e-6
            {
                return bad("prediction: class shares must be within 0..=1 and sum to 1, at most 256 classes".into());
            }
            if p.n < MIN_REFERENCE {
                return bad(format!(
                    "prediction: at least {MIN_REFERENCE} reference predictions needed (n is {})",
                    p.n
                ));
            }
            if p.mean_confidence.is_some_and(|c| !(0.0..=1.0).contains(&c)) {
                return bad("prediction: mean_confidence must be within 0..=1".into());
            }
        }
        Ok(())
    }

    /// The interior edges of every feature, for devices that bin their inputs.
    pub fn edges(&self) -> Vec<Vec<f32>> {
        self.features
            .iter()
            .map(|f| f.edges.iter().map(|&e| e as f32).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests;
