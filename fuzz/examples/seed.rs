//! Writes the seed inputs of every fuzz target to `fuzz/corpus/<target>/seed-*`: the JSON
//! examples of docs/protocol.md in both encodings, chunks, manifests, bundles and rollback
//! directives signed by the test key, topics, the embedded default config and API bodies.
//!
//! From the repository root: `cargo run --manifest-path fuzz/Cargo.toml --example seed`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use fleetgate::drift::baseline::Baseline;
use fleetgate::registry::bundle::BundleFile;
use fleetgate_fuzz::{
    MESSAGE_CHANNELS, NOW_MS, ROLLBACK_DEVICE, ROLLBACK_NOW_MS, ROLLBACK_TRANSFER, fixture,
    hardware, rollback_slots, selector, spec, test_key, trusted,
};
use fleetgate_protocol::update::{Accepted, DevicePolicy, Download, check_offer};
use fleetgate_protocol::{
    Action, Alert, ArtifactKind, Channel, Chunk, Command, CommandAck, Domain, Downlink, Encoding,
    Hello, LogLine, RollbackDirective, Signed, SlotState, Telemetry, UpdateOffer, UpdateReport,
    Uplink, check_rollback, decode, encode, topic,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

const ENCODINGS: [Encoding; 2] = [Encoding::Postcard, Encoding::Json];

struct Corpus {
    root: PathBuf,
}

impl Corpus {
    fn write(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
    }

    /// `payload` behind the selector byte of `choice` in `encoding`.
    fn select(&self, target: &str, name: &str, choice: u8, encoding: Encoding, payload: &[u8]) {
        let mut input = vec![selector(choice, encoding)];
        input.extend_from_slice(payload);
        self.write(target, &format!("{name}.{}", encoding.name()), &input);
    }

    /// `msg` in both encodings.
    fn message<T: Serialize>(&self, target: &str, name: &str, choice: u8, msg: &T) {
        for encoding in ENCODINGS {
            let payload = encode(msg, encoding).expect("a seed encodes");
            self.select(target, name, choice, encoding, &payload);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = Corpus {
        root: root.join("corpus"),
    };
    let docs = fs::read_to_string(root.join("../docs/protocol.md")).expect("read docs/protocol.md");
    messages(&corpus, &docs);
    manifests(&corpus);
    rollbacks(&corpus);
    topics(&corpus);
    configs(&corpus);
    api_bodies(&corpus);
}

/// Decodes a docs example and writes it in both encodings.
fn example<T: Serialize + DeserializeOwned + fleetgate_protocol::limits::Validate>(
    corpus: &Corpus,
    name: &str,
    choice: u8,
    json: &str,
) {
    let msg: T = decode(json.as_bytes(), Encoding::Json)
        .unwrap_or_else(|e| panic!("docs example {name} does not decode: {e}"));
    corpus.message("messages", name, choice, &msg);
}

fn messages(corpus: &Corpus, docs: &str) {
    let mut lines = docs.lines();
    let mut count = BTreeMap::<&str, usize>::new();
    while let Some(line) = lines.next() {
        let Some(channel) = line.strip_prefix("```json ") else {
            continue;
        };
        let json: String = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        let choice = MESSAGE_CHANNELS
            .iter()
            .position(|c| *c == channel)
            .unwrap_or_else(|| panic!("unknown channel {channel:?} in docs/protocol.md"));
        let n = count.entry(channel).or_default();
        *n += 1;
        let name = format!("docs-{channel}-{n}");
        let choice = choice as u8;
        match channel {
            "hello" => example::<Hello>(corpus, &name, choice, &json),
            "telemetry" => example::<Telemetry>(corpus, &name, choice, &json),
            "alert" => example::<Alert>(corpus, &name, choice, &json),
            "log" => example::<LogLine>(corpus, &name, choice, &json),
            "ack" => example::<CommandAck>(corpus, &name, choice, &json),
            "report" => example::<UpdateReport>(corpus, &name, choice, &json),
            "cmd" => example::<Command>(corpus, &name, choice, &json),
            _ => example::<Chunk>(corpus, &name, choice, &json),
        }
    }

    let f = fixture();
    for (i, (data, proof)) in f.chunks.iter().zip(&f.proofs).enumerate() {
        let chunk = Chunk {
            transfer: 4,
            index: i as u32,
            data: data.clone(),
            proof: proof.clone(),
        };
        let stored = f.chunks[..i].iter().map(Vec::as_slice);
        let mut download = Download::restore(f.manifest.clone(), stored);
        assert_eq!(download.accept(i as u64, data, proof), Ok(Accepted::Stored));
        corpus.message("messages", &format!("chunk-{i}"), 7, &chunk);
    }
    let offer = Command {
        id: 19,
        action: Action::Update(UpdateOffer {
            transfer: 4,
            manifest: signed_manifest(),
        }),
    };
    corpus.message("messages", "cmd-update", 6, &offer);
}

fn signed_manifest() -> Signed {
    let body = encode(&fixture().manifest, Encoding::Postcard).expect("a manifest encodes");
    Signed::sign(Domain::Manifest, body, &[test_key()])
}

/// A signed document alone, postcard (no format byte) or JSON.
fn signed(corpus: &Corpus, target: &str, name: &str, choice: u8, signed: &Signed) {
    for encoding in ENCODINGS {
        let payload = match encoding {
            Encoding::Postcard => postcard::to_allocvec(signed).expect("encodes"),
            Encoding::Json => serde_json::to_vec(signed).expect("encodes"),
        };
        corpus.select(target, name, choice, encoding, &payload);
    }
}

fn manifests(corpus: &Corpus) {
    let f = fixture();
    corpus.message("manifest", "manifest", 0, &f.manifest);
    let s = signed_manifest();
    let hw = hardware();
    let policy = DevicePolicy {
        trusted_keys: &trusted(),
        threshold: 1,
        hardware: &hw,
        max_size: 1 << 32,
    };
    check_offer(&s, &policy, NOW_MS, |_| 0).expect("the seed manifest is a good offer");
    signed(corpus, "manifest", "signed", 1, &s);
    corpus.select("manifest", "body", 2, Encoding::Postcard, &s.body);
    let bundle = BundleFile::sign(
        f.artifact.clone(),
        spec(256),
        &[test_key()],
        BTreeMap::from([("dataset".to_owned(), "kws-v3".to_owned())]),
        vec!["canary".to_owned()],
    );
    corpus.select(
        "manifest",
        "bundle",
        3,
        Encoding::Postcard,
        &bundle.encode(),
    );
}

fn rollbacks(corpus: &Corpus) {
    let (running, previous) = rollback_slots();
    let directive = RollbackDirective {
        device: ROLLBACK_DEVICE.into(),
        rollout: 7,
        transfer: ROLLBACK_TRANSFER,
        kind: ArtifactKind::Model,
        from: running.clone(),
        to: previous.clone(),
        issued_ms: 1000,
        expires_ms: 2000,
    };
    corpus.message("rollback", "directive", 0, &directive);
    let s = directive.sign(&test_key());
    let slot = |_, _: &str| {
        Some(SlotState {
            running,
            installed_by: Some(ROLLBACK_TRANSFER),
            previous: Some(previous),
        })
    };
    check_rollback(&s, &trusted(), ROLLBACK_DEVICE, ROLLBACK_NOW_MS, slot)
        .expect("the seed directive passes");
    signed(corpus, "rollback", "signed", 1, &s);
    corpus.select("rollback", "body", 2, Encoding::Postcard, &s.body);
}

fn topics(corpus: &Corpus) {
    let channels = Uplink::ALL
        .into_iter()
        .map(Channel::Up)
        .chain(Downlink::ALL.into_iter().map(Channel::Down));
    for channel in channels {
        for encoding in ENCODINGS {
            let t = topic::format("sensor-0042.lab:a_1", channel, encoding);
            let name = format!("{}-{}", channel.name(), encoding.name());
            corpus.write("topic", &name, t.as_bytes());
        }
    }
    for (name, t) in [
        ("wildcard", "fg/+/hello"),
        ("multi", "fg/d1/#"),
        ("short", "fg/d1"),
        ("root", "mqtt/d1/hello"),
        ("extra", "fg/d1/hello/json/x"),
    ] {
        corpus.write("topic", name, t.as_bytes());
    }
}

fn configs(corpus: &Corpus) {
    corpus.write(
        "config",
        "default",
        fleetgate_config::DEFAULT_TOML.as_bytes(),
    );
    corpus.write(
        "config",
        "partial",
        b"[mqtt]\nlisten = \"0.0.0.0:1884\"\n[retention]\ntelemetry_max_age = \"36h\"\n",
    );
    corpus.write(
        "config",
        "rules",
        b"[[alerts.rules]]\nmetric = \"inference_latency_us\"\nabove = 50000\nkind = \"slow\"\nseverity = \"info\"\n",
    );
    corpus.write(
        "config",
        "stages",
        b"[rollouts.policy]\nstages = [\"5\", { size = \"50%\", bake = \"10m\", abort = { failed = { count = 2 } } }, \"100%\"]\n",
    );
}

fn api_bodies(corpus: &Corpus) {
    let bodies: [(&str, &str); 9] = [
        ("enroll", r#"{"id": "d1", "labels": {"site": "lab"}}"#),
        (
            "command",
            r#"{"action": {"set_telemetry_interval": {"interval_ms": 5000}}}"#,
        ),
        (
            "rollout",
            r#"{"kind": "model", "name": "kws", "version": "production", "labels": {"site": "lab"}, "policy": {"stages": ["10%", "100%"]}}"#,
        ),
        ("action", r#"{"reason": "latency regression"}"#),
        (
            "annotations",
            r#"{"lineage": {"dataset": "kws-v3"}, "tags": ["canary"]}"#,
        ),
        ("alias", r#"{"version": "2.1.0"}"#),
        (
            "update",
            r#"{"kind": "firmware", "name": "sensor-fw", "version": "1.5.0", "devices": ["d1", "d2"], "allow_downgrade": false}"#,
        ),
        ("token", r#"{"name": "ci", "role": "operator"}"#),
        ("empty", "{}"),
    ];
    for (name, body) in bodies {
        corpus.write(
            "api_bodies",
            name,
            &[[0].as_slice(), body.as_bytes()].concat(),
        );
    }
    // A reference needs at least 100 rows (drift::baseline::MIN_REFERENCE): these four, 25 times.
    let csv = "x, y, prediction, confidence\n".to_owned()
        + &"0.5, 10, 0, 0.9\n1.5, 12, 1, 0.8\n-0.25, 11, 0, 0.95\n2.0, 9, 2, 0.7\n".repeat(25);
    let csv = csv.as_str();
    let baseline = Baseline::from_csv(csv, Some("prediction"), Some("confidence"), 3)
        .expect("the seed CSV makes a baseline");
    let json = serde_json::to_vec(&baseline).expect("a baseline encodes");
    corpus.write("api_bodies", "baseline", &[[1].as_slice(), &json].concat());
    // Selector 0x1e: CSV, both named columns, 2 + 1 * 7 = 9 bins.
    corpus.write(
        "api_bodies",
        "csv",
        &[[0x1e].as_slice(), csv.as_bytes()].concat(),
    );
    let overrides =
        r#"{"stages": ["5", {"size": "50%", "bake": "10m"}, "100%"], "gates": {"window": "5m"}}"#;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(overrides).expect("JSON");
    fleetgate_config::Config::default()
        .rollouts
        .policy_with_value(&map)
        .expect("the seed overrides are valid");
    corpus.write(
        "api_bodies",
        "overrides",
        &[[3].as_slice(), overrides.as_bytes()].concat(),
    );
}
