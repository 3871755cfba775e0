//! A bundle spec: everything `fleetgate bundle sign` needs except the key, in a TOML file
//! beside the artifact. `fleetgate registry import-mlflow` writes one with the model's lineage
//! from MLflow, so that signing happens offline, where the release key is, and the key never
//! touches the gateway. Flags given to `bundle sign` override the spec's values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file, as written and read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSpec {
    /// `model` or `firmware`.
    pub kind: String,
    pub name: String,
    pub version: String,
    /// The release counter (devices install only a greater one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// The artifact file, relative to the spec's directory (or absolute).
    pub artifact: PathBuf,
    /// SHA-256 of the artifact when the spec was written, hex: signing checks it, so the file
    /// signed is the file imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    /// A golden set CSV, relative to the spec's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub lineage: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} is not a bundle spec: {1}")]
    Parse(String, toml::de::Error),
}

impl BundleSpec {
    pub fn load(path: &Path) -> Result<BundleSpec, SpecError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read(name.clone(), e))?;
        toml::from_str(&text).map_err(|e| SpecError::Parse(name, e))
    }

    /// The TOML text, with a comment saying where it came from.
    pub fn to_toml(&self, comment: &str) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        let mut out = String::new();
        for line in comment.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&body);
        out
    }

    /// A path of the spec resolved against the directory of the spec file.
    pub fn resolve(spec_path: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            spec_path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// Reads a golden set from CSV: a header row, one column named `expected` (the class id each
/// row must be predicted as), every other column a model input in order.
pub fn golden_from_csv(text: &str) -> Result<fleetgate_protocol::GoldenSet, String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| e.to_string())?.clone();
    let expected = headers
        .iter()
        .position(|h| h == "expected")
        .ok_or("the header has no column named expected (the class each row must get)")?;
    let mut cases = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|e| format!("row {}: {e}", i + 2))?;
        let mut values = Vec::new();
        let mut class = None;
        for (j, cell) in row.iter().enumerate() {
            if j == expected {
                class =
                    Some(cell.parse::<u16>().map_err(|_| {
                        format!("row {}: expected {cell:?} is not a class id", i + 2)
                    })?);
            } else {
                values.push(cell.parse::<f32>().map_err(|_| {
                    format!(
                        "row {}, column {}: {cell:?} is not a number",
                        i + 2,
                        &headers[j]
                    )
                })?);
            }
        }
        let expected = class.ok_or_else(|| format!("row {}: no expected class", i + 2))?;
        cases.push(fleetgate_protocol::GoldenCase { values, expected });
    }
    if cases.is_empty() {
        return Err("no rows".to_owned());
    }
    let set = fleetgate_protocol::GoldenSet { cases };
    fleetgate_protocol::limits::Validate::validate(&set).map_err(|e| e.to_string())?;
    Ok(set)
}

#[cfg(test)]
mod tests;
