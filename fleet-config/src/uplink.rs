//! `[uplink]`: the bridge from this site to an upstream MQTT cluster (what is forwarded, how the
//! outbox is bounded, what central operations may do here), and `[[alerts.webhooks]]`: alert
//! notifications to HTTP endpoints. Both are off until configured.

use std::path::PathBuf;
use std::time::Duration;

use fleetgate_protocol::Severity;

use crate::walk::{Problems, Section};
use crate::{FinishWith, days, ms, parse_key, secs};

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    /// Off (the default): nothing is recorded for the upstream and no connection is made.
    pub enabled: bool,
    /// Upstream brokers, tried in turn.
    pub brokers: Vec<Broker>,
    /// This site's id: a topic level, and the first half of every message's dedup id.
    pub site: String,
    /// First topic levels of every topic (`<prefix>/sites/<site>/...`).
    pub topic_prefix: String,
    /// The MQTT client id (`fleetgate-<site>` unless configured).
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password (read at start; trailing newline ignored).
    pub password_file: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Ask the broker to keep this site's session (subscriptions and requests for it queued
    /// while it is offline).
    pub persistent_session: bool,
    /// Messages published and not yet acknowledged (PUBACK) at once.
    pub inflight: u16,
    /// Reconnect backoff: doubles from `backoff_min` to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often the site's heartbeat (inventory) is published.
    pub heartbeat: Duration,
    /// Largest MQTT packet taken from the upstream (a bundle travels in one).
    pub max_packet_bytes: usize,
    /// `None`: plain TCP.
    pub tls: Option<UplinkTls>,
    pub forward: Forward,
    pub outbox: OutboxLimits,
    pub down: Down,
}

/// One upstream broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// TLS to the upstream (`[uplink.tls]`).
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkTls {
    /// CA certificates (PEM) the broker's certificate must chain to; `None`: the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for brokers that authenticate clients by
    /// certificate (AWS IoT Core, EMQX or HiveMQ with mTLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the broker's certificate must hold; `None`: the broker's host.
    pub server_name: Option<String>,
}

/// What is forwarded upstream (`[uplink.forward]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub alerts: bool,
    pub drift: bool,
    pub rollouts: bool,
    pub presence: bool,
    pub inventory: bool,
    pub telemetry: TelemetryForward,
    /// With `telemetry = "downsampled"`: at most one message per device per this long.
    pub telemetry_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryForward {
    All,
    Downsampled,
    None,
}

/// Bounds of an outbox: past either, the oldest messages are dropped (and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    pub max_messages: u64,
    pub max_bytes: u64,
}

/// What central operations may do on this site (`[uplink.down]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Down {
    /// Register signed bundles published to this site (the registry's own checks apply).
    pub bundles: bool,
    /// Start and steer rollouts by requests signed with one of `operator_keys`.
    pub rollouts: bool,
    /// ed25519 public keys of central operations, for rollout requests.
    pub operator_keys: Vec<[u8; 32]>,
    /// Also take requests from the fleet-wide topics, not only this site's.
    pub fleet: bool,
}

/// One alert notification endpoint (`[[alerts.webhooks]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Names the webhook in metrics, the API and the `receiver` field of its payloads.
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// Extra request headers, (name, value).
    pub headers: Vec<(String, String)>,
    /// Alerts below this severity are not sent.
    pub min_severity: Severity,
    /// Which alerts: hardware (from devices and rules), drift, rollout.
    pub hardware: bool,
    pub drift: bool,
    pub rollout: bool,
    /// One delivery attempt's deadline.
    pub timeout: Duration,
    /// Retry backoff after a failed delivery: doubles from `backoff_min` to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// CA certificates (PEM) the endpoint's certificate must chain to; `None`: the system's.
    pub ca: Option<PathBuf>,
}

/// A site id, device-id-like: 1 to 64 of `A-Z a-z 0-9 - _ .`, starting alphanumeric (it is a
/// topic level, so no `/ + #`).
pub fn check_site(site: &str) -> Result<(), String> {
    let ok = !site.is_empty()
        && site.len() <= 64
        && site.as_bytes()[0].is_ascii_alphanumeric()
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{site:?}: 1 to 64 of A-Z a-z 0-9 - _ ., starting with a letter or digit"
        ))
    }
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if prefix.starts_with('$') {
        return Err(format!(
            "{prefix:?}: topics starting with $ are the broker's"
        ));
    }
    if prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        return Err(format!("{prefix:?}: no empty topic levels"));
    }
    if prefix.contains(['+', '#', '\0']) {
        return Err(format!("{prefix:?}: no wildcards (+ #)"));
    }
    if prefix.len() > 128 {
        return Err("must be at most 128 bytes".to_owned());
    }
    Ok(())
}

/// `host:port`, `[v6]:port` or `v4:port`.
fn parse_broker(text: &str) -> Result<Broker, String> {
    let bad = || format!("{text:?} is not host:port (e.g. \"mqtt.example.com:8883\")");
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            (host, port)
        }
        None => text.rsplit_once(':').ok_or_else(bad)?,
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(['/', ' ']) {
        return Err(bad());
    }
    Ok(Broker {
        host: host.to_owned(),
        port,
    })
}

