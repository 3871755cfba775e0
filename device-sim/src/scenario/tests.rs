//! Tests of scenario files: the example parses to exactly what it says, defaults fill what a
//! group leaves out, and every problem is reported with the field it is about.

use std::path::Path;
use std::time::Duration;

use super::*;

fn example() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/example.toml");
    load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_example_parses_to_what_it_says() {
    let s = example();
    assert_eq!(
        s.description.as_deref(),
        Some("A mixed site: healthy sensors, a drifting line, flaky links and bad actors")
    );
    let summary: Vec<(&str, usize, Duration, u64)> = s
        .groups
        .iter()
        .map(|g| (g.prefix.as_str(), g.count, g.interval, g.alert_every))
        .collect();
    assert_eq!(
        summary,
        [
            ("north", 40, Duration::from_secs(1), 50),
            ("line", 10, Duration::from_millis(500), 0),
            ("flaky", 6, Duration::from_secs(2), 0),
            ("rogue", 2, Duration::from_secs(1), 0),
        ]
    );
    assert_eq!(s.devices(), 58);
    let ids = s.ids();
    assert_eq!(ids.len(), 58);
    assert_eq!(
        (
            ids[0].as_str(),
            ids[39].as_str(),
            ids[40].as_str(),
            ids[57].as_str()
        ),
        ("north-00000", "north-00039", "line-00000", "rogue-00001")
    );

    let north = &s.groups[0];
    assert_eq!(north.hardware, default_hardware());
    assert_eq!(north.shape.classes, DataShape::default().classes);
    assert!(north.profile.regression.is_none());
    assert_eq!(north.shift_after, None);

    let line = &s.groups[1];
    assert_eq!(line.shape.classes, vec![0.6, 0.3, 0.1]);
    assert_eq!(line.shape.mean_confidence, 0.85);
    assert_eq!(
        (line.shape.samples, line.shape.features, line.shape.bins),
        (8, 4, true)
    );
    assert_eq!(line.shape.shift, vec![1.5, 0.0, -0.5, 0.0]);
    assert_eq!(line.shift_after, Some(Duration::from_secs(30)));
    assert_eq!(
        (
            line.hardware.class.as_str(),
            line.hardware.arch.as_str(),
            line.hardware.ram_bytes,
            line.hardware.flash_bytes
        ),
        ("sim-mpu", "aarch64", 268_435_456, 4_294_967_296)
    );
    let r = line.profile.regression.as_ref().unwrap();
    assert_eq!(
        (
            r.model.as_str(),
            r.version.to_string(),
            r.latency_factor,
            r.alert_every
        ),
        ("sim-model", "2.0.0".to_owned(), 3.0, 5)
    );
    assert_eq!(
        (
            r.confidence_delta,
            r.temp_delta_c,
            r.free_mem_factor,
            r.power_factor
        ),
        (-0.2, 4.0, 0.5, 1.5)
    );
    assert_eq!(r.classes, Some(vec![1.0, 1.0, 1.0]));

    let f = &s.groups[2].profile.faults;
    assert_eq!(
        f.flap,
        Some(Flap {
            every: Duration::from_secs(20),
            down: Duration::from_secs(3)
        })
    );
    assert_eq!(f.slow_link, Some(Duration::from_millis(200)));
    assert_eq!(f.crash_after_update, Some(Duration::from_secs(5)));
    assert_eq!((f.fail_install, f.decline), (false, false));
    assert_eq!((f.corrupt_chunk, f.truncate_chunk), (Some(3), Some(5)));
    assert_eq!((f.disconnect_at, f.clock_skew_ms), (Some(0.5), -1500));
    assert_eq!((f.malformed_every, f.impersonate_every), (None, None));

    let f = &s.groups[3].profile.faults;
    assert_eq!(
        (f.malformed_every, f.impersonate_every),
        (Some(10), Some(5))
    );
    assert_eq!(f.claim_class.as_deref(), Some("sim-mpu"));
    assert_eq!(
        (f.flap, f.slow_link, f.crash_after_update),
        (None, None, None)
    );
}

#[test]
fn a_group_with_only_prefix_and_count_gets_the_defaults() {
    let s = parse("[[group]]\nprefix = \"a\"\ncount = 3\n", "t.toml").unwrap();
    assert_eq!(s.description, None);
    let g = &s.groups[0];
    assert_eq!(
        (
            g.prefix.as_str(),
            g.count,
            g.interval,
            g.alert_every,
            g.shift_after
        ),
        ("a", 3, Duration::from_secs(1), 0, None)
    );
    assert_eq!(g.hardware, default_hardware());
    let d = DataShape::default();
    assert_eq!(
        (g.shape.samples, g.shape.features, g.shape.bins),
        (d.samples, d.features, d.bins)
    );
    assert_eq!(g.shape.shift, Vec::<f32>::new());
    let f = &g.profile.faults;
    assert_eq!(
        (f.flap, f.slow_link, f.malformed_every, f.fail_install),
        (None, None, None, false)
    );
}

