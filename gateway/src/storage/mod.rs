//! Durable storage in one redb file. The only module that names redb types.
//!
//! Writes go through [`Store::write`], which opens every table once and commits (durably) when
//! the closure returns `Ok`; an `Err` aborts the whole transaction. Reads each take their own
//! MVCC snapshot and never wait for a writer. All calls block: async callers run them on the
//! blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table};

pub mod blocks;
pub mod outbox;
pub mod quota;
pub mod records;
mod requests;
pub mod schema;
mod validation;

pub use blocks::{Removed, Stream};
use records::{Record, RecordError};
use schema::*;

use crate::model::{
    AlertRecord, AlertState, AuditRecord, CommandRecord, Device, LogRow, ReleaseRecord,
    TelemetryRow, TokenRecord, TransferRecord,
};
use fleetgate_protocol::ArtifactKind;
use semver::Version;

use crate::drift::engine::{Evaluation, StreamKey};
use crate::rollouts::model::{
    AuditEntry, DeviceState as RolloutDeviceState, RolloutDevice, RolloutRecord, RolloutState,
};

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "fleetgate.redb";

/// Page cache used by [`Store::open`] (tests and tools); the gateway takes
/// `storage.cache_bytes` from its config.
pub const DEFAULT_CACHE_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(
        "database schema version {found} is newer than this gateway's ({SCHEMA_VERSION}); \
         run a newer fleetgate or restore a backup"
    )]
    NewerSchema { found: u64 },
    /// A commit failed on purpose (tests; see [`Store::fail_next_commits`]).
    #[error("commit failed (injected)")]
    Injected,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A cheap handle to the database; clones share it.
#[derive(Clone, Debug)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    /// Transactions committed through this handle and its clones.
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// Commits still to fail on purpose (see [`Store::fail_next_commits`]).
    fail_commits: Arc<std::sync::atomic::AtomicU64>,
    /// Set: the next write on the thread of this name panics (see `panic_next_write_on`).
    panic_on: Arc<std::sync::Mutex<Option<String>>>,
    /// An in-memory database (simulations) has no disk to sync: most of its commits are not
    /// durable, which redb makes much cheaper; every `DURABLE_EVERY`th is, so that redb frees
    /// the pages the others left behind.
    in_memory: bool,
}

/// In memory, how often a commit is durable (see `Store::in_memory`).
const DURABLE_EVERY: u64 = 64;

/// Every table, open for writing within one transaction.
pub struct Tables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    devices: Table<'txn, &'static str, &'static [u8]>,
    telemetry: blocks::Blocks<'txn>,
    logs: blocks::Blocks<'txn>,
    block_index: blocks::Index<'txn>,
    /// Row and byte counts added and removed in this transaction, written to `meta` at the end.
    totals: blocks::Totals,
    alerts: Table<'txn, u64, &'static [u8]>,
    commands: Table<'txn, u64, &'static [u8]>,
    releases: Table<'txn, (&'static str, &'static str, u64), &'static [u8]>,
    aliases: Table<'txn, (&'static str, &'static str, &'static str), u64>,
    transfers: Table<'txn, u64, &'static [u8]>,
    device_transfers: Table<'txn, (&'static str, u64), ()>,
    drift: Table<'txn, (&'static str, &'static str, &'static str, u64), &'static [u8]>,
    drift_state: Table<'txn, (&'static str, &'static str, &'static str), &'static [u8]>,
    rollouts: Table<'txn, u64, &'static [u8]>,
    rollout_devices: Table<'txn, (u64, &'static str), &'static [u8]>,
    rollout_audit: Table<'txn, (u64, u64), &'static [u8]>,
    tokens: Table<'txn, &'static str, &'static [u8]>,
    audit: Table<'txn, u64, &'static [u8]>,
    /// The validation tables (`validation.rs`).
    requirements: Table<'txn, (&'static str, &'static str, u64), &'static [u8]>,
    validation_results:
        Table<'txn, (&'static str, &'static str, u64, &'static str, &'static str), &'static [u8]>,
    validation_runs: Table<'txn, u64, &'static [u8]>,
    rollout_validation: Table<'txn, u64, &'static [u8]>,
    outbox: Table<'txn, (u8, u64), &'static [u8]>,
    outbox_state: Table<'txn, u8, (u64, u64, u64, u64)>,
    outbox_cursors: Table<'txn, (u8, &'static str), u64>,
    site_requests: Table<'txn, &'static str, &'static [u8]>,
    /// Whether anything was written: a transaction that wrote nothing is not committed (a
    /// commit costs a disk sync, and an idle gateway must not wear out its SD card).
    changed: bool,
}

impl std::fmt::Debug for Tables<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables").finish_non_exhaustive()
    }
}

/// Filter for [`Store::alerts`].
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub state: Option<AlertState>,
    pub severity: Option<fleetgate_protocol::Severity>,
    pub device: Option<String>,
}