fn opt_path(s: &mut Section<'_>, p: &mut Problems, key: &str) -> Option<PathBuf> {
    Some(PathBuf::from(s.string(p, key))).filter(|p| !p.as_os_str().is_empty())
}

impl UplinkConfig {
    pub(crate) fn walk(mut s: Section<'_>, p: &mut Problems) -> UplinkConfig {
        let enabled = s.boolean(p, "enabled");
        let mut brokers = Vec::new();
        for (i, text) in s.strings(p, "brokers").iter().enumerate() {
            match parse_broker(text) {
                Ok(b) => brokers.push(b),
                Err(e) => s.error(p, &format!("brokers[{i}]"), &e),
            }
        }
        let site = s.string(p, "site");
        if !site.is_empty()
            && let Err(e) = check_site(&site)
        {
            s.error(p, "site", &e);
        }
        let topic_prefix = s.string(p, "topic_prefix");
        if let Err(e) = check_prefix(&topic_prefix) {
            s.error(p, "topic_prefix", &e);
        }
        let client_id = s.string(p, "client_id");
        if client_id.len() > 128 || client_id.contains(['/', '+', '#']) {
            s.error(p, "client_id", "must be at most 128 bytes, without / + #");
        }
        let username = s.string(p, "username");
        let password = s.string(p, "password");
        let password_file = opt_path(&mut s, p, "password_file");
        if !password.is_empty() && password_file.is_some() {
            s.error(
                p,
                "password_file",
                "give password or password_file, not both",
            );
        }
        let keep_alive = s.duration(p, "keep_alive", secs(5)..=secs(65_535));
        let persistent_session = s.boolean(p, "persistent_session");
        let inflight = s.usize(p, "inflight", 1..=1000) as u16;
        let backoff_min = s.duration(p, "backoff_min", ms(10)..=secs(3600));
        let backoff_max = s.duration(p, "backoff_max", ms(10)..=days(1));
        if backoff_max < backoff_min {
            s.error(p, "backoff_max", "must not be less than backoff_min");
        }
        let heartbeat = s.duration(p, "heartbeat", secs(1)..=days(1));
        let max_packet_bytes = s.usize(p, "max_packet_bytes", 1024..=256 << 20);
        let tls = UplinkTls::walk(s.section(p, "tls"), p);
        let forward = Forward::walk(s.section(p, "forward"), p);
        let outbox = OutboxLimits::walk(s.section(p, "outbox"), p);
        let down = Down::walk(s.section(p, "down"), p);
        if enabled {
            if site.is_empty() {
                s.error(p, "site", "must be set when the uplink is enabled");
            }
            if brokers.is_empty() && s.exists() {
                s.error(
                    p,
                    "brokers",
                    "must name at least one broker when the uplink is enabled",
                );
            }
        }
        let client_id = if client_id.is_empty() {
            format!("fleetgate-{site}")
        } else {
            client_id
        };
        UplinkConfig {
            enabled,
            brokers,
            site,
            topic_prefix,
            client_id,
            username: (!username.is_empty()).then_some(username),
            password: (!password.is_empty()).then_some(password),
            password_file,
            keep_alive,
            persistent_session,
            inflight,
            backoff_min,
            backoff_max,
            heartbeat,
            max_packet_bytes,
            tls,
            forward,
            outbox,
            down,
        }
        .finish_with(s, p)
    }
}

impl UplinkTls {
    fn walk(mut s: Section<'_>, p: &mut Problems) -> Option<UplinkTls> {
        let enabled = s.boolean(p, "enabled");
        let ca = opt_path(&mut s, p, "ca");
        let cert = opt_path(&mut s, p, "cert");
        let key = opt_path(&mut s, p, "key");
        match (&cert, &key) {
            (Some(_), None) => s.error(p, "key", "must be set when cert is"),
            (None, Some(_)) => s.error(p, "cert", "must be set when key is"),
            _ => {}
        }
        let server_name = s.string(p, "server_name");
        s.finish(p);
        enabled.then(|| UplinkTls {
            ca,
            cert,
            key,
            server_name: (!server_name.is_empty()).then_some(server_name),
        })
    }
}

impl Forward {
    fn walk(mut s: Section<'_>, p: &mut Problems) -> Forward {
        let telemetry = match s.string(p, "telemetry").as_str() {
            "all" => TelemetryForward::All,
            "downsampled" => TelemetryForward::Downsampled,
            "none" => TelemetryForward::None,
            other => {
                s.error(
                    p,
                    "telemetry",
                    &format!("{other:?} is not one of \"all\", \"downsampled\", \"none\""),
                );
                TelemetryForward::None
            }
        };
        Forward {
            alerts: s.boolean(p, "alerts"),
            drift: s.boolean(p, "drift"),
            rollouts: s.boolean(p, "rollouts"),
            presence: s.boolean(p, "presence"),
            inventory: s.boolean(p, "inventory"),
            telemetry,
            telemetry_interval: s.duration(p, "telemetry_interval", ms(100)..=days(1)),
        }
        .finish_with(s, p)
    }
}

