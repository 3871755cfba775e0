//! What a fleetgate gateway says it ingested: samples of `GET /api/v1/ingest`, taken before
//! and after a phase of load, and their differences.
//!
//! Fields read: `stored.telemetry`, `telemetry_lost`, `telemetry_duplicates`, and where the
//! gateway has them, `latency` (device timestamp to stored, `{count, p50_ms, p99_ms, p999_ms,
//! max_ms}`, over everything stored since the gateway started) and `process`
//! (`{resident_bytes, cpu_seconds}`). A gateway without the last two gives `None` for them; a
//! summary prints `-`.
//!
//! Also what the gateway holds, number by number: every stored telemetry message of a device,
//! read back through `GET /api/v1/devices/{id}/telemetry` page by page, so that each sequence
//! number a device had acknowledged can be looked up; and the backpressure counters of
//! `/metrics`. And, for any broker on this machine, its CPU time and memory from `/proc`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::seq::SeqSet;
use crate::stats::{Percentiles, delta, per_second};

/// Rows asked for per page of a device's telemetry: the API's largest `limit`.
pub const PAGE: usize = 10_000;
/// Most pages read for one device (a hundred million rows).
const MAX_PAGES: usize = 10_000;

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
    #[error("telemetry of {device}: {message}")]
    Telemetry { device: String, message: String },
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// GETs `path` of the API as JSON.
fn get_json(api: &Api, path: &str) -> Result<Value, IngestError> {
    let url = format!("{}{path}", api.url.trim_end_matches('/'));
    let err = |message: String| IngestError::Http {
        url: url.clone(),
        message,
    };
    agent()
        .get(&url)
        .header("Authorization", &format!("Bearer {}", api.token))
        .call()
        .map_err(|e| err(e.to_string()))?
        .into_body()
        .read_json()
        .map_err(|e| err(e.to_string()))
}

/// One stored telemetry message, as the telemetry API lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRow {
    pub boot: u32,
    pub seq: u32,
    pub received_ms: u64,
}

/// Reads the rows of one page of `GET /api/v1/devices/{id}/telemetry`.
pub fn parse_rows(v: &Value) -> Result<Vec<StoredRow>, String> {
    let rows = v.as_array().ok_or("the answer is not a list")?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let n = |field: &str| {
                r[field]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("row {i} has no {field}"))
            };
            let received = r["received_at"]
                .as_str()
                .ok_or_else(|| format!("row {i} has no received_at"))?;
            let at = humantime::parse_rfc3339(received)
                .map_err(|e| format!("row {i}: received_at {received:?}: {e}"))?;
            let received_ms = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Ok(StoredRow {
                boot: n("boot")?,
                seq: n("seq")?,
                received_ms,
            })
        })
        .collect()
}

/// The `to` (Unix ms, exclusive) of the page after `rows`, a full or partial page of `limit`
/// rows, newest first, that was asked for with `to`; `None` after the last page.
///
/// The next page starts again at the millisecond of this page's oldest row: the API is
/// exclusive in whole milliseconds but orders rows more finely, so rows of that millisecond may
/// not all have fitted. Rows read twice are the same numbers again. A page that ends where the
/// last one did cannot make progress (more than `limit` rows within a millisecond): an error.
pub fn next_page(rows: &[StoredRow], limit: usize, to: Option<u64>) -> Result<Option<u64>, String> {
    let Some(oldest) = rows.last() else {
        return Ok(None);
    };
    if rows.len() < limit {
        return Ok(None);
    }
    let next = oldest.received_ms + 1;
    if to.is_some_and(|t| next >= t) {
        return Err(format!(
            "more than {limit} rows within the millisecond {}",
            oldest.received_ms
        ));
    }
    Ok(Some(next))
}

/// What the gateway holds of one device: its stored sequence numbers by boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub boots: std::collections::HashMap<u32, SeqSet>,
}

