//! Model lineage from MLflow: reads a registered model version and its run (parameters,
//! metrics, tags) through the tracking server's REST API, downloads the model's artifact
//! through the server's artifact proxy, and writes a [`BundleSpec`] that `fleetgate bundle
//! sign` completes offline. Nothing here signs: the release key never touches the machine
//! that talks to MLflow.
//!
//! Artifact locations it follows: `runs:/<run id>/<path>` (resolved against the run's
//! artifact root), `models:/<model id>` (an MLflow 3 logged model's artifact root) and
//! `mlflow-artifacts:/...` (served by `mlflow server`, the default since MLflow 2). Other
//! schemes (s3:, gs:, file:) are the client's own stores, which the tracking server does not
//! proxy: those are refused with what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::spec::BundleSpec;

/// Largest artifact downloaded (what a bundle can carry is far smaller on a device anyway).
const MAX_ARTIFACT_BYTES: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("{0:?} is not models:/NAME/VERSION (a registered model's version number)")]
    ModelUri(String),
    #[error("cannot reach the MLflow tracking server at {url}: {source}")]
    Unreachable { url: String, source: ureq::Error },
    #[error("MLflow answered {status} to {url}: {message}")]
    Api {
        url: String,
        status: u16,
        message: String,
    },
    #[error("unexpected answer from MLflow ({url}): {detail}")]
    BadAnswer { url: String, detail: String },
    #[error("{0}")]
    Artifact(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// `models:/NAME/VERSION`, parsed.
pub fn parse_model_uri(uri: &str) -> Result<(String, String), MlflowError> {
    let bad = || MlflowError::ModelUri(uri.to_owned());
    let rest = uri.strip_prefix("models:/").ok_or_else(bad)?;
    let (name, version) = rest.rsplit_once('/').ok_or_else(bad)?;
    if name.is_empty() || version.is_empty() || !version.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    Ok((name.to_owned(), version.to_owned()))
}

/// A client of one tracking server's REST API.
#[derive(Debug)]
pub struct Mlflow {
    base: String,
    agent: ureq::Agent,
}

/// What an import found and wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub spec_path: PathBuf,
    pub artifact_path: PathBuf,
    pub spec: BundleSpec,
    pub artifact_bytes: u64,
}

/// How to name what is imported.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The fleetgate model name (default: the registered model's name).
    pub name: Option<String>,
    /// The semantic version (default: `<MLflow version>.0.0`).
    pub version: Option<semver::Version>,
    /// The release counter (default: the MLflow version number, which grows with each
    /// registered version as a release counter must).
    pub release: Option<u64>,
    /// Which file of the model's artifact directory is the artifact (needed when it holds
    /// more than one).
    pub file: Option<String>,
}

