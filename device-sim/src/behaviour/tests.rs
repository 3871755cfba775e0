//! Tests of a simulated device's messages: telemetry shape, class mix, regressions, commands.

use fleetgate_protocol::limits::Validate;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

#[test]
fn telemetry_numbers_itself_and_validates() {
    let mut rng = StdRng::seed_from_u64(1);
    let shape = DataShape {
        samples: 3,
        ..DataShape::default()
    };
    let mut b = Behaviour::new("d1".into(), 7, 1000, shape);
    for want in 0..50u32 {
        let t = b.telemetry(&mut rng, 0);
        assert_eq!((t.boot, t.seq), (7, want));
        assert_eq!(t.samples.len(), 3);
        assert_eq!(t.samples[0].values.len(), 4);
        assert_eq!(
            t.model.as_ref().unwrap().class_counts.iter().sum::<u32>(),
            20
        );
        Validate::validate(&t).unwrap();
    }
    b.reboot();
    let t = b.telemetry(&mut rng, 0);
    assert_eq!((t.boot, t.seq), (8, 0));
    Validate::validate(&b.hello()).unwrap();
    Validate::validate(&b.alert(&mut rng, 0)).unwrap();
}

#[test]
fn commands_are_answered() {
    let mut b = Behaviour::new("d1".into(), 0, 1000, DataShape::default());
    let cases = [
        (Action::Ping, AckStatus::Done, Effect::None),
        (Action::Reboot, AckStatus::Done, Effect::Reboot),
        (
            Action::SetTelemetryInterval { interval_ms: 250 },
            AckStatus::Done,
            Effect::Interval(250),
        ),
        (
            Action::SetTelemetryInterval { interval_ms: 5 },
            AckStatus::Rejected {
                reason: "interval below 100 ms".into(),
            },
            Effect::None,
        ),
    ];
    for (i, (action, status, effect)) in cases.into_iter().enumerate() {
        let (ack, got) = b.command(&Command {
            id: i as u64,
            action,
        });
        let ack = ack.unwrap();
        assert_eq!((ack.id, ack.status, got), (i as u64, status, effect));
    }
    assert_eq!(b.interval_ms, 250);
    let rollback = Command {
        id: 9,
        action: Action::Rollback(fleetgate_protocol::Signed {
            body: vec![1],
            signatures: vec![],
        }),
    };
    assert_eq!(
        b.command(&rollback),
        (None, Effect::None),
        "the update client answers rollbacks"
    );
}

#[test]
fn a_device_with_edges_sends_bin_counts_instead_of_samples() {
    let mut rng = StdRng::seed_from_u64(3);
    let shape = DataShape {
        samples: 50,
        features: 2,
        bins: true,
        shift: vec![0.0, 5.0],
        ..DataShape::default()
    };
    let mut b = Behaviour::new("d1".into(), 0, 1000, shape);
    assert_eq!(
        b.telemetry(&mut rng, 0).samples.len(),
        50,
        "raw samples until the edges arrive"
    );
    let bins = fleetgate_protocol::DriftBins {
        model: "sim-model".into(),
        version: semver::Version::new(1, 0, 0),
        edges: vec![vec![0.0], vec![0.0, 1.0]],
    };
    let (ack, _) = b.command(&Command {
        id: 9,
        action: Action::DriftBins(bins),
    });
    assert!(ack.is_none());
    let t = b.telemetry(&mut rng, 0);
    assert!(t.samples.is_empty());
    assert_eq!(t.bins.len(), 2);
    assert_eq!(t.bins[0].counts.iter().sum::<u32>(), 50);
    assert_eq!(
        t.bins[1].counts,
        vec![0, 0, 50],
        "feature 1 is shifted by 5 sd, past every edge"
    );
}

/// Shares of each class over many messages: class counts and per-sample predictions.
fn class_shares(b: &mut Behaviour, messages: usize) -> (Vec<f64>, Vec<f64>, f64) {
    let mut rng = StdRng::seed_from_u64(11);
    let (mut counts, mut predicted) = (vec![0u64; 3], vec![0u64; 3]);
    let mut confidence = 0.0;
    for _ in 0..messages {
        let t = b.telemetry(&mut rng, 0);
        let m = t.model.unwrap();
        for (c, n) in m.class_counts.iter().enumerate() {
            counts[c] += u64::from(*n);
        }
        confidence += f64::from(m.mean_confidence.unwrap());
        for s in &t.samples {
            predicted[usize::from(s.prediction.unwrap())] += 1;
        }
    }
    let share = |v: Vec<u64>| {
        let total: u64 = v.iter().sum();
        v.iter().map(|n| *n as f64 / total as f64).collect()
    };
    (
        share(counts),
        share(predicted),
        confidence / messages as f64,
    )
}

