//! Requirements' text, latency percentiles, energy from power readings, the validity rules and
//! the pinned encodings of what travels.

use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::messages::{Action, Command, UpdateReport, UpdateState, ValidateOffer};
use crate::sign::Signed;
use crate::{Encoding, decode, encode};

#[test]
fn requirements_parse_and_print() {
    let cases = [
        (
            "latency_p95_us<=15000",
            Measure::LatencyP95Us,
            Bound::AtMost,
            15000.0,
        ),
        (
            "peak_ram_bytes <= 200000",
            Measure::PeakRamBytes,
            Bound::AtMost,
            200000.0,
        ),
        (
            "energy_per_inference_uj<=900",
            Measure::EnergyPerInferenceUj,
            Bound::AtMost,
            900.0,
        ),
        ("accuracy>=0.93", Measure::Accuracy, Bound::AtLeast, 0.93),
    ];
    for (text, measure, bound, limit) in cases {
        let r = Requirement::parse(text).unwrap();
        assert_eq!(
            (r.measure, r.bound, r.limit),
            (measure, bound, limit),
            "{text}"
        );
        assert_eq!(Requirement::parse(&alloc::format!("{r}")).unwrap(), r);
    }
    assert_eq!(
        Requirement::parse("latency_p95_us<15000"),
        Err(RequirementError::NoBound("latency_p95_us<15000".into()))
    );
    assert_eq!(
        Requirement::parse("latency<=1"),
        Err(RequirementError::Measure("latency".into()))
    );
    assert_eq!(
        Requirement::parse("accuracy>=1.5"),
        Err(RequirementError::Accuracy("1.5".into()))
    );
    assert_eq!(
        Requirement::parse("peak_ram_bytes<=-1"),
        Err(RequirementError::Limit("-1".into()))
    );
    assert_eq!(
        Requirement::parse("peak_ram_bytes<=NaN"),
        Err(RequirementError::Limit("NaN".into()))
    );
    let at_most = Requirement::parse("latency_p95_us<=100").unwrap();
    assert!(at_most.met_by(100.0) && !at_most.met_by(100.5));
    let at_least = Requirement::parse("accuracy>=0.9").unwrap();
    assert!(at_least.met_by(0.9) && !at_least.met_by(0.89));
}

#[test]
fn nearest_rank_percentiles() {
    let mut samples: Vec<u32> = (1..=100).rev().collect();
    let s = LatencyStats::from_samples(&mut samples);
    assert_eq!(
        s,
        LatencyStats {
            p50_us: 50,
            p90_us: 90,
            p95_us: 95,
            p99_us: 99,
            max_us: 100
        }
    );
    let mut three = vec![30, 10, 20];
    let s = LatencyStats::from_samples(&mut three);
    assert_eq!((s.p50_us, s.p90_us, s.p99_us, s.max_us), (20, 30, 30, 30));
    assert_eq!(LatencyStats::from_samples(&mut []), LatencyStats::default());
}

#[test]
fn energy_is_the_trapezoid_of_power_over_time() {
    // 100 mW for one second is 100 mJ = 100000 uJ; a ramp 0 -> 200 mW over 1 s as well.
    assert_eq!(energy_uj([(0, 100.0), (1_000_000, 100.0)]), 100_000);
    assert_eq!(
        energy_uj([(0, 0.0), (500_000, 100.0), (1_000_000, 200.0)]),
        100_000
    );
    assert_eq!(energy_uj([(5, 100.0)]), 0);
    assert_eq!(energy_uj([]), 0);
}

fn result() -> ValidationResult {
    ValidationResult {
        inferences: 200,
        correct: Some(190),
        latency: LatencyStats {
            p50_us: 9000,
            p90_us: 11000,
            p95_us: 12000,
            p99_us: 14000,
            max_us: 15000,
        },
        peak_ram_bytes: 180_000,
        energy_uj: 160_000,
    }
}

#[test]
fn values_per_measure() {
    let r = result();
    assert_eq!(r.value(Measure::LatencyP95Us), Some(12000.0));
    assert_eq!(r.value(Measure::PeakRamBytes), Some(180000.0));
    assert_eq!(r.value(Measure::EnergyPerInferenceUj), Some(800.0));
    assert_eq!(r.value(Measure::Accuracy), Some(0.95));
    let no_golden = ValidationResult {
        correct: None,
        ..result()
    };
    assert_eq!(no_golden.value(Measure::Accuracy), None);
}

#[test]
fn results_that_cannot_be_are_refused() {
    assert_eq!(result().validate(), Ok(()));
    let mut r = result();
    r.correct = Some(201);
    assert_eq!(r.validate().unwrap_err().field, "validated.correct");
    let mut r = result();
    r.latency.p95_us = 20000;
    assert_eq!(r.validate().unwrap_err().field, "validated.latency");
    let mut r = result();
    r.inferences = 0;
    r.correct = None;
    assert_eq!(r.validate().unwrap_err().field, "validated.inferences");
    let report = UpdateReport {
        transfer: 1,
        state: UpdateState::Validated(r),
    };
    assert_eq!(report.validate().unwrap_err().field, "validated.inferences");
}

