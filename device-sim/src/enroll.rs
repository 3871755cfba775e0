//! Device credentials for a simulated fleet: enrolled through a gateway's API, or read from a
//! file saved by an earlier run.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// A device id and the secret it connects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub id: String,
    pub secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("gateway API: {0}")]
    Api(String),
    #[error("credentials file {path}: {message}")]
    File { path: String, message: String },
}

/// Spreads a fleet over groups by a device label: the i-th device gets
/// `label = "<label>-<i mod groups>"` (e.g. `site = "site-3"`), for cohorts and rollout stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    pub label: String,
    pub groups: usize,
}

impl Spread {
    fn labels(&self, i: usize) -> Value {
        json!({ &self.label: format!("{}-{}", self.label, i % self.groups.max(1)) })
    }
}

impl std::str::FromStr for Spread {
    type Err = String;

    fn from_str(s: &str) -> Result<Spread, String> {
        let (label, groups) = s
            .split_once('=')
            .ok_or("expected LABEL=GROUPS, e.g. site=20")?;
        let groups: usize = groups
            .parse()
            .map_err(|_| format!("groups {groups:?} is not a number"))?;
        if label.is_empty() || groups == 0 {
            return Err("the label must not be empty and groups must be at least 1".into());
        }
        Ok(Spread {
            label: label.to_owned(),
            groups,
        })
    }
}

/// Enrolls `ids` (re-issuing the credential of ids already enrolled), `threads` at a time,
/// labelled by `spread` if given (a re-issued credential keeps the device's labels).
pub fn enroll(
    api: &str,
    token: &str,
    ids: &[String],
    spread: Option<&Spread>,
    threads: usize,
) -> Result<Vec<Credential>, EnrollError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let base = format!("{}/api/v1", api.trim_end_matches('/'));
    let auth = format!("Bearer {token}");
    let one = |i: usize, id: &str| -> Result<Credential, EnrollError> {
        let post = |path: String, body: Value| -> Result<(u16, Value), EnrollError> {
            let response = agent
                .post(&path)
                .header("Authorization", &auth)
                .send_json(body)
                .map_err(|e| EnrollError::Api(format!("{path}: {e}")))?;
            let status = response.status().as_u16();
            let value: Value = response
                .into_body()
                .read_json()
                .map_err(|e| EnrollError::Api(format!("{path}: {e}")))?;
            Ok((status, value))
        };
        let (mut status, mut body) = post(
            format!("{base}/devices"),
            match spread {
                Some(sp) => json!({ "id": id, "labels": sp.labels(i) }),
                None => json!({ "id": id }),
            },
        )?;
        if status == 409 {
            (status, body) = post(format!("{base}/devices/{id}/credential"), json!({}))?;
        }
        match body["credential"].as_str() {
            Some(secret) if status < 300 => Ok(Credential {
                id: id.to_owned(),
                secret: secret.to_owned(),
            }),
            _ => Err(EnrollError::Api(format!(
                "enrolling {id}: {status} {}",
                body["error"]
            ))),
        }
    };
    let threads = threads.clamp(1, 16);
    let chunk = ids.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(j, id)| one(c * chunk + j, id))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(ids.len());
        for h in handles {
            let part = h
                .join()
                .map_err(|_| EnrollError::Api("enrollment thread panicked".into()))??;
            all.extend(part);
        }
        Ok(all)
    })
}

/// Reads `id,secret` lines.
pub fn load(path: &Path) -> Result<Vec<Credential>, EnrollError> {
    let err = |message: String| EnrollError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            let (id, secret) = line
                .split_once(',')
                .ok_or_else(|| err(format!("line {}: expected id,secret", n + 1)))?;
            Ok(Credential {
                id: id.trim().to_owned(),
                secret: secret.trim().to_owned(),
            })
        })
        .collect()
}

/// Writes `id,secret` lines, readable by the owner only.
pub fn save(path: &Path, credentials: &[Credential]) -> Result<(), EnrollError> {
    let err = |e: std::io::Error| EnrollError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let text: String = credentials
        .iter()
        .map(|c| format!("{},{}\n", c.id, c.secret))
        .collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write;
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(err)
}

/// Device ids `prefix-00000`, `prefix-00001`, ...
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_labels_devices_round_robin() {
        let s: Spread = "site=20".parse().unwrap();
        assert_eq!(s.labels(0), json!({ "site": "site-0" }));
        assert_eq!(s.labels(23), json!({ "site": "site-3" }));
        assert_eq!(s.labels(19), json!({ "site": "site-19" }));
    }

    #[test]
    fn spread_refuses_malformed_input() {
        for bad in ["site", "site=0", "=3", "site=x", "site=-1"] {
            assert!(bad.parse::<Spread>().is_err(), "{bad} parsed");
        }
    }
}
