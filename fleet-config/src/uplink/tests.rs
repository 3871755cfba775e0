use std::path::PathBuf;
use std::time::Duration;

use fleetgate_protocol::Severity;

use crate::{Broker, Config, TelemetryForward};

fn errors(text: &str) -> Vec<String> {
    Config::from_toml_str(text, "test.toml")
        .unwrap_err()
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn off_by_default_with_documented_defaults() {
    let c = Config::default();
    let u = &c.uplink;
    assert!(!u.enabled);
    assert!(u.brokers.is_empty());
    assert_eq!(u.topic_prefix, "fleetgate");
    assert_eq!(u.tls, None);
    assert_eq!(u.forward.telemetry, TelemetryForward::Downsampled);
    assert_eq!(u.forward.telemetry_interval, Duration::from_secs(60));
    assert!(u.forward.alerts && u.forward.drift && u.forward.rollouts);
    assert_eq!(u.outbox.max_messages, 2_000_000);
    assert!(!u.down.bundles && !u.down.rollouts && u.down.fleet);
    assert!(c.alerts.webhooks.is_empty());
    assert_eq!(c.alerts.webhook_outbox.max_messages, 100_000);
    assert_eq!(c.http.external_url, "http://127.0.0.1:8080");
}

#[test]
fn an_enabled_uplink_with_tls_credentials_and_permissions() {
    let key = "11".repeat(32);
    let c = Config::from_toml_str(
        &format!(
            r#"
[http]
listen = "0.0.0.0:8080"
[uplink]
enabled = true
brokers = ["mqtt-1.example.com:8883", "[::1]:1883", "10.0.0.2:1883"]
site = "site-a"
topic_prefix = "acme/fleet"
username = "gw"
password = "secret"
[uplink.tls]
enabled = true
ca = "/etc/fleetgate/ca.pem"
cert = "/etc/fleetgate/site-a.pem"
key = "/etc/fleetgate/site-a.key"
[uplink.forward]
telemetry = "all"
[uplink.down]
allow = ["bundles", "rollouts"]
operator_keys = ["{key}"]
fleet = false
"#
        ),
        "x",
    )
    .unwrap();
    let u = &c.uplink;
    assert!(u.enabled);
    assert_eq!(
        u.brokers,
        vec![
            Broker {
                host: "mqtt-1.example.com".into(),
                port: 8883
            },
            Broker {
                host: "::1".into(),
                port: 1883
            },
            Broker {
                host: "10.0.0.2".into(),
                port: 1883
            },
        ]
    );
    assert_eq!(u.brokers[1].to_string(), "[::1]:1883");
    assert_eq!(u.client_id, "fleetgate-site-a");
    assert_eq!(u.username.as_deref(), Some("gw"));
    let tls = u.tls.as_ref().unwrap();
    assert_eq!(tls.ca, Some(PathBuf::from("/etc/fleetgate/ca.pem")));
    assert_eq!(tls.server_name, None);
    assert_eq!(u.forward.telemetry, TelemetryForward::All);
    assert!(u.down.bundles && u.down.rollouts && !u.down.fleet);
    assert_eq!(u.down.operator_keys, vec![[0x11; 32]]);
    // An unspecified listen address is reached on loopback.
    assert_eq!(c.http.external_url, "http://127.0.0.1:8080");
}

#[test]
fn uplink_problems_are_named_by_their_paths() {
    let e = errors(
        r#"
[uplink]
enabled = true
brokers = ["nohost", "h:0", "h:70000"]
topic_prefix = "a/#"
password = "p"
password_file = "/p"
backoff_min = "10s"
backoff_max = "1s"
[uplink.tls]
cert = "/c.pem"
[uplink.forward]
telemetry = "some"
[uplink.down]
allow = ["rollouts", "everything"]
operator_keys = ["xyz"]
"#,
    );
    for want in [
        "uplink.brokers[0]: \"nohost\" is not host:port",
        "uplink.brokers[1]",
        "uplink.brokers[2]",
        "uplink.topic_prefix: \"a/#\": no wildcards",
        "uplink.password_file: give password or password_file, not both",
        "uplink.backoff_max: must not be less than backoff_min",
        "uplink.tls.key: must be set when cert is",
        "uplink.forward.telemetry: \"some\" is not one of",
        "uplink.down.allow[1]: \"everything\" is not one of",
        "uplink.down.operator_keys[0]",
        "uplink.down.operator_keys: must hold at least one key",
        "uplink.site: must be set when the uplink is enabled",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "{want}: {e:#?}");
    }
    let e = errors("[uplink]\nenabled = true\nsite = \"a/b\"\nsurprise = 1\n");
    assert!(
        e.iter().any(|x| x.starts_with("uplink.site: \"a/b\"")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|x| x == "uplink.surprise: unknown key"),
        "{e:?}"
    );
    assert!(
        e.iter().any(|x| x.starts_with("uplink.brokers: must name")),
        "{e:?}"
    );
}