impl Stored {
    pub fn contains(&self, boot: u32, seq: u32) -> bool {
        self.boots.get(&boot).is_some_and(|s| s.contains(seq))
    }

    /// Reads back every stored telemetry message of `device` (blocking: run it off the async
    /// workers). Only what retention kept can be found.
    pub fn fetch(api: &Api, device: &str) -> Result<Stored, IngestError> {
        let err = |message: String| IngestError::Telemetry {
            device: device.to_owned(),
            message,
        };
        let mut stored = Stored::default();
        let mut to = None;
        for _ in 0..MAX_PAGES {
            let until = to.map(|t| format!("&to={t}")).unwrap_or_default();
            let v = get_json(
                api,
                &format!("/api/v1/devices/{device}/telemetry?limit={PAGE}{until}"),
            )?;
            let rows = parse_rows(&v).map_err(err)?;
            for r in &rows {
                stored.boots.entry(r.boot).or_default().insert(r.seq);
            }
            match next_page(&rows, PAGE, to).map_err(err)? {
                Some(next) => to = Some(next),
                None => return Ok(stored),
            }
        }
        Err(err(format!("more than {MAX_PAGES} pages")))
    }
}

/// The gateway's backpressure counters (`/metrics`): times a session found the writer's queue
/// full, and publishes held back by a device's rate limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Backpressure {
    pub queue_full: u64,
    pub publishes_delayed: u64,
}

impl Backpressure {
    /// Reads the two counters from an OpenMetrics text; a counter not in it reads 0.
    pub fn parse(text: &str) -> Backpressure {
        let counter = |name: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix(name))
                .filter_map(|rest| rest.strip_prefix(' '))
                .find_map(|v| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        Backpressure {
            queue_full: counter("fleetgate_ingest_queue_full_total"),
            publishes_delayed: counter("fleetgate_mqtt_publishes_delayed_total"),
        }
    }

    /// Fetches `/metrics` (blocking).
    pub fn fetch(api: &Api) -> Result<Backpressure, IngestError> {
        let url = format!("{}/metrics", api.url.trim_end_matches('/'));
        let err = |message: String| IngestError::Http {
            url: url.clone(),
            message,
        };
        let text = agent()
            .get(&url)
            .header("Authorization", &format!("Bearer {}", api.token))
            .call()
            .map_err(|e| err(e.to_string()))?
            .into_body()
            .read_to_string()
            .map_err(|e| err(e.to_string()))?;
        Ok(Backpressure::parse(&text))
    }

    /// What happened between two readings.
    pub fn since(&self, earlier: &Backpressure) -> Backpressure {
        Backpressure {
            queue_full: delta(earlier.queue_full, self.queue_full),
            publishes_delayed: delta(earlier.publishes_delayed, self.publishes_delayed),
        }
    }
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
        let value = get_json(api, "/api/v1/ingest")?;
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

/// A process on this machine (the broker under load) as Linux's `/proc` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    pub at: Instant,
    /// CPU time, user and system, of all its threads.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

impl ProcSample {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` as given.
    pub fn parse(stat: &str, status: &str, at: Instant) -> Option<ProcSample> {
        // The command name may hold spaces and parentheses: fields count after the last ')'.
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(ProcSample {
            at,
            // USER_HZ is 100 on every Linux the project runs on.
            cpu_seconds: ticks as f64 / 100.0,
            resident_bytes: kib * 1024,
        })
    }

    /// Samples process `pid` now; `None` if it is gone (or this is not Linux).
    pub fn read(pid: u32) -> Option<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        ProcSample::parse(&stat, &status, Instant::now())
    }

    /// CPU used between `earlier` and this sample, in percent of one core.
    pub fn cpu_pct_since(&self, earlier: &ProcSample) -> Option<f64> {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        (wall > 0.0).then(|| (self.cpu_seconds - earlier.cpu_seconds).max(0.0) / wall * 100.0)
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