fn close(got: &[f64], want: &[f64], tolerance: f64) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() < tolerance)
}

#[test]
fn the_default_shape_predicts_classes_70_20_10_at_confidence_0_9() {
    let shape = DataShape::default();
    assert_eq!(
        (shape.classes.clone(), shape.mean_confidence),
        (vec![0.7, 0.2, 0.1], 0.9)
    );
    let mut b = Behaviour::new(
        "d1".into(),
        0,
        1000,
        DataShape {
            samples: 10,
            ..shape
        },
    );
    // 40,000 inferences and 20,000 samples: a share is within 0.01 of its weight with p > 0.99.
    let (counts, predicted, confidence) = class_shares(&mut b, 2000);
    assert!(close(&counts, &[0.7, 0.2, 0.1], 0.01), "{counts:?}");
    assert!(close(&predicted, &[0.7, 0.2, 0.1], 0.015), "{predicted:?}");
    assert!((confidence - 0.9).abs() < 0.002, "{confidence}");
}

#[test]
fn the_shape_sets_the_class_weights_and_confidence() {
    let shape = DataShape {
        samples: 10,
        classes: vec![1.0, 1.0, 2.0],
        mean_confidence: 0.6,
        ..DataShape::default()
    };
    let mut b = Behaviour::new("d1".into(), 0, 1000, shape);
    let (counts, predicted, confidence) = class_shares(&mut b, 1000);
    assert!(close(&counts, &[0.25, 0.25, 0.5], 0.015), "{counts:?}");
    assert!(close(&predicted, &[0.25, 0.25, 0.5], 0.02), "{predicted:?}");
    assert!((confidence - 0.6).abs() < 0.005, "{confidence}");
}

fn mean_of(b: &mut Behaviour, rng: &mut StdRng, n: usize, f: fn(&Telemetry) -> f64) -> f64 {
    (0..n).map(|_| f(&b.telemetry(rng, 0))).sum::<f64>() / n as f64
}

#[test]
fn a_regression_applies_only_while_its_version_runs() {
    let v2 = semver::Version::new(2, 0, 0);
    let regression = Regression {
        latency_factor: 3.0,
        alert_every: 4,
        classes: Some(vec![0.0, 0.0, 1.0]),
        confidence_delta: -0.3,
        temp_delta_c: 10.0,
        free_mem_factor: 0.5,
        power_factor: 2.0,
        ..Regression::new("sim-model", v2.clone())
    };
    let mut b = Behaviour::new("d1".into(), 0, 1000, DataShape::default());
    b.regression = Some(regression);
    let mut rng = StdRng::seed_from_u64(5);
    let latency = |t: &Telemetry| f64::from(t.hw.inference_latency_us.unwrap());
    let temp = |t: &Telemetry| f64::from(t.hw.temp_c.unwrap());
    let free_mem = |t: &Telemetry| t.hw.free_mem_bytes.unwrap() as f64;
    let power = |t: &Telemetry| f64::from(t.hw.power_mw.unwrap());
    let confidence = |t: &Telemetry| f64::from(t.model.as_ref().unwrap().mean_confidence.unwrap());
    let last_class = |t: &Telemetry| f64::from(t.model.as_ref().unwrap().class_counts[2]);

    let healthy = |b: &mut Behaviour, rng: &mut StdRng| {
        assert!((11_500.0..12_500.0).contains(&mean_of(b, rng, 200, latency)));
        assert!((41.5..42.5).contains(&mean_of(b, rng, 200, temp)));
        assert!((155_000.0..165_000.0).contains(&mean_of(b, rng, 200, free_mem)));
        assert!((175.0..185.0).contains(&mean_of(b, rng, 200, power)));
        assert!((0.89..0.91).contains(&mean_of(b, rng, 200, confidence)));
        assert!((1.5..2.5).contains(&mean_of(b, rng, 200, last_class)));
        for _ in 0..20 {
            b.telemetry(rng, 0);
            assert!(!b.take_regression_alert());
        }
    };
    healthy(&mut b, &mut rng);

    b.install(
        ArtifactKind::Model,
        Installed {
            name: "sim-model".into(),
            version: v2.clone(),
            release: 2,
        },
        7,
    );
    let t = b.telemetry(&mut rng, 0);
    assert_eq!(
        t.model.as_ref().unwrap().version,
        v2,
        "reports the running model"
    );
    assert_eq!(t.model.as_ref().unwrap().class_counts, [0, 0, 20]);
    assert!((34_000.0..38_000.0).contains(&mean_of(&mut b, &mut rng, 200, latency)));
    assert!((51.5..52.5).contains(&mean_of(&mut b, &mut rng, 200, temp)));
    assert!((77_000.0..83_000.0).contains(&mean_of(&mut b, &mut rng, 200, free_mem)));
    assert!((350.0..370.0).contains(&mean_of(&mut b, &mut rng, 200, power)));
    assert!((0.59..0.61).contains(&mean_of(&mut b, &mut rng, 200, confidence)));
    // 1 + 5 * 200 = 1001 messages on 2.0.0 so far; alerts come with the 1004th, 1008th, ...
    let alerts: Vec<bool> = (0..8)
        .map(|_| {
            b.telemetry(&mut rng, 0);
            b.take_regression_alert()
        })
        .collect();
    assert_eq!(
        alerts,
        [false, false, true, false, false, false, true, false]
    );
    assert!(!b.take_regression_alert(), "an alert is taken once");

    assert!(b.revert(ArtifactKind::Model, "sim-model"));
    healthy(&mut b, &mut rng);
}