#[test]
fn golden_sets_are_bounded() {
    let ok = GoldenSet {
        cases: vec![GoldenCase {
            values: vec![0.5, -1.0],
            expected: 3,
        }],
    };
    assert_eq!(ok.validate(), Ok(()));
    let nan = GoldenSet {
        cases: vec![GoldenCase {
            values: vec![f32::NAN],
            expected: 0,
        }],
    };
    assert_eq!(nan.validate().unwrap_err().field, "golden.cases.values");
    let class = GoldenSet {
        cases: vec![GoldenCase {
            values: vec![],
            expected: 256,
        }],
    };
    assert_eq!(class.validate().unwrap_err().field, "golden.cases.expected");
    let cmd = |repeat| Command {
        id: 1,
        action: Action::Validate(ValidateOffer {
            transfer: 2,
            manifest: Signed {
                body: vec![],
                signatures: vec![],
            },
            golden: ok.clone(),
            repeat,
        }),
    };
    assert_eq!(cmd(1).validate(), Ok(()));
    assert_eq!(
        cmd(0).validate().unwrap_err().field,
        "action.validate.repeat"
    );
    assert_eq!(
        cmd(1001).validate().unwrap_err().field,
        "action.validate.repeat"
    );
}

/// The postcard bytes of a validated report and a validate command: appended variants, so
/// the bytes of every older message stay as they were.
#[test]
fn golden_bytes() {
    let report = UpdateReport {
        transfer: 7,
        state: UpdateState::Validated(ValidationResult {
            inferences: 3,
            correct: Some(2),
            latency: LatencyStats {
                p50_us: 1,
                p90_us: 2,
                p95_us: 3,
                p99_us: 4,
                max_us: 5,
            },
            peak_ram_bytes: 300,
            energy_uj: 128,
        }),
    };
    let bytes = encode(&report, Encoding::Postcard).unwrap();
    assert_eq!(
        bytes,
        [
            0x01, 0x07, 0x07, 0x03, 0x01, 0x02, 0x01, 0x02, 0x03, 0x04, 0x05, 0xac, 0x02, 0x80,
            0x01
        ]
    );
    assert_eq!(
        decode::<UpdateReport>(&bytes, Encoding::Postcard).unwrap(),
        report
    );
    let cmd = Command {
        id: 9,
        action: Action::Validate(ValidateOffer {
            transfer: 4,
            manifest: Signed {
                body: vec![0xaa],
                signatures: vec![],
            },
            golden: GoldenSet {
                cases: vec![GoldenCase {
                    values: vec![1.0],
                    expected: 2,
                }],
            },
            repeat: 5,
        }),
    };
    let bytes = encode(&cmd, Encoding::Postcard).unwrap();
    assert_eq!(
        bytes,
        [
            0x01, 0x09, 0x06, 0x04, 0x01, 0xaa, 0x00, 0x01, 0x01, 0x00, 0x00, 0x80, 0x3f, 0x02,
            0x05
        ]
    );
    assert_eq!(decode::<Command>(&bytes, Encoding::Postcard).unwrap(), cmd);
    // JSON, as a hand-written device would send it.
    let json = br#"{"transfer":7,"state":{"validated":{"inferences":3,"correct":2,"latency":{"p50_us":1,"p90_us":2,"p95_us":3,"p99_us":4,"max_us":5},"peak_ram_bytes":300,"energy_uj":128}}}"#;
    assert_eq!(
        decode::<UpdateReport>(json, Encoding::Json).unwrap(),
        report
    );
}

#[test]
fn requirements_encode_and_sign_in_their_own_domain() {
    let doc = Requirements {
        manifest_sha256: [1; 32],
        golden_sha256: [0; 32],
        rules: vec![Requirement::parse("accuracy>=0.5").unwrap()],
    };
    let body = encode(&doc, Encoding::Postcard).unwrap();
    let mut want = vec![0x01, 0x20];
    want.extend([1u8; 32]);
    want.push(0x20);
    want.extend([0u8; 32]);
    // One rule: Accuracy (7), AtLeast (1), 0.5 as an f64, little-endian.
    want.extend([0x01, 0x07, 0x01]);
    want.extend(0.5f64.to_le_bytes());
    assert_eq!(body, want);
    let key = crate::sign::SigningKey::from_bytes(&[7; 32]);
    let public = key.verifying_key().to_bytes();
    let signed = Signed::sign(crate::Domain::Requirements, body, &[key]);
    assert!(
        signed
            .verify(crate::Domain::Requirements, &[public], 1)
            .is_ok()
    );
    assert!(
        signed
            .verify(crate::Domain::Manifest, &[public], 1)
            .is_err()
    );
}
