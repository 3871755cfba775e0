//! Golden bytes, round trips, the docs examples and property tests of every message.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::codec::{DecodeError, Encoding, decode, encode};

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write;
    let mut s = String::new();
    for b in bytes {
        write!(s, "{b:02x}").unwrap();
    }
    s
}

fn hello() -> Hello {
    Hello {
        firmware: Installed {
            name: "fw".into(),
            version: v("1.4.2"),
            release: 42,
        },
        models: vec![Installed {
            name: "kws".into(),
            version: v("2.0.0"),
            release: 7,
        }],
        hardware: HardwareProfile {
            arch: "armv7em".into(),
            class: "nrf53".into(),
            ram_bytes: 524_288,
            flash_bytes: 1_048_576,
            accelerator: None,
            runtime: None,
        },
        boot: 3,
        telemetry_interval_ms: 10_000,
    }
}

fn telemetry() -> Telemetry {
    Telemetry {
        boot: 3,
        seq: 1017,
        time_ms: 1_764_201_600_000,
        hw: HardwareMetrics {
            cpu_pct: Some(37.5),
            free_mem_bytes: Some(81_920),
            temp_c: Some(41.25),
            battery_mv: None,
            power_mw: None,
            inference_latency_us: Some(12_800),
        },
        model: Some(ModelMetrics {
            name: "kws".into(),
            version: v("2.0.0"),
            inferences: 120,
            class_counts: vec![100, 15, 5],
            mean_confidence: Some(0.5),
        }),
        samples: vec![InputSample {
            values: vec![1.0, -2.0],
            prediction: Some(1),
            confidence: None,
        }],
        bins: vec![FeatureBins {
            feature: 0,
            counts: vec![3, 9],
        }],
    }
}

fn alert() -> Alert {
    Alert {
        kind: AlertKind::Thermal,
        severity: Severity::Critical,
        value: Some(91.5),
        message: "hot".into(),
        time_ms: 0,
    }
}

fn log_line() -> LogLine {
    LogLine {
        level: LogLevel::Warn,
        text: "i2c retry".into(),
        time_ms: 5,
    }
}

fn command() -> Command {
    Command {
        id: 300,
        action: Action::SetTelemetryInterval { interval_ms: 5000 },
    }
}

fn chunk() -> Chunk {
    Chunk {
        transfer: 5,
        index: 2,
        data: vec![0xde, 0xad],
        proof: vec![[0x11; 32]],
    }
}

fn report() -> UpdateReport {
    UpdateReport {
        transfer: 5,
        state: UpdateState::Failed {
            reason: UpdateError::ChunkHash,
            detail: "c".into(),
        },
    }
}

fn offer() -> Command {
    let manifest = Signed {
        body: vec![1, 2],
        signatures: vec![crate::sign::Signature {
            key_id: [7; 8],
            signature: [9; 64],
        }],
    };
    Command {
        id: 1,
        action: Action::Update(UpdateOffer {
            transfer: 5,
            manifest,
        }),
    }
}

fn rollback() -> Command {
    Command {
        id: 2,
        action: Action::Rollback(Signed {
            body: vec![1, 2, 3],
            signatures: vec![crate::sign::Signature {
                key_id: [7; 8],
                signature: [9; 64],
            }],
        }),
    }
}

fn ack() -> CommandAck {
    CommandAck {
        id: 300,
        status: AckStatus::Rejected {
            reason: "no".into(),
        },
    }
}