/// The problems a scenario is refused for, one line each.
fn problems(text: &str) -> Vec<String> {
    match parse(text, "t.toml") {
        Err(ScenarioError::Invalid { path, problems }) => {
            assert_eq!(path, "t.toml");
            problems
        }
        Err(e) => panic!("expected problems, got {e}"),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

const GROUP: &str = "[[group]]\nprefix = \"a\"\ncount = 1\n";

#[test]
fn every_problem_names_its_field() {
    let cases: &[(&str, &str)] = &[
        ("", "group: a scenario needs at least one [[group]]"),
        (
            "[[group]]\nprefix = \"a\"\ncount = 0\n",
            "group[0].count: must be within 1..=100000",
        ),
        (
            "[[group]]\nprefix = \"-x\"\ncount = 1\n",
            "group[0].prefix: \"-x\" does not make valid device ids: device id must start with a letter or digit",
        ),
        (
            "rate = 0.0\n",
            "group[0].rate: must be within (0, 1000] messages per second",
        ),
        (
            "rate = 2000.0\n",
            "group[0].rate: must be within (0, 1000] messages per second",
        ),
        (
            "rate = 1.0\nalert_rate = 2.0\n",
            "group[0].alert_rate: must be within 0..=rate (alerts ride on telemetry messages)",
        ),
        (
            "classes = [1.0, -1.0]\n",
            "group[0].classes: weights must be finite numbers >= 0",
        ),
        (
            "classes = [0.0, 0.0]\n",
            "group[0].classes: weights must not all be 0",
        ),
        (
            "confidence = 1.5\n",
            "group[0].confidence: must be within 0..=1",
        ),
        (
            "regression = \"sim-model\"\n",
            "group[0].regression: expected MODEL@VERSION:key=value,... (keys: latency, alerts, \
             confidence, temp, free_mem, power, classes)",
        ),
        (
            "[group.hardware]\nclass = \"\"\n",
            "group[0].hardware.class: must be 1 to 64 bytes",
        ),
        (
            "[group.hardware]\nram_bytes = 0\n",
            "group[0].hardware.ram_bytes: must be above 0",
        ),
        (
            "[group.data]\nsamples = 300\n",
            "group[0].data.samples: must be at most 256",
        ),
        (
            "[group.data]\nfeatures = 0\n",
            "group[0].data.features: must be within 1..=64",
        ),
        (
            "[group.data]\nbins = true\n",
            "group[0].data.bins: bins summarise samples: set samples too",
        ),
        (
            "[group.data]\nshift = { \"x\" = 1.0 }\n",
            "group[0].data.shift.x: keys are feature indexes (0, 1, ...)",
        ),
        (
            "[group.data]\nshift = { \"9\" = 1.0 }\n",
            "group[0].data.shift.9: there are 4 features",
        ),
        (
            "[group.data]\nshift_after = \"10s\"\n",
            "group[0].data.shift_after: there is no shift to start",
        ),
        (
            "[group.data]\nshift = { \"0\" = 1.0 }\nshift_after = \"soon\"\n",
            "group[0].data.shift_after: \"soon\" is not a duration such as 30s or 2m \
             (expected number at 0)",
        ),
        (
            "[group.faults]\nflap = { every = \"0s\", down = \"1s\" }\n",
            "group[0].faults.flap.every: must be above 0",
        ),
        (
            "[group.faults]\nflap = { every = \"10s\", down = \"2h\" }\n",
            "group[0].faults.flap.down: must be at most 1h",
        ),
        (
            "[group.faults]\nslow_link = \"x\"\n",
            "group[0].faults.slow_link: \"x\" is not a duration such as 30s or 2m \
             (expected number at 0)",
        ),
        (
            "[group.faults]\ncrash_after_update = \"0ms\"\n",
            "group[0].faults.crash_after_update: must be above 0",
        ),
        (
            "[group.faults]\nmalformed_every = 0\n",
            "group[0].faults.malformed_every: must be at least 1",
        ),
        (
            "[group.faults]\nimpersonate_every = 0\n",
            "group[0].faults.impersonate_every: must be at least 1",
        ),
        (
            "[group.faults]\ndisconnect_at = 1.0\n",
            "group[0].faults.disconnect_at: must be a share of the chunks within (0, 1)",
        ),
        (
            "[group.faults]\nclaim_class = \"\"\n",
            "group[0].faults.claim_class: must be 1 to 64 bytes",
        ),
    ];
    for (body, want) in cases {
        // Keys before the first table belong to the group; the empty case is a file of its own.
        let text = if body.is_empty() {
            String::new()
        } else if body.starts_with("[[group]]") {
            (*body).to_owned()
        } else {
            format!("{GROUP}{body}")
        };
        assert_eq!(problems(&text), [*want], "{text}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "[[group]]\nprefix = \"a\"\ncount = 1\nrate = 0.0\n\
                [group.faults]\nmalformed_every = 0\n\
                [[group]]\nprefix = \"a\"\ncount = 100000\n";
    assert_eq!(
        problems(text),
        [
            "group[0].rate: must be within (0, 1000] messages per second",
            "group[0].faults.malformed_every: must be at least 1",
            "group[1].prefix: \"a\" is used by an earlier group",
            "group: 100001 devices in all; at most 100000",
        ]
    );
    let message = parse(text, "t.toml").unwrap_err().to_string();
    assert!(
        message.starts_with("scenario t.toml:\n  group[0].rate: "),
        "{message}"
    );
}

#[test]
fn unknown_fields_and_wrong_types_name_the_field() {
    for (body, want) in [
        ("rat = 1.0\n", "unknown field `rat`"),
        (
            "[group.faults]\nflapping = true\n",
            "unknown field `flapping`",
        ),
        ("rate = \"fast\"\n", "rate"),
    ] {
        let text = format!("{GROUP}{body}");
        match parse(&text, "t.toml") {
            Err(ScenarioError::Syntax { path, message }) => {
                assert_eq!(path, "t.toml");
                assert!(message.contains(want), "{want}: {message}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    let missing = parse("[[group]]\nprefix = \"a\"\n", "t.toml").unwrap_err();
    assert!(
        missing.to_string().contains("missing field `count`"),
        "{missing}"
    );
}

#[test]
fn a_missing_file_is_an_error_naming_the_file() {
    let e = load(Path::new("/nonexistent/scenario.toml")).unwrap_err();
    assert!(matches!(e, ScenarioError::Read { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("scenario /nonexistent/scenario.toml: "),
        "{e}"
    );
}
