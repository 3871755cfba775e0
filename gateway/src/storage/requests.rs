//! Requests from central operations a site has seen (by their id), so that a copy is answered
//! instead of carried out again, and later requests can name the rollout one created.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::records::Record;
use super::schema::SITE_REQUESTS;
use super::{Result, Store, Tables};
use crate::uplink::down::{MAX_REQUEST_VALIDITY_MS, RequestRecord};

impl Tables<'_> {
    /// Stores a request's record. Records expired for longer than the longest validity go
    /// first; a new id is refused (false) while `max` records are kept.
    pub fn put_site_request(
        &mut self,
        id: &str,
        record: &RequestRecord,
        now_ms: u64,
        max: u64,
    ) -> Result<bool> {
        let mut removed = false;
        self.site_requests.retain(|_, v| {
            let keep = RequestRecord::decode(v)
                .is_ok_and(|r| r.expires_ms.saturating_add(MAX_REQUEST_VALIDITY_MS) > now_ms);
            removed |= !keep;
            keep
        })?;
        self.changed |= removed;
        if self.site_requests.get(id)?.is_none() && self.site_requests.len()? >= max {
            return Ok(false);
        }
        self.changed = true;
        self.site_requests.insert(id, record.encode().as_slice())?;
        Ok(true)
    }
}

impl Store {
    pub fn site_request(&self, id: &str) -> Result<Option<RequestRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SITE_REQUESTS)?;
        let value = table.get(id)?;
        value
            .map(|v| RequestRecord::decode(v.value()))
            .transpose()
            .map_err(Into::into)
    }
}
