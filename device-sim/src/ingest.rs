//! What a fleetgate gateway says it ingested: samples of `GET /api/v1/ingest`, taken before
//! and after a phase of load, and their differences.
//!
//! Fields read: `stored.telemetry`, `telemetry_lost`, `telemetry_duplicates`, and where the
//! gateway has them, `latency` (device timestamp to stored, `{count, p50_ms, p99_ms, p999_ms,
//! max_ms}`, over everything stored since the gateway started) and `process`
//! (`{resident_bytes, cpu_seconds}`). A gateway without the last two gives `None` for them; a
//! summary prints `-`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats::{Percentiles, delta, per_second};

/// The gateway's operator API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub token: String,
}

/// The gateway process, as it reports itself (`null` where its platform cannot tell).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// One answer of `GET /api/v1/ingest`, with the time it was taken.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestSample {
    pub at: Instant,
    /// Telemetry messages stored since the gateway started.
    pub telemetry: u64,
    /// Telemetry the gateway counts as lost (gaps in sequence numbers; late arrivals take it
    /// down again).
    pub lost: i64,
    pub duplicates: u64,
    pub latency: Option<Percentiles>,
    pub process: Option<Process>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("GET {url}: {message}")]
    Http { url: String, message: String },
    #[error("GET /api/v1/ingest answered without {0}")]
    Missing(&'static str),
}

impl IngestSample {
    /// Reads the fields the simulator needs from the API's answer.
    pub fn parse(v: &Value, at: Instant) -> Result<IngestSample, IngestError> {
        let telemetry = v["stored"]["telemetry"]
            .as_u64()
            .ok_or(IngestError::Missing("stored.telemetry"))?;
        let lost = v["telemetry_lost"]
            .as_i64()
            .ok_or(IngestError::Missing("telemetry_lost"))?;
        let duplicates = v["telemetry_duplicates"]
            .as_u64()
            .ok_or(IngestError::Missing("telemetry_duplicates"))?;
        Ok(IngestSample {
            at,
            telemetry,
            lost,
            duplicates,
            // A gateway that has stored nothing yet answers a count of 0 (and zeros).
            latency: serde_json::from_value::<Percentiles>(v["latency"].clone())
                .ok()
                .filter(|l| l.count > 0),
            process: serde_json::from_value(v["process"].clone()).ok(),
        })
    }

    /// Fetches a sample (blocking: run it off the async workers).
    pub fn fetch(api: &Api) -> Result<IngestSample, IngestError> {
        let url = format!("{}/api/v1/ingest", api.url.trim_end_matches('/'));
        let err = |message: String| IngestError::Http {
            url: url.clone(),
            message,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let value: Value = agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", api.token))
            .call()
            .map_err(|e| err(e.to_string()))?
            .into_body()
            .read_json()
            .map_err(|e| err(e.to_string()))?;
        IngestSample::parse(&value, Instant::now())
    }

    /// Fetches a sample on a blocking thread.
    pub async fn fetch_async(api: &Api) -> Result<IngestSample, IngestError> {
        let api = api.clone();
        tokio::task::spawn_blocking(move || IngestSample::fetch(&api))
            .await
            .unwrap_or_else(|e| {
                Err(IngestError::Http {
                    url: "/api/v1/ingest".to_owned(),
                    message: e.to_string(),
                })
            })
    }
}

/// What the gateway did between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IngestDelta {
    /// Telemetry stored between the samples.
    pub stored: u64,
    pub per_second: f64,
    /// Change of the lost count (negative when late arrivals filled earlier gaps).
    pub lost: i64,
    pub duplicates: u64,
    /// Gateway CPU time over wall time between the samples, in percent of one core.
    pub cpu_pct: Option<f64>,
}

impl IngestDelta {
    pub fn between(before: &IngestSample, after: &IngestSample) -> IngestDelta {
        let wall = after.at.saturating_duration_since(before.at);
        let stored = delta(before.telemetry, after.telemetry);
        let cpu = |s: &IngestSample| s.process.and_then(|p| p.cpu_seconds);
        let cpu_pct = match (cpu(before), cpu(after)) {
            (Some(b), Some(a)) if wall > Duration::ZERO => {
                Some(((a - b).max(0.0) / wall.as_secs_f64()) * 100.0)
            }
            _ => None,
        };
        IngestDelta {
            stored,
            per_second: per_second(stored, wall),
            lost: after.lost - before.lost,
            duplicates: delta(before.duplicates, after.duplicates),
            cpu_pct,
        }
    }
}

#[cfg(test)]
mod tests;
