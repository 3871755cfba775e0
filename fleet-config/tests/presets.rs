//! The memory presets under packaging/presets load as valid configs, hold the numbers their
//! header comments state, and their worst-case estimate fits the budget they name.

use std::path::PathBuf;

use fleetgate_config::Config;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// What a preset is expected to set; the same numbers its header comment shows.
struct Expected {
    file: &'static str,
    host_mib: u64,
    max_connections: usize,
    downlink_segment_bytes: usize,
    downlink_segment_count: usize,
    cache_bytes: usize,
    queue: usize,
    queue_bytes: usize,
    max_concurrent: usize,
    window: u32,
    max_chunk_bytes: usize,
    max_bundle_bytes: usize,
}

const PRESETS: &[Expected] = &[
    Expected {
        file: "512mb.toml",
        host_mib: 512,
        max_connections: 500,
        downlink_segment_bytes: 512 << 10,
        downlink_segment_count: 2,
        cache_bytes: 16 << 20,
        queue: 4096,
        queue_bytes: 8 << 20,
        max_concurrent: 25,
        window: 8,
        max_chunk_bytes: 16 << 10,
        max_bundle_bytes: 8 << 20,
    },
    Expected {
        file: "1gb.toml",
        host_mib: 1024,
        max_connections: 2000,
        downlink_segment_bytes: 1 << 20,
        downlink_segment_count: 2,
        cache_bytes: 64 << 20,
        queue: 8192,
        queue_bytes: 16 << 20,
        max_concurrent: 100,
        window: 8,
        max_chunk_bytes: 16 << 10,
        max_bundle_bytes: 16 << 20,
    },
];

fn preset_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/presets")
        .join(file)
}

/// The worst case of ARCHITECTURE.md, "Memory budget", term by term as the presets' comments
/// list it.
fn worst_case_bytes(c: &Config) -> u64 {
    let empty_gateway = 25 * MIB;
    let per_busy_device = 25 * KIB;
    let drift = 4 * MIB;
    let r = &c.mqtt.router;
    let n = |v: usize| v as u64;
    empty_gateway
        + n(c.mqtt.max_connections) * per_busy_device
        + 3 * n(r.downlink_segment_bytes) * n(r.downlink_segment_count)
        + n(c.ingest.queue_bytes)
        + n(c.storage.cache_bytes)
        + n(c.updates.max_concurrent)
            * 2
            * u64::from(c.updates.window)
            * n(c.registry.max_chunk_bytes)
        + 4 * n(c.registry.max_bundle_bytes)
        + drift
}

/// The number before `suffix` on the comment line that starts with `prefix`.
fn stated(text: &str, prefix: &str, suffix: &str) -> u64 {
    let line = text
        .lines()
        .find_map(|l| l.trim_start_matches('#').trim().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no comment line starting {prefix:?}"));
    let number = line.split(suffix).next().unwrap_or_default().trim();
    number
        .parse()
        .unwrap_or_else(|e| panic!("{prefix:?} line: {number:?}: {e}"))
}

#[test]
fn presets_are_valid_and_hold_their_stated_numbers() {
    for want in PRESETS {
        let path = preset_path(want.file);
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let f = want.file;
        assert_eq!(c.mqtt.max_connections, want.max_connections, "{f}");
        let r = &c.mqtt.router;
        assert_eq!(r.downlink_segment_bytes, want.downlink_segment_bytes, "{f}");
        assert_eq!(r.downlink_segment_count, want.downlink_segment_count, "{f}");
        assert_eq!(c.storage.cache_bytes, want.cache_bytes, "{f}");
        assert_eq!(c.ingest.queue, want.queue, "{f}");
        assert_eq!(c.ingest.queue_bytes, want.queue_bytes, "{f}");
        assert!(c.ingest.batch <= c.ingest.queue, "{f}: batch over queue");
        assert_eq!(c.updates.max_concurrent, want.max_concurrent, "{f}");
        assert_eq!(c.updates.window, want.window, "{f}");
        assert_eq!(c.registry.max_chunk_bytes, want.max_chunk_bytes, "{f}");
        assert_eq!(c.registry.max_bundle_bytes, want.max_bundle_bytes, "{f}");
        // Site settings the package relies on.
        assert_eq!(
            c.storage.data_dir,
            PathBuf::from("/var/lib/fleetgate"),
            "{f}"
        );
        assert_eq!(c.mqtt.listen.port(), 1883, "{f}");
        assert!(c.http.listen.ip().is_loopback(), "{f}: API off loopback");
    }
}

#[test]
fn presets_worst_case_matches_their_comment_and_fits_their_budget() {
    for want in PRESETS {
        let path = preset_path(want.file);
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let estimate_mib = worst_case_bytes(&c).div_ceil(MIB);
        let stated_estimate = stated(&text, "Estimate:", "MiB");
        let budget = stated(&text, "Memory budget for the gateway:", "MiB");
        assert_eq!(
            estimate_mib, stated_estimate,
            "{}: the comment's estimate is out of date",
            want.file
        );
        assert!(
            estimate_mib * 10 <= budget * 9,
            "{}: {estimate_mib} MiB leaves less than 10% of the {budget} MiB budget",
            want.file
        );
        // The systemd unit caps the service at MemoryMax=50% of the memory the kernel sees,
        // which on a Raspberry Pi is less what the GPU reserves (64 MiB here).
        let cap = (want.host_mib - 64) / 2;
        assert!(
            budget <= cap,
            "{}: budget {budget} MiB over the {cap} MiB cap",
            want.file
        );
    }
}