/// What the ingest writer needs in memory at start.
#[derive(Debug)]
pub struct Loaded {
    pub devices: Vec<Device>,
    pub unresolved_alerts: Vec<AlertRecord>,
    pub next_alert_id: u64,
    pub next_command_id: u64,
    pub next_transfer_id: u64,
    /// Transfers that have not reached a final state.
    pub open_transfers: Vec<TransferRecord>,
    pub next_rollout_id: u64,
    /// Rollouts that may still act (see [`Store::load`]), with their devices.
    pub rollouts: Vec<(RolloutRecord, Vec<RolloutDevice>)>,
    /// Newest telemetry and log keys per device, so new keys stay unique after a restart even
    /// if the clock went back.
    pub last_keys: std::collections::HashMap<String, (u64, u64)>,
    /// The storage quota's learned ratio (`storage::quota`; 0: unknown).
    pub quota_ratio: u64,
}

impl Store {
    /// Opens (or creates) the database in `dir`, creating the directory if needed.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// As [`Store::open`], with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Db(e.into()))?;
        let path = dir.join(DB_FILE);
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)?;
        let store = Store {
            db: Arc::new(db),
            path,
            commits: Arc::default(),
            fail_commits: Arc::default(),
            panic_on: Arc::default(),
            in_memory: false,
        };
        store.init_schema()?;
        Ok(store)
    }

    /// A database in memory (no file, no disk syncs): for deterministic simulations, where
    /// keeping the handle across a writer's "restart" stands for the disk.
    #[doc(hidden)]
    pub fn in_memory() -> Result<Store> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        let store = Store {
            db: Arc::new(db),
            path: PathBuf::new(),
            commits: Arc::default(),
            fail_commits: Arc::default(),
            panic_on: Arc::default(),
            in_memory: true,
        };
        store.init_schema()?;
        Ok(store)
    }

    fn init_schema(&self) -> Result<()> {
        let found = {
            let txn = self.db.begin_read()?;
            match txn.open_table(META) {
                Ok(meta) => meta.get(META_SCHEMA_VERSION)?.map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            }
        };
        match found {
            Some(v) if v > SCHEMA_VERSION => return Err(StorageError::NewerSchema { found: v }),
            Some(1) => self.migrate_from_1()?,
            _ => {}
        }
        self.write(|t| {
            // Committed even when nothing changed: the transaction creates any table this
            // schema has that the file does not yet.
            t.changed = true;
            if found.is_none() {
                t.set_meta(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
                t.set_meta(META_NEXT_ALERT_ID, 1)?;
                t.set_meta(META_NEXT_COMMAND_ID, 1)?;
                t.set_meta(META_NEXT_TRANSFER_ID, 1)?;
            }
            Ok(())
        })
    }

    /// Schema 1 stored one row per telemetry message and log line: moves them into blocks, in
    /// one transaction (a crash midway leaves schema 1, migrated again at the next start).
    fn migrate_from_1(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let txn = self.db.begin_write()?;
        let mut moved = 0u64;
        {
            let mut index = txn.open_table(BLOCK_INDEX)?;
            let mut totals = blocks::Totals::default();
            for (old, new, stream) in [
                (TELEMETRY_V1, TELEMETRY_BLOCKS, Stream::Telemetry),
                (LOGS_V1, LOG_BLOCKS, Stream::Logs),
            ] {
                let rows = txn.open_table(old)?;
                let mut to = txn.open_table(new)?;
                let mut device = String::new();
                let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
                for entry in rows.iter()? {
                    let (k, v) = entry?;
                    let (d, key) = k.value();
                    if d != device || pending.len() == blocks::MAX_BLOCK_ROWS {
                        blocks::append(
                            &mut to,
                            &mut index,
                            &mut totals,
                            stream,
                            &device,
                            &pending,
                        )?;
                        pending.clear();
                        device = d.to_owned();
                    }
                    pending.push((key, v.value().to_vec()));
                    moved += 1;
                }
                blocks::append(&mut to, &mut index, &mut totals, stream, &device, &pending)?;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(META_ROWS_TELEMETRY, totals.telemetry.max(0) as u64)?;
            meta.insert(META_ROWS_LOGS, totals.logs.max(0) as u64)?;
            meta.insert(META_ROW_BYTES, totals.bytes.max(0) as u64)?;
            meta.insert(META_SCHEMA_VERSION, 2)?;
        }
        txn.delete_table(TELEMETRY_V1)?;
        txn.delete_table(LOGS_V1)?;
        txn.commit()?;
        tracing::info!(
            rows = moved,
            took_ms = started.elapsed().as_millis() as u64,
            "database migrated from schema 1 to 2 (telemetry and logs in blocks)"
        );
        Ok(())
    }

    /// Writes a consistent copy of the whole database to a new file at `dest` (which must not
    /// exist): every table as of one read snapshot, while writers go on.
    pub fn snapshot(&self, dest: &Path) -> Result<()> {
        let src = self.db.begin_read()?;
        let copy = Database::builder().create(dest)?;
        let dst = copy.begin_write()?;
        copy_table(&src, &dst, META)?;
        copy_table(&src, &dst, DEVICES)?;
        copy_table(&src, &dst, TELEMETRY_BLOCKS)?;
        copy_table(&src, &dst, LOG_BLOCKS)?;
        copy_table(&src, &dst, BLOCK_INDEX)?;
        copy_table(&src, &dst, ALERTS)?;
        copy_table(&src, &dst, COMMANDS)?;
        copy_table(&src, &dst, RELEASES)?;
        copy_table(&src, &dst, ALIASES)?;
        copy_table(&src, &dst, TRANSFERS)?;
        copy_table(&src, &dst, DEVICE_TRANSFERS)?;
        copy_table(&src, &dst, DRIFT_WINDOWS)?;
        copy_table(&src, &dst, DRIFT_STATE)?;
        copy_table(&src, &dst, ROLLOUTS)?;
        copy_table(&src, &dst, ROLLOUT_DEVICES)?;
        copy_table(&src, &dst, ROLLOUT_AUDIT)?;
        copy_table(&src, &dst, TOKENS)?;
        copy_table(&src, &dst, AUDIT)?;
        copy_table(&src, &dst, REQUIREMENTS)?;
        copy_table(&src, &dst, VALIDATION_RESULTS)?;
        copy_table(&src, &dst, VALIDATION_RUNS)?;
        copy_table(&src, &dst, ROLLOUT_VALIDATION)?;
        copy_table(&src, &dst, OUTBOX)?;
        copy_table(&src, &dst, OUTBOX_STATE)?;
        copy_table(&src, &dst, OUTBOX_CURSORS)?;
        copy_table(&src, &dst, SITE_REQUESTS)?;
        dst.commit()?;
        Ok(())
    }

    /// Makes the next `n` commits that would write something fail instead (aborted, nothing
    /// written), as a full disk or an I/O error would. For tests of what depends on commits.
    #[doc(hidden)]
    pub fn fail_next_commits(&self, n: u64) {
        self.fail_commits
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes the next write on the thread named `thread` panic, as a bug would. For tests of
    /// what a crashed writer does to the gateway.
    #[doc(hidden)]
    pub fn panic_next_write_on(&self, thread: &str) {
        if let Ok(mut on) = self.panic_on.lock() {
            *on = Some(thread.to_owned());
        }
    }

    fn take_injected_panic(&self) -> bool {
        let Ok(mut on) = self.panic_on.lock() else {
            return false;
        };
        let here = on.is_some() && std::thread::current().name() == on.as_deref();
        if here {
            *on = None;
        }
        here
    }

    fn take_injected_failure(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.fail_commits
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Write transactions committed so far (a transaction that changed nothing is not).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Runs `f` in one write transaction and commits it durably if `f` succeeds.
    pub fn write<R>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<R>) -> Result<R> {
        assert!(
            !self.take_injected_panic(),
            "a storage write panicked (injected by a test)"
        );
        let mut txn = self.db.begin_write()?;
        if self.in_memory && !(self.commits() + 1).is_multiple_of(DURABLE_EVERY) {
            // Never refused for an in-memory database; if it were, the commit stays durable.
            let _ = txn.set_durability(redb::Durability::None);
        }
        let result = {
            let mut tables = Tables {
                meta: txn.open_table(META)?,
                devices: txn.open_table(DEVICES)?,
                telemetry: txn.open_table(TELEMETRY_BLOCKS)?,
                logs: txn.open_table(LOG_BLOCKS)?,
                block_index: txn.open_table(BLOCK_INDEX)?,
                totals: blocks::Totals::default(),
                alerts: txn.open_table(ALERTS)?,
                commands: txn.open_table(COMMANDS)?,
                releases: txn.open_table(RELEASES)?,
                aliases: txn.open_table(ALIASES)?,
                transfers: txn.open_table(TRANSFERS)?,
                device_transfers: txn.open_table(DEVICE_TRANSFERS)?,
                drift: txn.open_table(DRIFT_WINDOWS)?,
                drift_state: txn.open_table(DRIFT_STATE)?,
                rollouts: txn.open_table(ROLLOUTS)?,
                rollout_devices: txn.open_table(ROLLOUT_DEVICES)?,
                rollout_audit: txn.open_table(ROLLOUT_AUDIT)?,
                tokens: txn.open_table(TOKENS)?,
                audit: txn.open_table(AUDIT)?,
                requirements: txn.open_table(REQUIREMENTS)?,
                validation_results: txn.open_table(VALIDATION_RESULTS)?,
                validation_runs: txn.open_table(VALIDATION_RUNS)?,
                rollout_validation: txn.open_table(ROLLOUT_VALIDATION)?,
                outbox: txn.open_table(OUTBOX)?,
                outbox_state: txn.open_table(OUTBOX_STATE)?,
                outbox_cursors: txn.open_table(OUTBOX_CURSORS)?,
                site_requests: txn.open_table(SITE_REQUESTS)?,
                changed: false,
            };
            let result = f(&mut tables)?;
            tables.apply_totals()?;
            (result, tables.changed)
        };
        let (result, changed) = result;
        if changed && self.take_injected_failure() {
            txn.abort()?;
            return Err(StorageError::Injected);
        }
        if changed {
            txn.commit()?;
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            txn.abort()?;
        }
        Ok(result)
    }

    /// Everything the ingest writer keeps in memory.
    pub fn load(&self) -> Result<Loaded> {
        let txn = self.db.begin_read()?;
        let devices = decode_all::<Device, _>(&txn.open_table(DEVICES)?)?;
        let alerts = txn.open_table(ALERTS)?;
        let mut unresolved_alerts = Vec::new();
        for entry in alerts.iter()? {
            let alert = AlertRecord::decode(entry?.1.value())?;
            if alert.state != AlertState::Resolved {
                unresolved_alerts.push(alert);
            }
        }
        let meta = txn.open_table(META)?;
        let get = |k| -> Result<u64> { Ok(meta.get(k)?.map_or(1, |v| v.value())) };
        let telemetry = txn.open_table(TELEMETRY_BLOCKS)?;
        let logs = txn.open_table(LOG_BLOCKS)?;
        let mut last_keys = std::collections::HashMap::new();
        for d in &devices {
            let id = d.id.as_str();
            let keys = (
                blocks::last_key(&telemetry, id)?,
                blocks::last_key(&logs, id)?,
            );
            last_keys.insert(d.id.clone(), keys);
        }
        let mut open_transfers = Vec::new();
        for entry in txn.open_table(TRANSFERS)?.iter()? {
            let t = TransferRecord::decode(entry?.1.value())?;
            if !t.state.is_final() {
                open_transfers.push(t);
            }
        }
        // Rollouts that may still act: running or paused ones, the newest completed one of each
        // artifact (it still updates its stragglers), and rolled-back ones with directives
        // outstanding.
        let mut rollouts = Vec::new();
        let mut newest_completed: std::collections::HashMap<(ArtifactKind, String), u64> =
            Default::default();
        let mut all = Vec::new();
        for entry in txn.open_table(ROLLOUTS)?.iter()? {
            all.push(RolloutRecord::decode(entry?.1.value())?);
        }
        for r in &all {
            if r.state == RolloutState::Completed {
                let e = newest_completed
                    .entry((r.kind, r.name.clone()))
                    .or_insert(r.id);
                *e = (*e).max(r.id);
            }
        }
        let devices_table = txn.open_table(ROLLOUT_DEVICES)?;
        for r in all {
            let ds = devices_of(&devices_table, r.id)?;
            let keep = match &r.state {
                RolloutState::Running | RolloutState::Paused { .. } => true,
                RolloutState::Completed => {
                    newest_completed.get(&(r.kind, r.name.clone())) == Some(&r.id)
                }
                RolloutState::RolledBack { .. } => ds.iter().any(|d| {
                    matches!(
                        d.state,
                        RolloutDeviceState::RollbackSent { .. } | RolloutDeviceState::Cancelled
                    )
                }),
                RolloutState::Aborted { .. } => false,
            };
            if keep {
                rollouts.push((r, ds));
            }
        }
        Ok(Loaded {
            devices,
            unresolved_alerts,
            last_keys,
            next_alert_id: get(META_NEXT_ALERT_ID)?,
            next_command_id: get(META_NEXT_COMMAND_ID)?,
            next_transfer_id: get(META_NEXT_TRANSFER_ID)?,
            open_transfers,
            next_rollout_id: get(META_NEXT_ROLLOUT_ID)?,
            rollouts,
            quota_ratio: meta.get(META_QUOTA_RATIO)?.map_or(0, |v| v.value()),
        })
    }

    pub fn device(&self, id: &str) -> Result<Option<Device>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEVICES)?;
        let value = table.get(id)?;
        value
            .map(|v| Device::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    pub fn devices(&self) -> Result<Vec<Device>> {
        let txn = self.db.begin_read()?;
        decode_all::<Device, _>(&txn.open_table(DEVICES)?)
    }

    /// Telemetry of `device` received in `[from_us, to_us)`, newest first, at most `limit` rows.
    pub fn telemetry(
        &self,
        device: &str,
        from_us: u64,
        to_us: u64,
        limit: usize,
    ) -> Result<Vec<TelemetryRow>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TELEMETRY_BLOCKS)?;
        blocks::read(&table, device, from_us, to_us, limit)?
            .iter()
            .map(|(_, row)| Ok(TelemetryRow::decode(row)?))
            .collect()
    }

    /// The newest `limit` log lines of `device`, newest first.
    pub fn logs(&self, device: &str, limit: usize) -> Result<Vec<LogRow>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG_BLOCKS)?;
        blocks::read(&table, device, 0, u64::MAX, limit)?
            .iter()
            .map(|(_, row)| Ok(LogRow::decode(row)?))
            .collect()
    }

    pub fn alert(&self, id: u64) -> Result<Option<AlertRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ALERTS)?;
        let value = table.get(id)?;
        value
            .map(|v| AlertRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// Alerts matching `filter`, newest first, at most `limit`.
    pub fn alerts(&self, filter: &AlertFilter, limit: usize) -> Result<Vec<AlertRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ALERTS)?;
        let mut out = Vec::new();
        for entry in table.iter()?.rev() {
            if out.len() >= limit {
                break;
            }
            let alert = AlertRecord::decode(entry?.1.value())?;
            let keep = filter.state.is_none_or(|s| s == alert.state)
                && filter.severity.is_none_or(|s| s == alert.severity)
                && filter.device.as_ref().is_none_or(|d| *d == alert.device);
            if keep {
                out.push(alert);
            }
        }
        Ok(out)
    }

    pub fn command(&self, id: u64) -> Result<Option<CommandRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(COMMANDS)?;
        let value = table.get(id)?;
        value
            .map(|v| CommandRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// Releases, optionally of one kind and name, ordered by kind, name and release counter.
    pub fn releases(
        &self,
        kind: Option<ArtifactKind>,
        name: Option<&str>,
    ) -> Result<Vec<ReleaseRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RELEASES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (k, n, _) = key.value();
            if kind.is_some_and(|want| want.name() != k) || name.is_some_and(|want| want != n) {
                continue;
            }
            out.push(ReleaseRecord::decode(value.value())?);
        }
        Ok(out)
    }

    /// A release by version, or by alias when `version` is not a version.
    pub fn release(
        &self,
        kind: ArtifactKind,
        name: &str,
        version_or_alias: &str,
    ) -> Result<Option<ReleaseRecord>> {
        let txn = self.db.begin_read()?;
        let releases = txn.open_table(RELEASES)?;
        let k = kind.name();
        let counter = match Version::parse(version_or_alias) {
            Ok(version) => {
                for entry in releases.range((k, name, 0)..=(k, name, u64::MAX))? {
                    let r = ReleaseRecord::decode(entry?.1.value())?;
                    if r.version == version {
                        return Ok(Some(r));
                    }
                }
                return Ok(None);
            }
            Err(_) => txn
                .open_table(ALIASES)?
                .get((k, name, version_or_alias))?
                .map(|v| v.value()),
        };
        let Some(counter) = counter else {
            return Ok(None);
        };
        let value = releases.get((k, name, counter))?;
        value
            .map(|v| ReleaseRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// The aliases of one artifact name: alias -> release counter.
    pub fn aliases(&self, kind: ArtifactKind, name: &str) -> Result<Vec<(String, u64)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ALIASES)?;
        let k = kind.name();
        let range = table.range((k, name, "")..)?;
        let mut out = Vec::new();
        for entry in range {
            let (key, value) = entry?;
            let (ek, en, alias) = key.value();
            if ek != k || en != name {
                break;
            }
            out.push((alias.to_owned(), value.value()));
        }
        Ok(out)
    }

    pub fn transfer(&self, id: u64) -> Result<Option<TransferRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TRANSFERS)?;
        let value = table.get(id)?;
        value
            .map(|v| TransferRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// Transfers, newest first, optionally of one device, at most `limit`.
    pub fn transfers(&self, device: Option<&str>, limit: usize) -> Result<Vec<TransferRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TRANSFERS)?;
        let mut out = Vec::new();
        match device {
            Some(d) => {
                let index = txn.open_table(DEVICE_TRANSFERS)?;
                for entry in index.range((d, 0)..=(d, u64::MAX))?.rev().take(limit) {
                    let id = entry?.0.value().1;
                    if let Some(v) = table.get(id)? {
                        out.push(TransferRecord::decode(v.value())?);
                    }
                }
            }
            None => {
                for entry in table.iter()?.rev().take(limit) {
                    out.push(TransferRecord::decode(entry?.1.value())?);
                }
            }
        }
        Ok(out)
    }

    /// Rollouts, newest first, at most `limit`.
    pub fn rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUTS)?;
        table
            .iter()?
            .rev()
            .take(limit)
            .map(|e| Ok(RolloutRecord::decode(e?.1.value())?))
            .collect()
    }

    pub fn rollout(&self, id: u64) -> Result<Option<RolloutRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUTS)?;
        table
            .get(id)?
            .map(|v| RolloutRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// A rollout's devices, in no particular order.
    pub fn rollout_devices(&self, id: u64) -> Result<Vec<RolloutDevice>> {
        let txn = self.db.begin_read()?;
        devices_of(&txn.open_table(ROLLOUT_DEVICES)?, id)
    }

    /// A rollout's audit log, oldest first, from entry `from`, at most `limit`.
    pub fn rollout_audit(
        &self,
        id: u64,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditEntry)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUT_AUDIT)?;
        table
            .range((id, from)..=(id, u64::MAX))?
            .take(limit)
            .map(|e| {
                let (k, v) = e?;
                Ok((k.value().1, AuditEntry::decode(v.value())?))
            })
            .collect()
    }

    /// A drift stream's closed windows, newest first, at most `limit`.
    pub fn drift_history(&self, key: &StreamKey, limit: usize) -> Result<Vec<Evaluation>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DRIFT_WINDOWS)?;
        let v = key.version.to_string();
        let (m, c) = (key.model.as_str(), key.cohort.as_str());
        let range = table.range((m, v.as_str(), c, 0)..=(m, v.as_str(), c, u64::MAX))?;
        range
            .rev()
            .take(limit)
            .map(|e| Ok(Evaluation::decode(e?.1.value())?))
            .collect()
    }

    /// The last `n` closed windows of every drift stream, oldest first (to restore verdicts).
    pub fn drift_recent(&self, n: usize) -> Result<Vec<(StreamKey, Vec<Evaluation>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DRIFT_WINDOWS)?;
        let mut out: Vec<(StreamKey, Vec<Evaluation>)> = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (m, v, c, _) = key.value();
            let Ok(version) = Version::parse(v) else {
                continue;
            };
            let key = StreamKey {
                model: m.to_owned(),
                version,
                cohort: c.to_owned(),
            };
            let evaluation = Evaluation::decode(value.value())?;
            match out.last_mut() {
                Some((k, evals)) if *k == key => {
                    evals.push(evaluation);
                    if evals.len() > n {
                        evals.remove(0);
                    }
                }
                _ => out.push((key, vec![evaluation])),
            }
        }
        Ok(out)
    }

    /// Operator tokens created through the API, by name.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let txn = self.db.begin_read()?;
        decode_all(&txn.open_table(TOKENS)?)
    }

    /// The API audit log, newest first: entries numbered below `before`, at most `limit`.
    pub fn audit(&self, before: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        table
            .range(..before)?
            .rev()
            .take(limit)
            .map(|e| {
                let (k, v) = e?;
                Ok((k.value(), AuditRecord::decode(v.value())?))
            })
            .collect()
    }

    /// Row counts of the big tables, for metrics and tests.
    pub fn counts(&self) -> Result<TableCounts> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let get = |k| -> Result<u64> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
        Ok(TableCounts {
            devices: txn.open_table(DEVICES)?.len()?,
            telemetry: get(META_ROWS_TELEMETRY)?,
            logs: get(META_ROWS_LOGS)?,
            row_bytes: get(META_ROW_BYTES)?,
            alerts: txn.open_table(ALERTS)?.len()?,
            commands: txn.open_table(COMMANDS)?.len()?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCounts {
    pub devices: u64,
    pub telemetry: u64,
    pub logs: u64,
    /// Encoded bytes of the stored telemetry and log rows.
    pub row_bytes: u64,
    pub alerts: u64,
    pub commands: u64,
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &redb::ReadTransaction,
    dst: &redb::WriteTransaction,
    def: redb::TableDefinition<K, V>,
) -> Result<()> {
    let from = src.open_table(def)?;
    let mut to = dst.open_table(def)?;
    for entry in from.iter()? {
        let (k, v) = entry?;
        to.insert(k.value(), v.value())?;
    }
    Ok(())
}

fn decode_all<R: Record, T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
) -> Result<Vec<R>> {
    table
        .iter()?
        .map(|e| Ok(R::decode(e?.1.value())?))
        .collect()
}

impl Tables<'_> {
    pub fn put_device(&mut self, device: &Device) -> Result<()> {
        self.changed = true;
        self.devices
            .insert(device.id.as_str(), device.encode().as_slice())?;
        Ok(())
    }

    /// Stores a device's new rows of `stream` (keys unique and increasing for the device, in
    /// order; values their record encodings) as blocks.
    pub fn append_rows(
        &mut self,
        stream: Stream,
        device: &str,
        rows: &[(u64, Vec<u8>)],
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.changed = true;
        let table = match stream {
            Stream::Telemetry => &mut self.telemetry,
            Stream::Logs => &mut self.logs,
        };
        blocks::append(
            table,
            &mut self.block_index,
            &mut self.totals,
            stream,
            device,
            rows,
        )
    }

    /// Removes `device`'s oldest blocks of `stream` while it keeps at least `keep` rows
    /// without them; `rows` is its row count, kept up to date. Returns the rows removed.
    pub fn trim_device(
        &mut self,
        stream: Stream,
        device: &str,
        keep: u64,
        rows: &mut u64,
    ) -> Result<u64> {
        let table = match stream {
            Stream::Telemetry => &mut self.telemetry,
            Stream::Logs => &mut self.logs,
        };
        let removed = blocks::trim_device(
            table,
            &mut self.block_index,
            &mut self.totals,
            stream,
            device,
            keep,
            rows,
        )?;
        self.changed |= removed > 0;
        Ok(removed)
    }

    /// Removes the oldest rows of every device, whole blocks at a time, until `bytes` of them
    /// are gone; only blocks that start before `before_us`, and only of `only` if given.
    pub fn remove_oldest(
        &mut self,
        bytes: u64,
        before_us: u64,
        only: Option<Stream>,
    ) -> Result<Vec<Removed>> {
        let removed = blocks::remove_oldest(
            &mut self.telemetry,
            &mut self.logs,
            &mut self.block_index,
            &mut self.totals,
            bytes,
            before_us,
            only,
        )?;
        self.changed |= !removed.is_empty();
        Ok(removed)
    }

    /// Encoded bytes of the stored rows, as of this transaction.
    pub fn row_bytes(&self) -> Result<u64> {
        let stored = self.meta.get(META_ROW_BYTES)?.map_or(0, |v| v.value());
        Ok(stored.saturating_add_signed(self.totals.bytes))
    }

    /// Writes the row and byte counts this transaction changed into `meta`.
    fn apply_totals(&mut self) -> Result<()> {
        let totals = std::mem::take(&mut self.totals);
        for (key, delta) in [
            (META_ROWS_TELEMETRY, totals.telemetry),
            (META_ROWS_LOGS, totals.logs),
            (META_ROW_BYTES, totals.bytes),
        ] {
            if delta != 0 {
                let now = self.meta.get(key)?.map_or(0, |v| v.value());
                self.meta.insert(key, now.saturating_add_signed(delta))?;
            }
        }
        Ok(())
    }

    pub fn meta(&self, key: &'static str) -> Result<u64> {
        Ok(self.meta.get(key)?.map_or(0, |v| v.value()))
    }

    /// Deletes alerts resolved before `cutoff_ms`; returns how many went.
    pub fn delete_resolved_alerts_before(&mut self, cutoff_ms: u64) -> Result<u64> {
        let mut removed = 0;
        self.alerts.retain(|_, value| {
            let old = AlertRecord::decode(value).is_ok_and(|a| {
                a.state == AlertState::Resolved && a.resolved.is_some_and(|r| r.at_ms < cutoff_ms)
            });
            removed += u64::from(old);
            !old
        })?;
        self.changed |= removed > 0;
        Ok(removed)
    }

    pub fn put_alert(&mut self, alert: &AlertRecord) -> Result<()> {
        self.changed = true;
        self.alerts.insert(alert.id, alert.encode().as_slice())?;
        Ok(())
    }

    pub fn put_command(&mut self, command: &CommandRecord) -> Result<()> {
        self.changed = true;
        self.commands
            .insert(command.id, command.encode().as_slice())?;
        Ok(())
    }

    pub fn command(&self, id: u64) -> Result<Option<CommandRecord>> {
        let value = self.commands.get(id)?;
        value
            .map(|v| CommandRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }

    /// Every release of one artifact name, by release counter.
    pub fn releases_of(&self, kind: ArtifactKind, name: &str) -> Result<Vec<ReleaseRecord>> {
        let k = kind.name();
        let range = self.releases.range((k, name, 0)..=(k, name, u64::MAX))?;
        range
            .map(|e| Ok(ReleaseRecord::decode(e?.1.value())?))
            .collect()
    }

    pub fn put_release(&mut self, r: &ReleaseRecord) -> Result<()> {
        self.changed = true;
        self.releases.insert(
            (r.kind.name(), r.name.as_str(), r.release),
            r.encode().as_slice(),
        )?;
        Ok(())
    }

    pub fn set_alias(
        &mut self,
        kind: ArtifactKind,
        name: &str,
        alias: &str,
        release: u64,
    ) -> Result<()> {
        self.changed = true;
        self.aliases.insert((kind.name(), name, alias), release)?;
        Ok(())
    }

    /// Removes an alias; returns whether it existed.
    pub fn remove_alias(&mut self, kind: ArtifactKind, name: &str, alias: &str) -> Result<bool> {
        let removed = self.aliases.remove((kind.name(), name, alias))?.is_some();
        self.changed |= removed;
        Ok(removed)
    }

    pub fn put_transfer(&mut self, t: &TransferRecord) -> Result<()> {
        self.changed = true;
        self.transfers.insert(t.id, t.encode().as_slice())?;
        self.device_transfers
            .insert((t.device.as_str(), t.id), ())?;
        Ok(())
    }

    /// Stores a closed drift window and keeps at most `keep` per stream.
    pub fn put_drift_window(
        &mut self,
        key: &StreamKey,
        evaluation: &Evaluation,
        keep: usize,
    ) -> Result<()> {
        self.changed = true;
        let v = key.version.to_string();
        let (m, c) = (key.model.as_str(), key.cohort.as_str());
        // Two windows can close in the same millisecond (one batch of telemetry): the later one
        // takes the next free key, so none overwrites another.
        let mut at = evaluation.closed_ms;
        while self.drift.get((m, v.as_str(), c, at))?.is_some() {
            at += 1;
        }
        self.drift
            .insert((m, v.as_str(), c, at), evaluation.encode().as_slice())?;
        let range = (m, v.as_str(), c, 0)..=(m, v.as_str(), c, u64::MAX);
        let stored = self.drift.range(range.clone())?.count();
        if stored > keep {
            let mut excess = stored - keep;
            self.drift.retain_in(range, |_, _| {
                let drop = excess > 0;
                excess = excess.saturating_sub(1);
                !drop
            })?;
        }
        Ok(())
    }

    pub fn rollout_exists(&self, id: u64) -> Result<bool> {
        Ok(self.rollouts.get(id)?.is_some())
    }

    pub fn put_rollout(&mut self, r: &RolloutRecord) -> Result<()> {
        self.changed = true;
        self.rollouts.insert(r.id, r.encode().as_slice())?;
        Ok(())
    }

    pub fn put_rollout_device(&mut self, rollout: u64, d: &RolloutDevice) -> Result<()> {
        self.changed = true;
        self.rollout_devices
            .insert((rollout, d.device.as_str()), d.encode().as_slice())?;
        Ok(())
    }

    pub fn put_audit(&mut self, rollout: u64, n: u64, e: &AuditEntry) -> Result<()> {
        self.changed = true;
        self.rollout_audit
            .insert((rollout, n), e.encode().as_slice())?;
        Ok(())
    }

    /// Adds a token; false (and nothing written) if the name is taken.
    pub fn insert_token(&mut self, t: &TokenRecord) -> Result<bool> {
        if self.tokens.get(t.name.as_str())?.is_some() {
            return Ok(false);
        }
        self.changed = true;
        self.tokens.insert(t.name.as_str(), t.encode().as_slice())?;
        Ok(true)
    }

    /// Removes a token; false if there was none of that name.
    pub fn remove_token(&mut self, name: &str) -> Result<bool> {
        let removed = self.tokens.remove(name)?.is_some();
        self.changed |= removed;
        Ok(removed)
    }

    /// Appends to the API audit log; returns the entry's number.
    pub fn append_audit(&mut self, e: &AuditRecord) -> Result<u64> {
        self.changed = true;
        let n = self.meta.get(META_NEXT_AUDIT_ID)?.map_or(1, |v| v.value());
        self.audit.insert(n, e.encode().as_slice())?;
        self.meta.insert(META_NEXT_AUDIT_ID, n + 1)?;
        Ok(n)
    }

    /// Sets a counter; writes (and so commits) only when it changed.
    pub fn set_meta(&mut self, key: &'static str, value: u64) -> Result<()> {
        if self.meta.get(key)?.map(|v| v.value()) != Some(value) {
            self.changed = true;
            self.meta.insert(key, value)?;
        }
        Ok(())
    }
}

fn devices_of(
    table: &redb::ReadOnlyTable<(u64, &'static str), &'static [u8]>,
    rollout: u64,
) -> Result<Vec<RolloutDevice>> {
    table
        .range((rollout, "")..(rollout + 1, ""))?
        .map(|e| Ok(RolloutDevice::decode(e?.1.value())?))
        .collect()
}

impl Tables<'_> {
    /// Stores a drift stream's saved state, replacing the one before.
    pub fn put_drift_state(&mut self, key: &StreamKey, state: &[u8]) -> Result<()> {
        self.changed = true;
        let v = key.version.to_string();
        self.drift_state
            .insert((key.model.as_str(), v.as_str(), key.cohort.as_str()), state)?;
        Ok(())
    }

    /// Forgets the saved states of every cohort of a model version (its baseline changed).
    pub fn delete_drift_states(&mut self, model: &str, version: &Version) -> Result<()> {
        let v = version.to_string();
        let mut removed = false;
        self.drift_state.retain_in(
            (model, v.as_str(), "")..=(model, v.as_str(), "\u{10ffff}"),
            |_, _| {
                removed = true;
                false
            },
        )?;
        self.changed |= removed;
        Ok(())
    }
}

impl Store {
    /// Every saved drift stream state.
    pub fn drift_states(&self) -> Result<Vec<(StreamKey, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(DRIFT_STATE) {
            Ok(t) => t,
            // A database from before drift states: nothing saved yet.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (m, v, c) = key.value();
            let Ok(version) = Version::parse(v) else {
                continue;
            };
            let key = StreamKey {
                model: m.to_owned(),
                version,
                cohort: c.to_owned(),
            };
            out.push((key, value.value().to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
