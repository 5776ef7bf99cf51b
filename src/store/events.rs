//! The append-only event log: what is written (typed actions and outcomes) and read.

use chrono::{DateTime, Utc};
use sqlx::{Sqlite, Transaction};

use super::row::{SandboxRow, StoredEvent};
use super::{Result, Store};
use crate::domain::{format_time, ChatId};

macro_rules! event_columns {
    () => {
        "SELECT id, at, chat_id, session_id, container_id, action, outcome, error, phase, \
         actor, detail FROM sandbox_events "
    };
}

impl Store {
    /// Events after `after_id`, oldest first (the watch stream's backfill and tail).
    pub async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<StoredEvent>> {
        Ok(sqlx::query_as(concat!(
            event_columns!(),
            "WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The newest event's id (0 for an empty log).
    pub async fn last_event_id(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM sandbox_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Lines in the event log.
    pub async fn event_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM sandbox_events")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The newest events first, of one chat (by its index) or of all.
    pub async fn events(&self, chat_id: Option<ChatId>, limit: u32) -> Result<Vec<StoredEvent>> {
        let query = match chat_id {
            Some(chat) => sqlx::query_as(concat!(
                event_columns!(),
                "WHERE chat_id = ?1 ORDER BY id DESC LIMIT ?2"
            ))
            .bind(chat.to_string()),
            None => sqlx::query_as(concat!(event_columns!(), "ORDER BY id DESC LIMIT ?1")),
        };
        Ok(query.bind(i64::from(limit)).fetch_all(&self.pool).await?)
    }

    /// Appends an event outside any status change (orphan removals, the old service's
    /// containers, exits).
    pub async fn event(&self, event: &NewEvent<'_>, now: DateTime<Utc>) -> Result<()> {
        let (mut tx, _gate) = self.begin_write().await?;
        insert_event(&mut tx, &format_time(now), event).await?;
        tx.commit().await?;
        self.appended.notify_one();
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
    /// A data-plane exec (audit).
    Exec,
    /// A data-plane file write (audit).
    FileWrite,
    /// The sandbox image was built (`docker.pull_policy: build`).
    ImageBuild,
    /// Chat storage: a workspace, chat, history or attachment written (audit; bytes, never
    /// contents).
    StorageWrite,
    /// Chat storage: a chat or an attachment removed (audit).
    StorageDelete,
    /// A sandbox's declared state changed (detail: the state and who declared it).
    StateDeclared,
    /// Its container was frozen.
    Pause,
    /// Its container was stopped and kept.
    Hibernate,
    /// Its container was thawed or started again (detail `start`: `resume`, or
    /// `resume_fallback` when the resume failed and a cold start replaced it).
    Resume,
    /// A background process started (audit: command, pid).
    ProcessStart,
    /// A background process ended (audit: how, exit code, bytes).
    ProcessEnd,
    /// A signal sent to a background process's tree, or its kill (audit).
    ProcessSignal,
    /// A terminal opened or closed (audit: size, bytes in and out, how it ended).
    Terminal,
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
            EventAction::Exec => "exec",
            EventAction::FileWrite => "file_write",
            EventAction::ImageBuild => "image_build",
            EventAction::StorageWrite => "storage_write",
            EventAction::StorageDelete => "storage_delete",
            EventAction::StateDeclared => "state_declared",
            EventAction::Pause => "pause",
            EventAction::Hibernate => "hibernate",
            EventAction::Resume => "resume",
            EventAction::ProcessStart => "process_start",
            EventAction::ProcessEnd => "process_end",
            EventAction::ProcessSignal => "process_signal",
            EventAction::Terminal => "terminal",
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
    /// An exec killed at its timeout.
    Timeout,
}

impl EventOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Ok => "ok",
            EventOutcome::Error => "error",
            EventOutcome::Superseded => "superseded",
            EventOutcome::Backoff => "backoff",
            EventOutcome::Restart => "restart",
            EventOutcome::Timeout => "timeout",
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
    /// Who asked (data-plane calls).
    pub actor: Option<&'a str>,
    /// JSON about the call (data-plane calls, builds).
    pub detail: Option<&'a str>,
}

impl EventAction {
    /// Audit lines (data-plane calls, chat storage): not changes of a sandbox, so not in
    /// the watch stream.
    pub fn is_audit(action: &str) -> bool {
        [
            EventAction::Exec,
            EventAction::FileWrite,
            EventAction::StorageWrite,
            EventAction::StorageDelete,
            EventAction::ProcessStart,
            EventAction::ProcessEnd,
            EventAction::ProcessSignal,
            EventAction::Terminal,
        ]
        .iter()
        .any(|a| a.as_str() == action)
    }
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
        actor: None,
        detail: None,
    };
    insert_event(tx, at, &event).await
}

pub(super) async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    at: &str,
    e: &NewEvent<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sandbox_events (at, chat_id, session_id, container_id, action, outcome, error, \
         actor, detail, phase) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
         (SELECT phase FROM sandboxes WHERE chat_id = ?2))",
    )
    .bind(at)
    .bind(e.chat_id)
    .bind(e.session_id)
    .bind(e.container_id)
    .bind(e.action.as_str())
    .bind(e.outcome.as_str())
    .bind(e.error)
    .bind(e.actor)
    .bind(e.detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