#[test]
fn class_weights_and_regressions_parse_with_clear_errors() {
    assert_eq!(parse_classes("0.7,0.2,0.1", ','), Ok(vec![0.7, 0.2, 0.1]));
    assert_eq!(parse_classes("3", ','), Ok(vec![3.0]));
    for (text, error) in [
        ("0.7,x", "class weight \"x\" is not a number"),
        ("0.7,-1", "class weight \"-1\" must be a finite number >= 0"),
        ("0,0", "class weights must not all be 0"),
        ("", "class weight \"\" is not a number"),
    ] {
        assert_eq!(parse_classes(text, ','), Err(error.to_owned()), "{text}");
    }
    assert!(parse_classes(&vec!["1"; 257].join(","), ',').is_err());

    let r: Regression = "sim-model@2.0.0-rc.1:latency=2.5,alerts=5,confidence=-0.2,temp=8,\
                         free_mem=0.5,power=1.5,classes=1/1/2"
        .parse()
        .unwrap();
    assert_eq!(
        r,
        Regression {
            latency_factor: 2.5,
            alert_every: 5,
            confidence_delta: -0.2,
            temp_delta_c: 8.0,
            free_mem_factor: 0.5,
            power_factor: 1.5,
            classes: Some(vec![1.0, 1.0, 2.0]),
            ..Regression::new("sim-model", semver::Version::parse("2.0.0-rc.1").unwrap())
        }
    );
    for (text, error) in [
        ("sim-model@2.0.0", "expected MODEL@VERSION"),
        ("sim-model:latency=2", "expected MODEL@VERSION"),
        ("@2.0.0:latency=2", "model name \"\" must be"),
        ("m@two:latency=2", "version \"two\""),
        ("m@2.0.0:latency", "\"latency\": expected key=value"),
        ("m@2.0.0:speed=2", "unknown key \"speed\""),
        (
            "m@2.0.0:latency=-1",
            "latency=-1: expected a number within 0..=1000",
        ),
        (
            "m@2.0.0:confidence=2",
            "confidence=2: expected a number within -1..=1",
        ),
        (
            "m@2.0.0:alerts=often",
            "alerts=often: expected a whole number",
        ),
        (
            "m@2.0.0:classes=1/x",
            "classes: class weight \"x\" is not a number",
        ),
        ("m@2.0.0:latency=2,latency=3", "latency is given twice"),
    ] {
        let got = text.parse::<Regression>().unwrap_err();
        assert!(got.contains(error), "{text}: {got}");
    }
}

#[test]
fn reference_rows_are_the_default_shape_and_the_same_every_time() {
    let csv = reference_csv(1000);
    assert_eq!(csv, reference_csv(1000));
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("f0,f1,f2,f3,prediction,confidence"));
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 1000);
    let classes = |c: f64| rows.iter().filter(|r| r[4] == c).count();
    assert_eq!((classes(0.0), classes(1.0), classes(2.0)), (700, 200, 100));
    assert!(rows.iter().all(|r| r.len() == 6 && r[5] == 0.9));
    let mean = rows.iter().map(|r| r[0]).sum::<f64>() / 1000.0;
    let var = rows.iter().map(|r| (r[0] - mean).powi(2)).sum::<f64>() / 999.0;
    assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "{mean} {var}");
}
