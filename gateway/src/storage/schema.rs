//! Every redb table of the gateway, and the schema version. Values are versioned encodings
//! (see `records`); keys are plain redb types so that ranges sort the way queries need.

use redb::TableDefinition;

/// Bumped when a table's key layout changes or a table is added that older code cannot ignore.
/// A database written by an older schema is migrated on open; a newer one is refused.
pub const SCHEMA_VERSION: u64 = 2;

/// Small counters and markers: `schema_version`, `next_alert_id`, `next_command_id`,
/// `next_transfer_id`, `next_rollout_id`.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Device id -> `Device`.
pub(crate) const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");

/// (device id, key of the block's first row) -> a block of `TelemetryRow`s (see `blocks`). A
/// row's key is its receive time in microseconds, unique per device.
pub(crate) const TELEMETRY_BLOCKS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("telemetry_blocks");

/// (device id, key of the block's first row) -> a block of `LogRow`s.
pub(crate) const LOG_BLOCKS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("log_blocks");

/// (key of a block's first row, stream: 0 telemetry 1 logs, device id) -> (rows, bytes): every
/// block in time order, for retention by age and by the storage quota.
pub(crate) const BLOCK_INDEX: TableDefinition<(u64, u8, &str), (u32, u32)> =
    TableDefinition::new("block_index");

/// Schema 1: one row per telemetry message, (device id, key) -> `TelemetryRow`. Migrated into
/// blocks on open.
pub(crate) const TELEMETRY_V1: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("telemetry");

/// Schema 1: one row per log line. Migrated into blocks on open.
pub(crate) const LOGS_V1: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("logs");

/// Alert id (increasing) -> `AlertRecord`.
pub(crate) const ALERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("alerts");

/// Command id (increasing) -> `CommandRecord`.
pub(crate) const COMMANDS: TableDefinition<u64, &[u8]> = TableDefinition::new("commands");

/// (kind, name, release counter) -> `ReleaseRecord`.
pub(crate) const RELEASES: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("releases");

/// (kind, name, alias) -> release counter.
pub(crate) const ALIASES: TableDefinition<(&str, &str, &str), u64> =
    TableDefinition::new("aliases");

/// Transfer id (increasing) -> `TransferRecord`.
pub(crate) const TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("transfers");

/// (device id, transfer id) -> (): a device's transfers, newest last.
pub(crate) const DEVICE_TRANSFERS: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("device_transfers");

/// (model, version, cohort, window close time in ms) -> drift `Evaluation`.
pub(crate) const DRIFT_WINDOWS: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("drift_windows");

/// Rollout id (increasing) -> `RolloutRecord`.
pub(crate) const ROLLOUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("rollouts");

/// (rollout id, device id) -> `RolloutDevice`.
pub(crate) const ROLLOUT_DEVICES: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("rollout_devices");

/// (rollout id, entry number) -> `AuditEntry`.
pub(crate) const ROLLOUT_AUDIT: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("rollout_audit");

/// token name -> `TokenRecord`.
pub(crate) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// entry number -> `AuditRecord`: every change made through the API.
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

pub(crate) const META_SCHEMA_VERSION: &str = "schema_version";
pub(crate) const META_NEXT_ALERT_ID: &str = "next_alert_id";
pub(crate) const META_NEXT_COMMAND_ID: &str = "next_command_id";
pub(crate) const META_NEXT_ROLLOUT_ID: &str = "next_rollout_id";
pub(crate) const META_NEXT_TRANSFER_ID: &str = "next_transfer_id";
pub(crate) const META_NEXT_AUDIT_ID: &str = "next_audit_id";
/// Rows and encoded bytes in the telemetry and log blocks.
pub(crate) const META_ROWS_TELEMETRY: &str = "rows_telemetry";
pub(crate) const META_ROWS_LOGS: &str = "rows_logs";
pub(crate) const META_ROW_BYTES: &str = "row_bytes";
/// The storage quota's learned file bytes per row byte, in millionths (see `storage::quota`);
/// 0 while unknown. (Databases of earlier versions hold an unused `quota_cap` too.)
pub(crate) const META_QUOTA_RATIO: &str = "quota_ratio";

/// (model, version, cohort) -> the drift engine's saved state of that stream: open windows,
/// alert episodes and CUSUMs, so that a restart continues where it stopped. The value is the
/// drift engine's own versioned encoding (`drift::engine::Engine::save_dirty`); one it cannot
/// read is dropped and the stream starts over.
pub(crate) const DRIFT_STATE: TableDefinition<(&str, &str, &str), &[u8]> =
    TableDefinition::new("drift_state");

/// (kind, name, release counter) -> `ReleaseRequirements`: the signed requirements and golden
/// sets of a release's artifacts (written with the release by the registry).
pub(crate) const REQUIREMENTS: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("requirements");

/// (kind, name, release counter, device class, device id) -> `ValidationRecord`: each bench
/// device's latest validation of a release.
pub(crate) const VALIDATION_RESULTS: TableDefinition<(&str, &str, u64, &str, &str), &[u8]> =
    TableDefinition::new("validation_results");

/// Transfer id -> `ValidationRun`: transfers that validate rather than install; removed when
/// the transfer ends (its result is then in `validation_results`).
pub(crate) const VALIDATION_RUNS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("validation_runs");

/// Rollout id -> `ValidateStage`: the validate stage of a rollout that has one.
pub(crate) const ROLLOUT_VALIDATION: TableDefinition<u64, &[u8]> =
    TableDefinition::new("rollout_validation");
/// (outbox stream, sequence number) -> an outbox entry (`uplink::event::Entry`): a message
/// waiting for the upstream broker or the alert webhooks (see `storage::outbox`).
pub(crate) const OUTBOX: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("outbox");

/// Outbox stream -> (head: last sequence number given, tail: oldest entry stored, bytes stored,
/// entries dropped before every destination had them).
pub(crate) const OUTBOX_STATE: TableDefinition<u8, (u64, u64, u64, u64)> =
    TableDefinition::new("outbox_state");

/// (outbox stream, destination) -> the highest sequence number the destination acknowledged.
pub(crate) const OUTBOX_CURSORS: TableDefinition<(u8, &str), u64> =
    TableDefinition::new("outbox_cursors");

/// Request id -> `uplink::down::RequestRecord`: rollout requests from central operations this
/// site has seen, kept until 30 days after they expire.
pub(crate) const SITE_REQUESTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("site_requests");
