//! The append-only event log: what is written (typed actions and outcomes) and read.

use chrono::{DateTime, Utc};
use sqlx::{Sqlite, Transaction};

use super::row::{SandboxRow, StoredEvent};
use super::{Result, Store};
use crate::domain::{format_time, ChatId};

impl Store {
    /// The newest events first, of one chat (by its index) or of all.
    pub async fn events(&self, chat_id: Option<ChatId>, limit: u32) -> Result<Vec<StoredEvent>> {
        let query = match chat_id {
            Some(chat) => sqlx::query_as(
                "SELECT id, at, chat_id, session_id, container_id, action, outcome, error \
                 FROM sandbox_events WHERE chat_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .bind(chat.to_string()),
            None => sqlx::query_as(
                "SELECT id, at, chat_id, session_id, container_id, action, outcome, error \
                 FROM sandbox_events ORDER BY id DESC LIMIT ?1",
            ),
        };
        Ok(query.bind(i64::from(limit)).fetch_all(&self.pool).await?)
    }

    /// Appends an event outside any status change (orphan removals, the old service's
    /// containers, exits).
    pub async fn event(&self, event: &NewEvent<'_>, now: DateTime<Utc>) -> Result<()> {
        let (mut tx, _gate) = self.begin_write().await?;
        insert_event(&mut tx, &format_time(now), event).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// What happened, as the `action` column says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventAction {
    SessionCreated,
    DeleteRequested,
    Renew,
    Start,
    Adopt,
    AdoptLegacy,
    RemoveLegacy,
    RemoveOrphan,
    RemoveStale,
    Exit,
    Expire,
    Purge,
}

impl EventAction {
    pub fn as_str(self) -> &'static str {
        match self {
            EventAction::SessionCreated => "session_created",
            EventAction::DeleteRequested => "delete_requested",
            EventAction::Renew => "renew",
            EventAction::Start => "start",
            EventAction::Adopt => "adopt",
            EventAction::AdoptLegacy => "adopt_legacy",
            EventAction::RemoveLegacy => "remove_legacy",
            EventAction::RemoveOrphan => "remove_orphan",
            EventAction::RemoveStale => "remove_stale",
            EventAction::Exit => "exit",
            EventAction::Expire => "expire",
            EventAction::Purge => "purge",
        }
    }
}

/// How it ended, as the `outcome` column says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    Ok,
    Error,
    /// The session changed before the write: nothing was changed.
    Superseded,
    /// An exit whose restart waits for the backoff.
    Backoff,
    /// An exit restarted at once.
    Restart,
}

impl EventOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Ok => "ok",
            EventOutcome::Error => "error",
            EventOutcome::Superseded => "superseded",
            EventOutcome::Backoff => "backoff",
            EventOutcome::Restart => "restart",
        }
    }

    /// `Ok` when a conditional write changed its row, else `Superseded`.
    pub fn of_write(done: bool) -> Self {
        if done {
            EventOutcome::Ok
        } else {
            EventOutcome::Superseded
        }
    }
}

/// One line of the event log, before it gets its id and time.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    /// The chat, or `-` for a container whose labels name none.
    pub chat_id: &'a str,
    pub session_id: Option<&'a str>,
    pub container_id: Option<&'a str>,
    pub action: EventAction,
    pub outcome: EventOutcome,
    pub error: Option<&'a str>,
}

/// Appends a successful event about a row's current session and container.
pub(super) async fn row_event(
    tx: &mut Transaction<'static, Sqlite>,
    at: &str,
    row: &SandboxRow,
    action: EventAction,
) -> Result<()> {
    let (chat, session) = (row.chat_id.to_string(), row.session_id.to_string());
    let event = NewEvent {
        chat_id: &chat,
        session_id: Some(&session),
        container_id: row.container_id.as_deref(),
        action,
        outcome: EventOutcome::Ok,
        error: None,
    };
    insert_event(tx, at, &event).await
}

pub(super) async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    at: &str,
    e: &NewEvent<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sandbox_events (at, chat_id, session_id, container_id, action, outcome, error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(at)
    .bind(e.chat_id)
    .bind(e.session_id)
    .bind(e.container_id)
    .bind(e.action.as_str())
    .bind(e.outcome.as_str())
    .bind(e.error)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