impl Mlflow {
    pub fn new(tracking_uri: &str) -> Mlflow {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        Mlflow {
            base: tracking_uri.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, MlflowError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .get(&url)
            .query_pairs(query.iter().copied())
            .call()
            .map_err(|source| MlflowError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| MlflowError::BadAnswer {
                url: url.clone(),
                detail: e.to_string(),
            })?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status >= 400 {
            let message = body["message"]
                .as_str()
                .map_or_else(|| text.chars().take(300).collect(), str::to_owned);
            return Err(MlflowError::Api {
                url,
                status,
                message,
            });
        }
        if body.is_null() {
            return Err(MlflowError::BadAnswer {
                url,
                detail: "not JSON".to_owned(),
            });
        }
        Ok(body)
    }

    /// Downloads one file through the artifact proxy into `dest`; returns its size.
    fn download(&self, path: &str, dest: &Path) -> Result<u64, MlflowError> {
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{path}", self.base);
        let response = self
            .agent
            .get(&url)
            .call()
            .map_err(|source| MlflowError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(MlflowError::Api {
                url,
                status,
                message: "the artifact could not be downloaded".to_owned(),
            });
        }
        let name = dest.display().to_string();
        let tmp = dest.with_extension("part");
        let mut file = std::fs::File::create(&tmp).map_err(|e| MlflowError::Io(name.clone(), e))?;
        let mut body = response.into_body();
        let mut reader = body.with_config().limit(MAX_ARTIFACT_BYTES).reader();
        let n =
            std::io::copy(&mut reader, &mut file).map_err(|e| MlflowError::Io(name.clone(), e))?;
        file.sync_all()
            .map_err(|e| MlflowError::Io(name.clone(), e))?;
        std::fs::rename(&tmp, dest).map_err(|e| MlflowError::Io(name, e))?;
        Ok(n)
    }

    /// Where the artifact proxy serves the files of `uri`: a path under
    /// `/api/2.0/mlflow-artifacts/artifacts/`.
    fn proxied_path(&self, uri: &str) -> Result<String, MlflowError> {
        if let Some(rest) = uri.strip_prefix("runs:/") {
            let (run_id, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let run = self.get("/api/2.0/mlflow/runs/get", &[("run_id", run_id)])?;
            let root = run["run"]["info"]["artifact_uri"].as_str().ok_or_else(|| {
                MlflowError::BadAnswer {
                    url: format!("{}/api/2.0/mlflow/runs/get", self.base),
                    detail: "no artifact_uri in the run".to_owned(),
                }
            })?;
            let root = self.proxied_path(root)?;
            return Ok(join(&root, sub));
        }
        if let Some(rest) = uri.strip_prefix("models:/") {
            let id = rest.trim_end_matches('/');
            let m = self.get(&format!("/api/2.0/mlflow/logged-models/{id}"), &[])?;
            let root = m["model"]["info"]["artifact_uri"].as_str().ok_or_else(|| {
                MlflowError::BadAnswer {
                    url: format!("{}/api/2.0/mlflow/logged-models/{id}", self.base),
                    detail: "no artifact_uri in the logged model".to_owned(),
                }
            })?;
            return self.proxied_path(root);
        }
        if let Some(rest) = uri.strip_prefix("mlflow-artifacts:") {
            // `mlflow-artifacts:/path` or `mlflow-artifacts://host:port/path`.
            let path = match rest.strip_prefix("//") {
                Some(authority_and_path) => {
                    authority_and_path.split_once('/').map_or("", |(_, p)| p)
                }
                None => rest,
            };
            return Ok(path.trim_matches('/').to_owned());
        }
        Err(MlflowError::Artifact(format!(
            "the model's artifacts are at {uri}, which the tracking server does not serve; \
             run `mlflow server` with --serve-artifacts (the default) and log the model \
             through it, or download the file yourself and give it to `fleetgate bundle sign`"
        )))
    }

    /// Imports `models:/NAME/VERSION` into `out_dir`: the artifact file and a bundle spec.
    pub fn import(
        &self,
        model_uri: &str,
        out_dir: &Path,
        opts: &ImportOptions,
    ) -> Result<Imported, MlflowError> {
        let (model, number) = parse_model_uri(model_uri)?;
        let mv = self.get(
            "/api/2.0/mlflow/model-versions/get",
            &[("name", &model), ("version", &number)],
        )?;
        let mv = &mv["model_version"];
        if let Some(status) = mv["status"].as_str()
            && status != "READY"
        {
            return Err(MlflowError::Artifact(format!(
                "{model_uri} is {status}, not READY"
            )));
        }
        let run_id = mv["run_id"].as_str().unwrap_or("").to_owned();
        let source = mv["source"].as_str().unwrap_or("").to_owned();
        let mut lineage = BTreeMap::new();
        lineage.insert("mlflow.tracking_uri".to_owned(), self.base.clone());
        lineage.insert("mlflow.model".to_owned(), model_uri.to_owned());
        lineage.insert("mlflow.source".to_owned(), source.clone());
        for t in mv["tags"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (t["key"].as_str(), t["value"].as_str()) {
                lineage.insert(format!("model_tag.{k}"), v.to_owned());
            }
        }
        if let Some(d) = mv["description"].as_str().filter(|d| !d.is_empty()) {
            lineage.insert("mlflow.description".to_owned(), d.to_owned());
        }
        if !run_id.is_empty() {
            let run = self.get("/api/2.0/mlflow/runs/get", &[("run_id", &run_id)])?;
            let run = &run["run"];
            lineage.insert("mlflow.run_id".to_owned(), run_id.clone());
            if let Some(e) = run["info"]["experiment_id"].as_str() {
                lineage.insert("mlflow.experiment_id".to_owned(), e.to_owned());
            }
            for p in run["data"]["params"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (p["key"].as_str(), p["value"].as_str()) {
                    lineage.insert(format!("param.{k}"), v.to_owned());
                }
            }
            for m in run["data"]["metrics"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (m["key"].as_str(), m["value"].as_f64()) {
                    lineage.insert(format!("metric.{k}"), v.to_string());
                }
            }
            for t in run["data"]["tags"].as_array().into_iter().flatten() {
                if let (Some(k), Some(v)) = (t["key"].as_str(), t["value"].as_str()) {
                    lineage.insert(format!("tag.{k}"), v.to_owned());
                }
            }
        }
        // Where the model's files are: the server's own answer, else the version's source.
        let uri = match self.get(
            "/api/2.0/mlflow/model-versions/get-download-uri",
            &[("name", &model), ("version", &number)],
        ) {
            Ok(v) => v["artifact_uri"].as_str().unwrap_or(&source).to_owned(),
            Err(_) => source.clone(),
        };
        let dir = self.proxied_path(&uri)?;
        let listing = self.get("/api/2.0/mlflow-artifacts/artifacts", &[("path", &dir)])?;
        let files: Vec<String> = listing["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["is_dir"] != Value::Bool(true))
            .filter_map(|f| f["path"].as_str())
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
            .collect();
        // A source that is one file lists nothing: it is the artifact itself.
        let (remote, file_name) = match (&opts.file, files.as_slice()) {
            (Some(f), _) if files.iter().any(|x| x == f) => (join(&dir, f), f.clone()),
            (Some(f), []) => (join(&dir, f), f.clone()),
            (Some(f), _) => {
                return Err(MlflowError::Artifact(format!(
                    "{model_uri} has no file {f:?} at its top level; it has: {}",
                    files.join(", ")
                )));
            }
            (None, [one]) => (join(&dir, one), one.clone()),
            (None, []) => {
                let name = dir.rsplit('/').next().unwrap_or("model").to_owned();
                (dir.clone(), name)
            }
            (None, many) => {
                return Err(MlflowError::Artifact(format!(
                    "{model_uri} holds {} files ({}): name the one to ship with --file",
                    many.len(),
                    many.join(", ")
                )));
            }
        };
        std::fs::create_dir_all(out_dir)
            .map_err(|e| MlflowError::Io(out_dir.display().to_string(), e))?;
        let artifact_path = out_dir.join(&file_name);
        let size = self.download(&remote, &artifact_path)?;
        let bytes = std::fs::read(&artifact_path)
            .map_err(|e| MlflowError::Io(artifact_path.display().to_string(), e))?;
        let sha = crate::registry::keys::hex(&<[u8; 32]>::from(Sha256::digest(&bytes)));
        lineage.insert(
            "mlflow.artifact".to_owned(),
            format!("mlflow-artifacts:/{remote}"),
        );
        let version = match &opts.version {
            Some(v) => v.to_string(),
            None => format!("{number}.0.0"),
        };
        let release = opts.release.or_else(|| number.parse().ok());
        let name = opts.name.clone().unwrap_or_else(|| model.clone());
        let spec = BundleSpec {
            kind: "model".to_owned(),
            name: name.clone(),
            version: version.clone(),
            release,
            artifact: PathBuf::from(&file_name),
            artifact_sha256: Some(sha),
            lineage,
            ..BundleSpec::default()
        };
        let spec_path = out_dir.join(format!("{name}-{version}.spec.toml"));
        let text = spec.to_toml(&format!(
            "Imported from MLflow ({}) {model_uri} by `fleetgate registry import-mlflow`.\n\
             Complete it where the release key is:\n  fleetgate bundle sign --spec {} --class CLASS --key release.key --out {name}-{version}.fgb",
            self.base,
            spec_path.display()
        ));
        std::fs::write(&spec_path, text)
            .map_err(|e| MlflowError::Io(spec_path.display().to_string(), e))?;
        Ok(Imported {
            spec_path,
            artifact_path,
            spec,
            artifact_bytes: size,
        })
    }
}

fn join(dir: &str, file: &str) -> String {
    match (dir.trim_matches('/'), file.trim_matches('/')) {
        ("", f) => f.to_owned(),
        (d, "") => d.to_owned(),
        (d, f) => format!("{d}/{f}"),
    }
}

#[cfg(test)]
mod tests;