/// Pins the postcard bytes of each message. A change here is a wire-format change: it breaks
/// every deployed device and needs a new format byte, not an edit of the expected value.
#[test]
fn postcard_golden_bytes() {
    fn check<T: Serialize>(name: &str, msg: &T, want: &str) {
        let got = hex(&encode(msg, Encoding::Postcard).unwrap());
        assert_eq!(got, want, "{name}");
    }
    // Field by field: format byte 01; "fw" 02 6677; "1.4.2" 05 ...; release 42 = 2a; one model;
    // arch, class; ram 2^19 = 80 80 20; flash 2^20 = 80 80 40; no accelerator 00; no runtime 00;
    // boot 03; interval 10000 = 90 4e.
    check(
        "hello",
        &hello(),
        "0102667705312e342e322a01036b777305322e302e3007\
         0761726d7637656d056e72663533808020808040000003904e",
    );
    // boot 03; seq 1017 = f9 07; time varint; cpu Some(37.5f32) 01 00001642; free mem
    // Some(81920) 01 808005; temp Some(41.25) 01 00002542; battery None; power None; latency
    // Some(12800) 01 8064; model Some ...; one sample [1.0, -2.0] prediction Some(1), no
    // confidence; one bin set feature 0 counts [3, 9].
    check(
        "telemetry",
        &telemetry(),
        "0103f90780a8f094ac330100001642018080050100002542000001806401036b777305322e302e30\
         7803640f05010000003f01020000803f000000c00101000100020309",
    );
    // kind Thermal = variant 0; severity Critical = 2; value Some(91.5) 01 0000b742; "hot"; time 0.
    check("alert", &alert(), "010002010000b74203686f7400");
    check("log", &log_line(), "01010969326320726574727905");
    // id 300 = ac 02; SetTelemetryInterval = variant 2; 5000 = 88 27.
    check("command", &command(), "01ac02028827");
    check("ack", &ack(), "01ac0201026e6f");
    // transfer 5; index 2; 02 dead; one proof hash of 32 bytes 0x11.
    check(
        "chunk",
        &chunk(),
        &alloc::format!("01050202dead0120{}", "11".repeat(32)),
    );
    // transfer 5; Failed = variant 6; ChunkHash = variant 10; "c".
    check("report", &report(), "0105060a0163");
    // id 1; Update = variant 3; transfer 5; body 0102; one signature: 08 x 07, 40 x 09.
    check(
        "offer",
        &offer(),
        &alloc::format!(
            "0101030502010201{}{}40{}",
            "08",
            "07".repeat(8),
            "09".repeat(64)
        ),
    );
    // id 2; Rollback = variant 5; body 03 010203; one signature: 08 x 07, 40 x 09.
    check(
        "rollback",
        &rollback(),
        &alloc::format!("010205030102030108{}40{}", "07".repeat(8), "09".repeat(64)),
    );
}

#[test]
fn postcard_round_trips_every_message() {
    fn rt<T>(msg: T)
    where
        T: Serialize + serde::de::DeserializeOwned + Validate + PartialEq,
        T: core::fmt::Debug,
    {
        for enc in [Encoding::Postcard, Encoding::Json] {
            let bytes = encode(&msg, enc).unwrap();
            let back: T = decode(&bytes, enc).unwrap();
            assert_eq!(back, msg, "{enc:?}");
        }
    }
    rt(hello());
    rt(telemetry());
    rt(alert());
    rt(log_line());
    rt(command());
    rt(ack());
    rt(chunk());
    rt(report());
    rt(offer());
    rt(rollback());
    rt(UpdateReport {
        transfer: 1,
        state: UpdateState::Installed {
            version: v("3.0.0"),
            release: 12,
        },
    });
    rt(Alert {
        kind: AlertKind::Custom("door_open".into()),
        ..alert()
    });
}

/// Every ```json <channel>``` block in docs/protocol.md must decode as that channel's message.
#[test]
fn docs_json_examples_decode() {
    let doc = include_str!("../../../docs/protocol.md");
    let mut checked: Vec<&str> = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("```json ") {
        let after = &rest[start + "```json ".len()..];
        let (channel, body) = after.split_once('\n').unwrap();
        let end = body.find("```").unwrap();
        let json = &body.as_bytes()[..end];
        let result: Result<(), DecodeError> = match channel.trim() {
            "hello" => decode::<Hello>(json, Encoding::Json).map(drop),
            "telemetry" => decode::<Telemetry>(json, Encoding::Json).map(drop),
            "alert" => decode::<Alert>(json, Encoding::Json).map(drop),
            "log" => decode::<LogLine>(json, Encoding::Json).map(drop),
            "cmd" => decode::<Command>(json, Encoding::Json).map(drop),
            "ack" => decode::<CommandAck>(json, Encoding::Json).map(drop),
            "report" => decode::<UpdateReport>(json, Encoding::Json).map(drop),
            "chunk" => decode::<Chunk>(json, Encoding::Json).map(drop),
            other => panic!("docs/protocol.md has a json block for unknown channel {other:?}"),
        };
        if let Err(e) = result {
            panic!("docs example for {channel}: {e}\n{}", &body[..end]);
        }
        checked.push(channel.trim());
        rest = &body[end..];
    }
    checked.sort_unstable();
    checked.dedup();
    assert_eq!(
        checked,
        [
            "ack",
            "alert",
            "chunk",
            "cmd",
            "hello",
            "log",
            "report",
            "telemetry"
        ]
    );
}