impl OutboxLimits {
    pub(crate) fn walk(mut s: Section<'_>, p: &mut Problems) -> OutboxLimits {
        OutboxLimits {
            max_messages: s.u64(p, "max_messages", 1..=100_000_000),
            max_bytes: s.u64(p, "max_bytes", 64 << 10..=1 << 40),
        }
        .finish_with(s, p)
    }
}

impl Down {
    fn walk(mut s: Section<'_>, p: &mut Problems) -> Down {
        let (mut bundles, mut rollouts) = (false, false);
        for (i, what) in s.strings(p, "allow").iter().enumerate() {
            match what.as_str() {
                "bundles" => bundles = true,
                "rollouts" => rollouts = true,
                other => s.error(
                    p,
                    &format!("allow[{i}]"),
                    &format!("{other:?} is not one of \"bundles\", \"rollouts\""),
                ),
            }
        }
        let mut operator_keys: Vec<[u8; 32]> = Vec::new();
        for (i, k) in s.strings(p, "operator_keys").iter().enumerate() {
            match parse_key(k) {
                Ok(key) if operator_keys.contains(&key) => {
                    s.error(p, &format!("operator_keys[{i}]"), "is listed twice")
                }
                Ok(key) => operator_keys.push(key),
                Err(e) => s.error(p, &format!("operator_keys[{i}]"), &e),
            }
        }
        if rollouts && operator_keys.is_empty() && s.exists() {
            s.error(
                p,
                "operator_keys",
                "must hold at least one key when \"rollouts\" are allowed (rollout requests are signed)",
            );
        }
        Down {
            bundles,
            rollouts,
            operator_keys,
            fleet: s.boolean(p, "fleet"),
        }
        .finish_with(s, p)
    }
}

/// An HTTP header name: RFC 9110 token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Webhook {
    /// One `[[alerts.webhooks]]` table. Only `name` and `url` are required; the rest default.
    pub(crate) fn walk(mut s: Section<'_>, p: &mut Problems) -> Option<Webhook> {
        let name = s.string(p, "name");
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            s.error(p, "name", "must be 1 to 64 of A-Z a-z 0-9 - _ .");
        }
        let url = s.string(p, "url").trim_end_matches('/').to_owned();
        let url_ok = ["http://", "https://"].iter().any(|scheme| {
            url.strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        }) && !url.contains(char::is_whitespace);
        if !url_ok {
            s.error(
                p,
                "url",
                &format!("{url:?} is not an http:// or https:// URL"),
            );
        }
        let mut headers = Vec::new();
        if s.has("headers") {
            for (i, h) in s.strings(p, "headers").iter().enumerate() {
                match h.split_once(':') {
                    Some((n, v))
                        if is_header_name(n.trim())
                            && !v.contains(['\r', '\n'])
                            && !v.trim().is_empty() =>
                    {
                        headers.push((n.trim().to_owned(), v.trim().to_owned()))
                    }
                    _ => s.error(
                        p,
                        &format!("headers[{i}]"),
                        "expected \"Name: value\" (e.g. \"Authorization: Bearer ...\")",
                    ),
                }
            }
        }
        let min_severity = if s.has("min_severity") {
            let text = s.string(p, "min_severity");
            Severity::from_name(&text).unwrap_or_else(|| {
                s.error(p, "min_severity", "must be one of info, warning, critical");
                Severity::Info
            })
        } else {
            Severity::Info
        };
        let (mut hardware, mut drift, mut rollout) = (true, true, true);
        if s.has("alerts") {
            (hardware, drift, rollout) = (false, false, false);
            for (i, what) in s.strings(p, "alerts").iter().enumerate() {
                match what.as_str() {
                    "hardware" => hardware = true,
                    "drift" => drift = true,
                    "rollout" => rollout = true,
                    other => s.error(
                        p,
                        &format!("alerts[{i}]"),
                        &format!("{other:?} is not one of \"hardware\", \"drift\", \"rollout\""),
                    ),
                }
            }
        }
        let mut duration = |s: &mut Section<'_>, key: &str, default: Duration, max: Duration| {
            if s.has(key) {
                s.duration(p, key, ms(10)..=max)
            } else {
                default
            }
        };
        let timeout = duration(&mut s, "timeout", secs(10), secs(600));
        let backoff_min = duration(&mut s, "backoff_min", secs(1), secs(3600));
        let backoff_max = duration(&mut s, "backoff_max", secs(300), days(1));
        if backoff_max < backoff_min {
            s.error(p, "backoff_max", "must not be less than backoff_min");
        }
        let ca = if s.has("ca") {
            opt_path(&mut s, p, "ca")
        } else {
            None
        };
        s.finish(p);
        (name_ok && url_ok).then_some(Webhook {
            name,
            url,
            headers,
            min_severity,
            hardware,
            drift,
            rollout,
            timeout,
            backoff_min,
            backoff_max,
            ca,
        })
    }
}

#[cfg(test)]
mod tests;
