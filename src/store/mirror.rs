//! An in-memory copy of the `sandboxes` table that answers the server's reads.
//!
//! Every query through sqlx's SQLite driver is a round trip to the connection's worker thread
//! (≈ 100 µs of CPU here, three quarters of a `GET`); the API's reads (reuse, `GET`, list) and
//! the controller's passes are served from this copy instead, as a Kubernetes API server serves
//! reads from its watch cache. SQLite stays the record: the copy is filled from it at start,
//! every write re-reads its chat's row inside its own transaction and applies it here after the
//! commit (writers take the store's write gate, so they apply in commit order), and the
//! controller reloads it from disk once per resync period as a safety net.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use super::{ListFilter, SandboxRow};
use crate::domain::ChatId;

#[derive(Default)]
pub(super) struct Mirror {
    rows: RwLock<BTreeMap<ChatId, SandboxRow>>,
}

impl Mirror {
    pub(super) fn get(&self, chat_id: ChatId) -> Option<SandboxRow> {
        self.read().get(&chat_id).cloned()
    }

    pub(super) fn last_active(&self, chat_id: ChatId) -> Option<chrono::DateTime<chrono::Utc>> {
        self.read().get(&chat_id).map(|r| r.last_active_at)
    }

    /// Every row, ordered by chat id (as `ORDER BY chat_id`).
    pub(super) fn all(&self) -> Vec<SandboxRow> {
        self.read().values().cloned().collect()
    }

    /// The same rows, in the same order, as the store's filtered `SELECT`.
    pub(super) fn list(&self, filter: &ListFilter) -> Vec<SandboxRow> {
        let start = filter.after.map_or(Bound::Unbounded, Bound::Excluded);
        self.read()
            .range((start, Bound::Unbounded))
            .map(|(_, row)| row)
            .filter(|r| filter.phase.is_none_or(|p| r.phase == p))
            .filter(|r| filter.agent_id.as_ref().is_none_or(|a| &r.agent_id == a))
            .take(filter.limit as usize)
            .cloned()
            .collect()
    }

    /// Applies a chat's row as committed (`None`: the row is gone).
    pub(super) fn set(&self, chat_id: ChatId, row: Option<SandboxRow>) {
        let mut rows = self.write();
        match row {
            Some(row) => rows.insert(chat_id, row),
            None => rows.remove(&chat_id),
        };
    }

    pub(super) fn replace_all(&self, all: Vec<SandboxRow>) {
        *self.write() = all.into_iter().map(|r| (r.chat_id, r)).collect();
    }

    pub(super) fn len(&self) -> usize {
        self.read().len()
    }

    // A panic while holding the lock cannot leave a half-applied map (each change is one
    // insert, remove or swap), so a poisoned lock is still safe to use.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ChatId, SandboxRow>> {
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<ChatId, SandboxRow>> {
        self.rows.write().unwrap_or_else(|e| e.into_inner())
    }
}
