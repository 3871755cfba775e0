use super::*;

fn errors(text: &str) -> Vec<String> {
    Config::from_toml_str(text, "test.toml")
        .unwrap_err()
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn embedded_default_is_valid_and_documented() {
    let c = Config::default();
    assert_eq!(c.mqtt.listen, "127.0.0.1:1883".parse().unwrap());
    assert_eq!(c.http.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.storage.data_dir, PathBuf::from("./fleetgate-data"));
    assert_eq!(c.http.token, None);
    assert_eq!(c.retention.telemetry_max_age, days(7));
    assert_eq!(c.alerts.rules.len(), 3);
    assert_eq!(c.alerts.rules[0].metric, HwMetric::TempC);
    assert_eq!(c.alerts.rules[0].trigger, Trigger::Above(85.0));
    assert_eq!(c.alerts.rules[0].kind, AlertKind::Thermal);
    // Every key in the default file is preceded by a comment somewhere in its section.
    assert!(DEFAULT_TOML.lines().filter(|l| l.starts_with('#')).count() > 30);
}

#[test]
fn empty_file_is_the_default() {
    assert_eq!(Config::from_toml_str("", "x").unwrap(), Config::default());
}

#[test]
fn a_partial_file_overrides_only_what_it_names() {
    let c = Config::from_toml_str(
        "[mqtt]\nlisten = \"0.0.0.0:1884\"\n[retention]\ntelemetry_max_age = \"36h\"\n",
        "x",
    )
    .unwrap();
    let d = Config::default();
    assert_eq!(c.mqtt.listen, "0.0.0.0:1884".parse().unwrap());
    assert_eq!(c.mqtt.max_connections, d.mqtt.max_connections);
    assert_eq!(c.retention.telemetry_max_age, secs(36 * 3600));
    assert_eq!(c.retention.logs_per_device, d.retention.logs_per_device);
    assert_eq!(c.alerts, d.alerts);
}

#[test]
fn rules_replace_the_default_rules() {
    let c = Config::from_toml_str(
        "[[alerts.rules]]\nmetric = \"inference_latency_us\"\nabove = 50000\nkind = \"slow\"\nseverity = \"info\"\n",
        "x",
    )
    .unwrap();
    assert_eq!(
        c.alerts.rules,
        vec![AlertRule {
            metric: HwMetric::InferenceLatencyUs,
            trigger: Trigger::Above(50_000.0),
            clear: 50_000.0,
            kind: AlertKind::Custom("slow".into()),
            severity: Severity::Info,
        }]
    );
    assert!(
        Config::from_toml_str("[alerts]\nrules = []\n", "x")
            .unwrap()
            .alerts
            .rules
            .is_empty()
    );
}

#[test]
fn every_problem_is_named_by_its_path() {
    let text = r#"
[mqtt]
listen = "localhost"
max_connections = 0
connect_timeout = 5
lisen = "typo"

[mqtt.router]
downlink_segment_bytes = 10

[ingest]
ack = "eventually"

[http]
token = "short"

[retention]
telemetry_max_age = "7 fortnights"

[storage]
data_dir = 3

[[alerts.rules]]
metric = "temperature"
above = 80
below = 10
kind = "thermal"
severity = "urgent"

[bogus]
x = 1
"#;
    assert_eq!(
        errors(text),
        vec![
            "mqtt.router.downlink_segment_bytes: 10 is out of range 1024..=1073741824",
            "mqtt.listen: \"localhost\" is not an IP address and port such as \"127.0.0.1:1883\"",
            "mqtt.max_connections: 0 is out of range 1..=1000000",
            "mqtt.connect_timeout: expected a duration like \"5s\", found integer",
            "mqtt.lisen: unknown key",
            "http.token: must be at least 16 characters (or empty)",
            "storage.data_dir: expected a string, found integer",
            "storage.data_dir: must not be empty",
            "retention.telemetry_max_age: \"7 fortnights\" is not a duration (unknown time unit \"fortnights\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations))",
            "ingest.ack: \"eventually\" is not one of \"commit\", \"receipt\"",
            "alerts.rules[0].metric: unknown metric \"temperature\"; one of [\"cpu_pct\", \"free_mem_bytes\", \"temp_c\", \"battery_mv\", \"power_mw\", \"inference_latency_us\"]",
            "alerts.rules[0].above: give either `above` or `below`, not both",
            "alerts.rules[0].severity: must be one of info, warning, critical",
            "bogus: unknown key",
        ]
    );
}

#[test]
fn syntax_errors_and_wrong_shapes() {
    let e = errors("[mqtt\nlisten=1");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("not valid TOML"), "{e:?}");
    assert_eq!(
        errors("mqtt = 5"),
        ["mqtt: expected a table, found integer"]
    );
    assert_eq!(
        errors("[alerts]\nrules = 1"),
        ["alerts.rules: expected an array of tables, found integer"]
    );
    assert_eq!(
        errors("[[alerts.rules]]\nmetric = \"temp_c\"\nkind = \"thermal\"\nseverity = \"info\"\n"),
        ["alerts.rules[0].above: give a threshold: `above` or `below`"]
    );
    assert_eq!(
        errors(
            "[[alerts.rules]]\nmetric = \"temp_c\"\nabove = 80\nclear = 90\nkind = \"thermal\"\nseverity = \"info\"\n"
        ),
        ["alerts.rules[0].clear: must not be greater than `above`"]
    );
}

