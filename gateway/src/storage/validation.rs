//! The validation tables: requirements of releases, bench devices' results, validation
//! transfers in progress and rollouts' validate stages.

use fleetgate_protocol::ArtifactKind;
use redb::{ReadableDatabase, ReadableTable};

use super::records::Record;
use super::schema::{REQUIREMENTS, ROLLOUT_VALIDATION, VALIDATION_RESULTS, VALIDATION_RUNS};
use super::{Result, Store, Tables};
use crate::rollouts::validate::ValidateStage;
use crate::validation::{ReleaseRequirements, ValidationRecord, ValidationRun};

impl Tables<'_> {
    pub fn requirements(
        &self,
        kind: ArtifactKind,
        name: &str,
        release: u64,
    ) -> Result<Option<ReleaseRequirements>> {
        match self.requirements.get((kind.name(), name, release))? {
            Some(v) => Ok(Some(ReleaseRequirements::decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn put_requirements(
        &mut self,
        kind: ArtifactKind,
        name: &str,
        release: u64,
        r: &ReleaseRequirements,
    ) -> Result<()> {
        self.changed = true;
        self.requirements
            .insert((kind.name(), name, release), r.encode().as_slice())?;
        Ok(())
    }

    pub fn put_validation_result(&mut self, r: &ValidationRecord) -> Result<()> {
        self.changed = true;
        let key = (
            r.kind.name(),
            r.name.as_str(),
            r.release,
            r.class.as_str(),
            r.device.as_str(),
        );
        self.validation_results.insert(key, r.encode().as_slice())?;
        Ok(())
    }

    pub fn put_validation_run(&mut self, r: &ValidationRun) -> Result<()> {
        self.changed = true;
        self.validation_runs
            .insert(r.transfer, r.encode().as_slice())?;
        Ok(())
    }

    pub fn delete_validation_run(&mut self, transfer: u64) -> Result<()> {
        self.changed |= self.validation_runs.remove(transfer)?.is_some();
        Ok(())
    }

    pub fn put_rollout_validation(&mut self, rollout: u64, s: &ValidateStage) -> Result<()> {
        self.changed = true;
        self.rollout_validation
            .insert(rollout, s.encode().as_slice())?;
        Ok(())
    }
}

impl Store {
    pub fn requirements(
        &self,
        kind: ArtifactKind,
        name: &str,
        release: u64,
    ) -> Result<Option<ReleaseRequirements>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REQUIREMENTS)?;
        match table.get((kind.name(), name, release))? {
            Some(v) => Ok(Some(ReleaseRequirements::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Every bench device's latest result for a release, by class then device.
    pub fn validation_results(
        &self,
        kind: ArtifactKind,
        name: &str,
        release: u64,
    ) -> Result<Vec<ValidationRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VALIDATION_RESULTS)?;
        let k = kind.name();
        table
            .range((k, name, release, "", "")..(k, name, release + 1, "", ""))?
            .map(|e| Ok(ValidationRecord::decode(e?.1.value())?))
            .collect()
    }

    /// Every stored result (for the gauges at start).
    pub fn all_validation_results(&self) -> Result<Vec<ValidationRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VALIDATION_RESULTS)?;
        table
            .iter()?
            .map(|e| Ok(ValidationRecord::decode(e?.1.value())?))
            .collect()
    }

    /// Validation transfers that had not ended.
    pub fn validation_runs(&self) -> Result<Vec<ValidationRun>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VALIDATION_RUNS)?;
        table
            .iter()?
            .map(|e| Ok(ValidationRun::decode(e?.1.value())?))
            .collect()
    }

    pub fn rollout_validation(&self, rollout: u64) -> Result<Option<ValidateStage>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUT_VALIDATION)?;
        match table.get(rollout)? {
            Some(v) => Ok(Some(ValidateStage::decode(v.value())?)),
            None => Ok(None),
        }
    }
}