#[test]
fn webhooks_take_defaults_and_check_each_setting() {
    let c = Config::from_toml_str(
        r#"
[http]
external_url = "https://gw.site-a.example.com/"
[[alerts.webhooks]]
name = "ops"
url = "https://hooks.example.com/fleet"
[[alerts.webhooks]]
name = "retrain"
url = "http://127.0.0.1:9000/hook"
headers = ["Authorization: Bearer abc", "X-Team:  ml "]
min_severity = "warning"
alerts = ["drift"]
timeout = "2s"
backoff_min = "100ms"
backoff_max = "2s"
"#,
        "x",
    )
    .unwrap();
    assert_eq!(c.http.external_url, "https://gw.site-a.example.com");
    let [ops, retrain] = &c.alerts.webhooks[..] else {
        panic!("{:?}", c.alerts.webhooks)
    };
    assert_eq!(ops.min_severity, Severity::Info);
    assert!(ops.hardware && ops.drift && ops.rollout);
    assert_eq!(ops.timeout, Duration::from_secs(10));
    assert_eq!(ops.backoff_max, Duration::from_secs(300));
    assert_eq!(
        retrain.headers,
        vec![
            ("Authorization".to_owned(), "Bearer abc".to_owned()),
            ("X-Team".to_owned(), "ml".to_owned())
        ]
    );
    assert_eq!(retrain.min_severity, Severity::Warning);
    assert!(!retrain.hardware && retrain.drift && !retrain.rollout);
    assert_eq!(retrain.backoff_min, Duration::from_millis(100));

    let e = errors(
        r#"
[http]
external_url = "gw.example.com"
[[alerts.webhooks]]
name = "a"
url = "ftp://x"
headers = ["no colon", "Bad Name: v"]
min_severity = "loud"
alerts = ["weather"]
retries = 3
[[alerts.webhooks]]
name = "b b"
url = "https://x"
[[alerts.webhooks]]
name = "c"
url = "https://c"
[[alerts.webhooks]]
name = "c"
url = "https://c2"
"#,
    );
    for want in [
        "http.external_url: must be an http:// or https:// URL",
        "alerts.webhooks[0].url: \"ftp://x\" is not an http:// or https:// URL",
        "alerts.webhooks[0].headers[0]: expected \"Name: value\"",
        "alerts.webhooks[0].headers[1]",
        "alerts.webhooks[0].min_severity: must be one of",
        "alerts.webhooks[0].alerts[0]: \"weather\" is not one of",
        "alerts.webhooks[0].retries: unknown key",
        "alerts.webhooks[1].name: must be 1 to 64",
        "alerts.webhooks[3].name: \"c\" names an earlier webhook too",
    ] {
        assert!(e.iter().any(|x| x.starts_with(want)), "{want}: {e:#?}");
    }
    assert!(
        errors("[[alerts.webhooks]]\nname = \"x\"\n")
            .iter()
            .any(|x| x == "alerts.webhooks[0].url: missing")
    );
}