#[test]
fn minimal_json_telemetry_gets_defaults() {
    let t: Telemetry = decode(br#"{"seq": 9}"#, Encoding::Json).unwrap();
    assert_eq!(t.seq, 9);
    assert_eq!(t.boot, 0);
    assert_eq!(t.hw, HardwareMetrics::default());
    assert!(t.model.is_none() && t.samples.is_empty() && t.bins.is_empty());
}

#[test]
fn decode_errors_are_specific() {
    let p = Encoding::Postcard;
    let j = Encoding::Json;
    assert_eq!(decode::<LogLine>(b"", p), Err(DecodeError::Empty));
    assert_eq!(decode::<LogLine>(b"  \n", j), Err(DecodeError::Empty));
    assert_eq!(
        decode::<LogLine>(&[2, 1, 0], p),
        Err(DecodeError::UnknownFormat(2))
    );
    let mut bytes = encode(&log_line(), p).unwrap();
    bytes.push(0);
    assert_eq!(
        decode::<LogLine>(&bytes, p),
        Err(DecodeError::TrailingBytes(1))
    );
    assert!(matches!(
        decode::<LogLine>(&[1, 9], p),
        Err(DecodeError::Postcard(_))
    ));

    // An array would decode field by field: [1, 2, 3] as boot 1, seq 2, time 3.
    for array in [&b"[1, 2, 3]"[..], b" [2]", b"\"text\"", b"7"] {
        assert_eq!(
            decode::<Telemetry>(array, j),
            Err(DecodeError::Json("a message must be a JSON object".into())),
            "{}",
            String::from_utf8_lossy(array)
        );
    }

    let typo = br#"{"seq": 1, "hw": {"temperature": 40}}"#;
    let Err(DecodeError::Json(msg)) = decode::<Telemetry>(typo, j) else {
        panic!("typo accepted")
    };
    assert!(msg.contains("unknown field `temperature`"), "{msg}");
    let missing = br#"{"hw": {}}"#;
    let Err(DecodeError::Json(msg)) = decode::<Telemetry>(missing, j) else {
        panic!("missing seq accepted")
    };
    assert!(msg.contains("missing field `seq`"), "{msg}");
}

#[test]
fn validation_rejects_out_of_range_values() {
    let j = Encoding::Json;
    let cases: &[(&[u8], &str)] = &[
        (br#"{"seq":1,"hw":{"cpu_pct":101}}"#, "hw.cpu_pct"),
        (
            br#"{"seq":1,"model":{"name":"","version":"1.0.0"}}"#,
            "model.name",
        ),
        (
            br#"{"seq":1,"samples":[{"values":[1e39]}]}"#,
            "samples.values",
        ),
    ];
    for (json, field) in cases {
        match decode::<Telemetry>(json, j) {
            Err(DecodeError::Invalid(inv)) => assert_eq!(inv.field, *field),
            other => panic!("{}: {other:?}", core::str::from_utf8(json).unwrap()),
        }
    }
    let long = LogLine {
        text: "x".repeat(limits::MAX_LOG_LEN + 1),
        ..log_line()
    };
    let bytes = encode(&long, Encoding::Postcard).unwrap();
    assert_eq!(
        decode::<LogLine>(&bytes, Encoding::Postcard),
        Err(DecodeError::Invalid(Invalid::new("text", "is too long")))
    );
    let nan = Telemetry {
        hw: HardwareMetrics {
            temp_c: Some(f32::NAN),
            ..Default::default()
        },
        ..telemetry()
    };
    let bytes = encode(&nan, Encoding::Postcard).unwrap();
    assert!(matches!(
        decode::<Telemetry>(&bytes, Encoding::Postcard),
        Err(DecodeError::Invalid(_))
    ));
}

/// Found by the `messages` fuzz target: a drift_bins command with a NaN edge decoded, and its
/// JSON (`null` for the NaN) did not.
#[test]
fn drift_bins_edges_must_be_finite() {
    let invalid = Err(DecodeError::Invalid(Invalid::new(
        "action.drift_bins.edges",
        "must be finite numbers",
    )));
    for edge in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let cmd = Command {
            id: 20,
            action: Action::DriftBins(DriftBins {
                model: "kws".into(),
                version: v("2.0.0"),
                edges: vec![vec![-1.0, 1.0], vec![edge, 2.0]],
            }),
        };
        let bytes = encode(&cmd, Encoding::Postcard).unwrap();
        assert_eq!(decode::<Command>(&bytes, Encoding::Postcard), invalid);
    }
    let json =
        br#"{"id":20,"action":{"drift_bins":{"model":"kws","version":"2.0.0","edges":[[1e39]]}}}"#;
    assert_eq!(decode::<Command>(json, Encoding::Json), invalid);
}

fn decode_all(bytes: &[u8]) {
    for enc in [Encoding::Postcard, Encoding::Json] {
        let _ = decode::<Hello>(bytes, enc);
        let _ = decode::<Telemetry>(bytes, enc);
        let _ = decode::<Alert>(bytes, enc);
        let _ = decode::<LogLine>(bytes, enc);
        let _ = decode::<Command>(bytes, enc);
        let _ = decode::<CommandAck>(bytes, enc);
        let _ = decode::<Chunk>(bytes, enc);
        let _ = decode::<UpdateReport>(bytes, enc);
        let _ = decode::<crate::Manifest>(bytes, enc);
        let _ = decode::<crate::RollbackDirective>(bytes, enc);
        if let Ok(signed) = postcard::from_bytes::<Signed>(bytes) {
            let _ = signed.verify(crate::sign::Domain::Manifest, &[[7; 32]], 1);
            let _ = crate::check_rollback(&signed, &[[7; 32]], "d1", 0, |_, _| None);
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
        let mut framed = vec![crate::codec::POSTCARD_FORMAT];
        framed.extend_from_slice(&bytes);
        decode_all(&framed);
    }

    #[test]
    fn mutated_valid_messages_never_panic(idx in 0usize..200, byte in any::<u8>(), cut in 0usize..200) {
        for msg in [encode(&telemetry(), Encoding::Postcard), encode(&rollback(), Encoding::Postcard)] {
            let mut bytes = msg.unwrap();
            let i = idx % bytes.len();
            bytes[i] = byte;
            bytes.truncate(cut.max(1));
            decode_all(&bytes);
        }
    }
}

/// Every number and string a device sends has a bound; a value past it is refused as invalid
/// and names its field (issue 13: a hostile device's numbers must not reach the gateway's sums).
#[test]
fn hostile_numbers_and_strings_are_invalid_and_name_their_field() {
    let long_version = alloc::format!("1.0.0-{}", "a".repeat(60));
    let many_classes = alloc::format!("[{}]", ["5000"; 256].join(","));
    let cases: Vec<(String, &str)> = vec![
        (r#"{"seq":1,"hw":{"temp_c":1e39}}"#.into(), "hw.temp_c"),
        (r#"{"seq":1,"hw":{"temp_c":-1e30}}"#.into(), "hw.temp_c"),
        (r#"{"seq":1,"hw":{"temp_c":200.5}}"#.into(), "hw.temp_c"),
        (r#"{"seq":1,"hw":{"cpu_pct":-1}}"#.into(), "hw.cpu_pct"),
        (r#"{"seq":1,"hw":{"power_mw":-5}}"#.into(), "hw.power_mw"),
        (r#"{"seq":1,"hw":{"power_mw":1e39}}"#.into(), "hw.power_mw"),
        (r#"{"seq":1,"hw":{"battery_mv":100001}}"#.into(), "hw.battery_mv"),
        (
            r#"{"seq":1,"hw":{"free_mem_bytes":1099511627777}}"#.into(),
            "hw.free_mem_bytes",
        ),
        (
            r#"{"seq":1,"hw":{"inference_latency_us":0}}"#.into(),
            "hw.inference_latency_us",
        ),
        (
            r#"{"seq":1,"hw":{"inference_latency_us":600000001}}"#.into(),
            "hw.inference_latency_us",
        ),
        (
            r#"{"seq":1,"model":{"name":"kws","version":"1.0.0","mean_confidence":-3}}"#.into(),
            "model.mean_confidence",
        ),
        (
            r#"{"seq":1,"model":{"name":"kws","version":"1.0.0","mean_confidence":1e39}}"#.into(),
            "model.mean_confidence",
        ),
        (
            alloc::format!(r#"{{"seq":1,"model":{{"name":"kws","version":"{long_version}"}}}}"#),
            "model.version",
        ),
        (
            alloc::format!(
                r#"{{"seq":1,"model":{{"name":"kws","version":"1.0.0","class_counts":{many_classes}}}}}"#
            ),
            "model.class_counts",
        ),
        (
            r#"{"seq":1,"model":{"name":"kws","version":"1.0.0","inferences":10,"class_counts":[8,3]}}"#
                .into(),
            "model.class_counts",
        ),
        (
            r#"{"seq":1,"samples":[{"values":[1.0],"confidence":1.5}]}"#.into(),
            "samples.confidence",
        ),
        (
            r#"{"seq":1,"samples":[{"values":[1.0],"prediction":256}]}"#.into(),
            "samples.prediction",
        ),
        (
            r#"{"seq":1,"samples":[{"values":[2e12]}]}"#.into(),
            "samples.values",
        ),
        (
            r#"{"seq":1,"bins":[{"feature":0,"counts":[1000000,1]}]}"#.into(),
            "bins.counts",
        ),
        (
            r#"{"seq":1,"bins":[{"feature":1,"counts":[1]},{"feature":1,"counts":[1]}]}"#.into(),
            "bins.feature",
        ),
        (
            r#"{"seq":1,"bins":[{"feature":64,"counts":[1]}]}"#.into(),
            "bins.feature",
        ),
    ];
    for (json, field) in &cases {
        match decode::<Telemetry>(json.as_bytes(), Encoding::Json) {
            Err(DecodeError::Invalid(inv)) => assert_eq!(inv.field, *field, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
    // The same bounds hold for postcard (the encoding MCUs use).
    let hostile = Telemetry {
        hw: HardwareMetrics {
            temp_c: Some(-1e30),
            ..Default::default()
        },
        ..telemetry()
    };
    let bytes = encode(&hostile, Encoding::Postcard).unwrap();
    assert_eq!(
        decode::<Telemetry>(&bytes, Encoding::Postcard),
        Err(DecodeError::Invalid(Invalid::new(
            "hw.temp_c",
            "must be within -100..=200"
        )))
    );
    // Versions in a hello, and its memory sizes.
    let mut h = hello();
    h.models[0].version = v(&long_version);
    assert_eq!(h.validate(), Err(Invalid::new("version", "is too long")));
    let mut h = hello();
    h.hardware.ram_bytes = u64::MAX;
    assert_eq!(
        h.validate(),
        Err(Invalid::new("hardware.ram_bytes", "must be at most 1 TiB"))
    );
    let a = Alert {
        value: Some(3e12),
        ..alert()
    };
    assert_eq!(a.validate().unwrap_err().field, "value");
    // The limits themselves are accepted.
    let edge = r#"{"seq":1,"hw":{"cpu_pct":100,"temp_c":-100,"power_mw":0,"battery_mv":100000,"inference_latency_us":1},"model":{"name":"kws","version":"1.0.0","inferences":10,"class_counts":[7,3],"mean_confidence":1}}"#;
    assert!(decode::<Telemetry>(edge.as_bytes(), Encoding::Json).is_ok());
    // A number no integer field can hold is a JSON error that says which value and where; it
    // is refused and counted as undecodable, never stored.
    let Err(DecodeError::Json(msg)) =
        decode::<Telemetry>(br#"{"seq":1,"hw":{"battery_mv":1e39}}"#, Encoding::Json)
    else {
        panic!("1e39 accepted as millivolts")
    };
    assert!(msg.contains("1e+39") && msg.contains("u32"), "{msg}");
}
