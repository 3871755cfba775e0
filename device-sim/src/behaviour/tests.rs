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
        fleetgate_protocol::limits::Validate::validate(&t).unwrap();
    }
    b.reboot();
    let t = b.telemetry(&mut rng, 0);
    assert_eq!((t.boot, t.seq), (8, 0));
    fleetgate_protocol::limits::Validate::validate(&b.hello()).unwrap();
    fleetgate_protocol::limits::Validate::validate(&b.alert(&mut rng, 0)).unwrap();
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