#[test]
fn display_lists_all_problems() {
    let e = Config::from_toml_str("[mqtt]\nx = 1\ny = 2\n", "gw.toml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "gw.toml has 2 problems:\n  mqtt.x: unknown key\n  mqtt.y: unknown key"
    );
}

#[test]
fn rule_hysteresis() {
    let rule = &Config::default().alerts.rules[0];
    assert!(rule.fires(85.5) && !rule.fires(85.0));
    assert!(rule.clears(80.0) && !rule.clears(80.5));
    let battery = &Config::default().alerts.rules[1];
    assert!(battery.fires(3299.0) && !battery.fires(3300.0));
    assert!(battery.clears(3400.0) && !battery.clears(3399.0));
}

#[test]
fn trusted_keys_are_hex_ed25519_keys() {
    let key = "11".repeat(32);
    let c =
        Config::from_toml_str(&format!("[registry]\ntrusted_keys = [\"{key}\"]\n"), "x").unwrap();
    assert_eq!(c.registry.trusted_keys, vec![[0x11; 32]]);
    assert_eq!(c.registry.threshold, 1);
    assert_eq!(
        errors(&format!(
            "[registry]\ntrusted_keys = [\"{key}\", \"abc\", 5]\nthreshold = 3\n"
        )),
        [
            "registry.trusted_keys[2]: expected a string, found integer",
            "registry.trusted_keys[1]: \"abc\" is not an ed25519 public key (64 hex characters)",
            "registry.threshold: is more than the number of trusted keys",
        ]
    );
}

#[test]
fn a_trusted_key_listed_twice_is_refused() {
    let key = "11".repeat(32);
    let upper = key.to_uppercase();
    assert_eq!(
        errors(&format!(
            "[registry]\ntrusted_keys = [\"{key}\", \"{}\", \"{upper}\"]\nthreshold = 2\n",
            "22".repeat(32)
        )),
        [
            "registry.trusted_keys[2]: is the same key as trusted_keys[0]; list each key once (one key counts once towards the threshold)",
        ]
    );
    assert_eq!(
        errors(&format!(
            "[registry]\ntrusted_keys = [\"{key}\", \"{key}\"]\nthreshold = 2\n"
        )),
        [
            "registry.trusted_keys[1]: is the same key as trusted_keys[0]; list each key once (one key counts once towards the threshold)",
            "registry.threshold: is more than the number of trusted keys",
        ]
    );
}

#[test]
fn default_listeners_and_limits() {
    let c = Config::default();
    assert!(c.mqtt.plain);
    assert_eq!(c.mqtt.tls, None, "no TLS listener unless configured");
    assert_eq!(c.mqtt.per_source_connects_per_second, 1000.0);
    assert_eq!(c.mqtt.per_source_burst, 2000);
    assert_eq!(c.limits.device_messages_per_second, 50.0);
    assert_eq!(c.limits.device_burst, 200);
    let max = &c.limits.max_message_bytes;
    for channel in Uplink::ALL {
        assert!(
            (16..c.mqtt.max_packet_bytes).contains(&max.of(channel)),
            "{channel:?}"
        );
    }
    assert_eq!(max.of(Uplink::Telemetry), 49152);
    assert_eq!(max.of(Uplink::Hello), 8192);
}

#[test]
fn tls_listener_with_a_generated_or_a_given_certificate() {
    let c = Config::from_toml_str("[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\n", "x").unwrap();
    let tls = c.mqtt.tls.unwrap();
    assert_eq!(tls.listen, "127.0.0.1:8883".parse().unwrap());
    assert_eq!((tls.cert, tls.key, tls.client_ca), (None, None, None));
    assert_eq!(tls.names, ["localhost", "127.0.0.1"]);

    let c = Config::from_toml_str(
        "[mqtt]\nlisten = \"\"\n[mqtt.tls]\nlisten = \"0.0.0.0:8883\"\ncert = \"/etc/fg/cert.pem\"\n\
         key = \"/etc/fg/key.pem\"\nnames = []\nclient_ca = \"/etc/fg/ca.pem\"\n",
        "x",
    )
    .unwrap();
    assert!(!c.mqtt.plain, "the plain listener is off");
    let tls = c.mqtt.tls.unwrap();
    assert_eq!(tls.cert, Some(PathBuf::from("/etc/fg/cert.pem")));
    assert_eq!(tls.key, Some(PathBuf::from("/etc/fg/key.pem")));
    assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/fg/ca.pem")));
}

#[test]
fn listener_tls_and_limit_problems_are_named_by_their_paths() {
    assert_eq!(
        errors("[mqtt]\nlisten = \"\"\n"),
        ["mqtt.listen: is empty and so is mqtt.tls.listen: set at least one listener"]
    );
    assert_eq!(
        errors(
            "[mqtt]\nlisten = \"127.0.0.1:1883\"\nper_source_connects_per_second = 0\n\
             per_source_burst = 0\n[mqtt.tls]\nlisten = \"127.0.0.1:1883\"\ncert = \"c.pem\"\n\
             names = [\"ok.example\", \"bad name\", \"-x.example\", \"\", 7]\nwhat = 1\n"
        ),
        [
            "mqtt.tls.key: must be set when cert is",
            "mqtt.tls.names[4]: expected a string, found integer",
            "mqtt.tls.names[1]: \"bad name\" is not a host name or IP address",
            "mqtt.tls.names[2]: \"-x.example\" is not a host name or IP address",
            "mqtt.tls.names[3]: \"\" is not a host name or IP address",
            "mqtt.tls.what: unknown key",
            "mqtt.listen: is the same address as mqtt.tls.listen",
            "mqtt.per_source_connects_per_second: is out of range 0.001..=1000000",
            "mqtt.per_source_burst: 0 is out of range 1..=1000000",
        ]
    );
    assert_eq!(
        errors("[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\nkey = \"k.pem\"\nnames = []\n"),
        [
            "mqtt.tls.cert: must be set when key is",
            "mqtt.tls.names: must hold at least one name for the generated certificate (or set cert and key)",
        ]
    );
    assert_eq!(
        errors(
            "[limits]\ndevice_messages_per_second = -1.0\ndevice_burst = 2000000\nx = 1\n\
             [limits.max_message_bytes]\ntelemetry = 8\nlog = \"1k\"\nvideo = 100\n"
        ),
        [
            "limits.max_message_bytes.telemetry: 8 is out of range 16..=268435456",
            "limits.max_message_bytes.log: expected an integer, found string",
            "limits.max_message_bytes.video: unknown key",
            "limits.device_messages_per_second: is out of range 0.001..=1000000",
            "limits.device_burst: 2000000 is out of range 1..=1000000",
            "limits.x: unknown key",
        ]
    );
}

#[test]
fn drift_and_gate_poisoning_settings_are_checked_by_path() {
    let c = Config::default();
    assert_eq!(
        (
            c.drift.psi_alert,
            c.drift.false_alarm,
            c.drift.resolve_after
        ),
        (0.1, 0.005, 3)
    );
    assert!(c.drift.sequential);
    assert_eq!(c.drift.device_share, 0.02);
    assert_eq!(c.rollouts.policy.gates.device_trim, 0.1);
    let text = r#"
[drift]
false_alarm = 0.5
resolve_after = 0
sequential = "yes"
device_share = 0
psi_alert = 0.1
psi_warn_floor = 0.2

[rollouts.policy.gates]
device_trim = 0.5
"#;
    assert_eq!(
        errors(text),
        vec![
            "drift.false_alarm: is out of range 0.0001..=0.1",
            "drift.resolve_after: 0 is out of range 1..=1000",
            "drift.sequential: expected true or false, found string",
            "drift.device_share: is out of range 0.001..=1",
            "drift.psi_warn_floor: must not be more than psi_alert",
            "rollouts.policy.gates.device_trim: is out of range 0..=0.4",
        ]
    );
}

#[test]
fn a_toml_syntax_error_says_where_it_is() {
    assert_eq!(
        errors("[mqtt]\nmax_connections = 10\nlisten = \"0.0.0.0:1883\n[http]\n"),
        ["not valid TOML: line 3, column 23: invalid basic string, expected `\"`"]
    );
    assert_eq!(
        errors("[storage]\ndata_dir = /var/lib/fleetgate\n"),
        [
            "not valid TOML: line 2, column 12: string values must be quoted, expected literal string"
        ]
    );
}

#[test]
fn the_log_format_is_text_or_json() {
    assert_eq!(Config::default().log.format, LogFormat::Text);
    let c = Config::from_toml_str("[log]\nformat = \"json\"\n", "x").unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(
        errors("[log]\nformat = \"xml\"\n"),
        ["log.format: \"xml\": one of \"text\", \"json\""]
    );
}
