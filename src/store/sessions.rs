//! Desired-state writes for one chat: the old create contract, declarative apply, delete
//! requests, renewals, and the takeover of the old service's sessions.

use chrono::{DateTime, Utc};
use sqlx::{Sqlite, Transaction};

use super::events::{insert_event, row_event, EventAction, EventOutcome, NewEvent};
use super::row::{self, SandboxRow};
use super::status::RunningContainer;
use super::{select_row, NewSession, Result, Store};
use crate::domain::{format_time, ChatId, Phase, SessionId};

/// The outcome of `POST /api/v1/create` semantics on the store.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A live session with the same agent and volume exists.
    Reused(SandboxRow),
    /// The chat's first session was written.
    Created(SandboxRow),
    /// A new session replaced one that had expired, was still being deleted, or never ran.
    Replaced(SandboxRow),
    /// A live session that has run has a different agent or volume; nothing was written.
    Conflict(SandboxRow),
}

/// The outcome of declarative apply (`PUT`).
#[derive(Debug)]
pub enum ApplyOutcome {
    Unchanged(SandboxRow),
    /// The same spec with another declared state: only the state was written.
    StateChanged(SandboxRow),
    /// A new session replaced a live one whose spec differed.
    Replaced(SandboxRow),
    Created(SandboxRow),
}

/// A running container of the old Python service, to be taken over as a session.
#[derive(Debug, Clone)]
pub struct LegacyImport<'a> {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub agent_id: &'a str,
    pub volume_host_path: &'a str,
    /// What sandboxd would start if the container stopped: resolved from the current config
    /// with the container's own network and port.
    pub spec_json: String,
    pub spec_hash: String,
    pub container: RunningContainer<'a>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What `import_legacy` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    /// Written as the chat's session.
    Adopted,
    /// This session is already the chat's (an earlier start imported it).
    AlreadyKnown,
    /// The chat has another live session, or this session was adopted before and has since
    /// been replaced, expired or deleted: the old container is surplus.
    Superseded,
}

impl Store {
    /// The old `create` contract: reuse a live matching session; refuse (`Conflict`) a live
    /// different one that has run, or whose first start is still under way (created less than
    /// `first_start` ago, no attempt failed yet); otherwise write a new session. So a session
    /// whose start failed (the create answered 503) or outlived its create's wait (504) does
    /// not block a different request: the old service stored nothing for a failed start. One
    /// transaction; nothing is written on conflict.
    pub async fn create_or_reuse(
        &self,
        new: &NewSession,
        now: DateTime<Utc>,
        first_start: chrono::Duration,
    ) -> Result<CreateOutcome> {
        let decide = |cur: SandboxRow| reuse_or_conflict(cur, new, now, first_start);
        if let Some(outcome) = self.answer_live(new, now, first_start).await? {
            return Ok(outcome);
        }
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, new.chat_id).await?;
        if let Some(cur) = current.as_ref().filter(|c| c.is_live(now)) {
            if let Some(outcome) = decide(cur.clone()) {
                tx.rollback().await?;
                return Ok(outcome);
            }
        }
        let row = write_new_session(&mut tx, new, current.as_ref(), now).await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(if current.is_some() {
            CreateOutcome::Replaced(row)
        } else {
            CreateOutcome::Created(row)
        })
    }

    /// `create_or_reuse`'s fast path, without the write lock: a live session is answered
    /// (reused, or a conflict) from a plain read, a committed state, so the answer is as
    /// correct as one given inside a transaction. `None`: a new session may be written. The
    /// decision reads agent, volume and profile, never the new spec, so a caller may build
    /// the spec's per-chat parts (the workspace's directory) only when this says `None`.
    pub async fn answer_live(
        &self,
        new: &NewSession,
        now: DateTime<Utc>,
        first_start: chrono::Duration,
    ) -> Result<Option<CreateOutcome>> {
        Ok(self
            .get(new.chat_id)
            .await?
            .filter(|c| c.is_live(now))
            .and_then(|cur| reuse_or_conflict(cur, new, now, first_start)))
    }

    /// Declarative apply: an identical live spec is left alone, anything else gets a new
    /// session (as Kubernetes apply replaces a pod whose template changed).
    pub async fn apply(
        &self,
        new: &NewSession,
        now: DateTime<Utc>,
        retention: chrono::Duration,
    ) -> Result<ApplyOutcome> {
        // A state-only change is written by `declare_state` after this transaction; a session
        // replaced in between makes it miss, and the apply is decided again.
        for _ in 0..3 {
            if let Some(outcome) = self.apply_once(new, now, retention).await? {
                return Ok(outcome);
            }
        }
        Err(super::StoreError::Conflict(format!(
            "chat {}: its session kept changing under the apply",
            new.chat_id
        )))
    }

    async fn apply_once(
        &self,
        new: &NewSession,
        now: DateTime<Utc>,
        retention: chrono::Duration,
    ) -> Result<Option<ApplyOutcome>> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, new.chat_id).await?;
        if let Some(cur) = current.as_ref().filter(|c| c.is_live(now)) {
            if cur.agent_id == new.agent_id
                && cur.volume_host_path == new.volume_host_path
                && cur.spec_hash == new.spec_hash
            {
                let cur = cur.clone();
                tx.rollback().await?;
                drop(gate); // declare_state takes the write gate itself
                if cur.desired_state == new.state {
                    return Ok(Some(ApplyOutcome::Unchanged(cur)));
                }
                // Only the state differs: declared on the same session (its container stays).
                return Ok(self
                    .declare_state(
                        cur.chat_id,
                        cur.session_id,
                        new.state,
                        super::Declared::Client,
                        new.ttl,
                        retention,
                        now,
                    )
                    .await?
                    .map(ApplyOutcome::StateChanged));
            }
        }
        let replaced = current.as_ref().is_some_and(|c| c.is_live(now));
        let row = write_new_session(&mut tx, new, current.as_ref(), now).await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(Some(if replaced {
            ApplyOutcome::Replaced(row)
        } else {
            ApplyOutcome::Created(row)
        }))
    }

    /// Takes over a running container of the old service as the chat's session, keeping its
    /// session id, container, endpoint and expiry. Idempotent.
    pub async fn import_legacy(
        &self,
        l: &LegacyImport<'_>,
        now: DateTime<Utc>,
    ) -> Result<ImportOutcome> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, l.chat_id).await?;
        let adopted_before: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM legacy_adoptions WHERE session_id = ?1")
                .bind(l.session_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let is_current = current
            .as_ref()
            .is_some_and(|c| c.session_id == l.session_id);
        // A running old session wins over a live one that never ran: that one was written in
        // the moment between start-up and this takeover.
        let outcome = if is_current {
            Some(ImportOutcome::AlreadyKnown)
        } else if adopted_before.is_some()
            || current
                .as_ref()
                .is_some_and(|c| c.is_live(now) && c.has_run())
        {
            Some(ImportOutcome::Superseded)
        } else {
            None
        };
        if let Some(outcome) = outcome {
            tx.rollback().await?;
            return Ok(outcome);
        }
        let generation = current.as_ref().map_or(1, |p| p.generation + 1);
        let at = format_time(now);
        sqlx::query(
            "INSERT INTO sandboxes (chat_id, session_id, generation, agent_id, volume_host_path, \
               spec_json, spec_hash, created_at, updated_at, expires_at, deleted_at, phase, \
               container_id, endpoint_ip, endpoint_port, observed_generation, attempts, \
               last_error, next_attempt_at, running_since, legacy_container_id, network) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, ?14, ?11, ?12, ?13, ?3, \
               0, NULL, NULL, ?9, ?11, ?15) \
             ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id, \
               generation = excluded.generation, agent_id = excluded.agent_id, \
               volume_host_path = excluded.volume_host_path, spec_json = excluded.spec_json, \
               spec_hash = excluded.spec_hash, created_at = excluded.created_at, \
               updated_at = excluded.updated_at, expires_at = excluded.expires_at, \
               deleted_at = NULL, phase = ?14, container_id = excluded.container_id, \
               endpoint_ip = excluded.endpoint_ip, endpoint_port = excluded.endpoint_port, \
               observed_generation = excluded.generation, attempts = 0, last_error = NULL, \
               next_attempt_at = NULL, running_since = excluded.running_since, \
               legacy_container_id = excluded.legacy_container_id, desired_state = 'running', \
               last_active_at = excluded.updated_at, network = excluded.network",
        )
        .bind(l.chat_id.to_string())
        .bind(l.session_id.to_string())
        .bind(generation)
        .bind(l.agent_id)
        .bind(l.volume_host_path)
        .bind(&l.spec_json)
        .bind(&l.spec_hash)
        .bind(format_time(l.created_at))
        .bind(&at)
        .bind(format_time(l.expires_at))
        .bind(l.container.container_id)
        .bind(l.container.ip)
        .bind(i64::from(l.container.port))
        .bind(Phase::Running.as_str())
        .bind(l.container.network)
        .execute(&mut *tx)
        .await?;
        let row: SandboxRow = sqlx::query_as(row::SELECT_ONE)
            .bind(l.chat_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO legacy_adoptions (session_id, chat_id, container_id, adopted_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(l.session_id.to_string())
        .bind(l.chat_id.to_string())
        .bind(l.container.container_id)
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        row_event(&mut tx, &at, &row, EventAction::AdoptLegacy).await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(ImportOutcome::Adopted)
    }

    /// Marks a chat for deletion. Returns the row as it was (or `None` if there was none).
    pub async fn request_delete(
        &self,
        chat_id: ChatId,
        now: DateTime<Utc>,
    ) -> Result<Option<SandboxRow>> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, chat_id).await?;
        let Some(cur) = current else {
            tx.rollback().await?;
            return Ok(None);
        };
        if cur.deleted_at.is_none() {
            let at = format_time(now);
            sqlx::query(
                "UPDATE sandboxes SET deleted_at = ?2, updated_at = ?2, phase = ?3 \
                 WHERE chat_id = ?1",
            )
            .bind(chat_id.to_string())
            .bind(&at)
            .bind(Phase::Deleting.as_str())
            .execute(&mut *tx)
            .await?;
            row_event(&mut tx, &at, &cur, EventAction::DeleteRequested).await?;
        }
        self.commit(tx, gate, chat_id).await?;
        Ok(Some(cur))
    }

    /// Extends a live session's TTL. `None` when there is no live session.
    pub async fn renew(
        &self,
        chat_id: ChatId,
        ttl: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<SandboxRow>> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, chat_id).await?;
        let Some(cur) = current.filter(|c| c.is_live(now)) else {
            tx.rollback().await?;
            return Ok(None);
        };
        let at = format_time(now);
        sqlx::query("UPDATE sandboxes SET expires_at = ?2, updated_at = ?3 WHERE chat_id = ?1")
            .bind(chat_id.to_string())
            .bind(format_time(now + ttl))
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        row_event(&mut tx, &at, &cur, EventAction::Renew).await?;
        let row: SandboxRow = sqlx::query_as(row::SELECT_ONE)
            .bind(chat_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(Some(row))
    }

    /// A client asked again for a session whose last start failed: make it due now, so the
    /// controller retries at once instead of at `next_attempt_at`.
    pub async fn retry_now(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (mut tx, gate) = self.begin_write().await?;
        sqlx::query(
            "UPDATE sandboxes SET phase = ?4, next_attempt_at = NULL, updated_at = ?3 \
             WHERE chat_id = ?1 AND session_id = ?2 AND phase = ?5 AND deleted_at IS NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(format_time(now))
        .bind(Phase::Pending.as_str())
        .bind(Phase::Failed.as_str())
        .execute(&mut *tx)
        .await?;
        self.commit(tx, gate, chat_id).await
    }
}

/// The old contract for a live session: same agent and volume → reuse; different → conflict
/// if the session has run or its first start is still under way, else `None` (it may be
/// replaced).
fn reuse_or_conflict(
    cur: SandboxRow,
    new: &NewSession,
    now: DateTime<Utc>,
    first_start: chrono::Duration,
) -> Option<CreateOutcome> {
    let starting = cur.attempts == 0 && now < cur.created_at + first_start;
    let same_profile = new.profile.as_deref().is_none_or(|wanted| {
        crate::domain::spec::ContainerSpec::from_json(&cur.spec_json)
            .ok()
            .and_then(|s| s.profile)
            .is_some_and(|p| p.name == wanted)
    });
    if cur.agent_id == new.agent_id && cur.volume_host_path == new.volume_host_path && same_profile
    {
        Some(CreateOutcome::Reused(cur))
    } else if cur.has_run() || starting {
        Some(CreateOutcome::Conflict(cur))
    } else {
        None
    }
}

/// Writes a brand-new session over whatever the chat had (an expired or deleted session).
async fn write_new_session(
    tx: &mut Transaction<'static, Sqlite>,
    new: &NewSession,
    previous: Option<&SandboxRow>,
    now: DateTime<Utc>,
) -> Result<SandboxRow> {
    let session_id = SessionId::new_random();
    let generation = previous.map_or(1, |p| p.generation + 1);
    let at = format_time(now);
    sqlx::query(
        "INSERT INTO sandboxes (chat_id, session_id, generation, agent_id, volume_host_path, \
           spec_json, spec_hash, created_at, updated_at, expires_at, deleted_at, phase, \
           container_id, endpoint_ip, endpoint_port, attempts, last_error, next_attempt_at, \
           running_since, desired_state, last_active_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, NULL, ?10, NULL, NULL, NULL, 0, \
           NULL, NULL, NULL, ?11, ?8) \
         ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id, \
           generation = excluded.generation, agent_id = excluded.agent_id, \
           volume_host_path = excluded.volume_host_path, spec_json = excluded.spec_json, \
           spec_hash = excluded.spec_hash, created_at = excluded.created_at, \
           updated_at = excluded.updated_at, expires_at = excluded.expires_at, \
           deleted_at = NULL, phase = ?10, container_id = NULL, endpoint_ip = NULL, \
           endpoint_port = NULL, host_port = NULL, network = NULL, attempts = 0, last_error = NULL, next_attempt_at = NULL, \
           running_since = NULL, restarts = 0, desired_state = excluded.desired_state, \
           last_active_at = excluded.last_active_at",
    )
    .bind(new.chat_id.to_string())
    .bind(session_id.to_string())
    .bind(generation)
    .bind(&new.agent_id)
    .bind(&new.volume_host_path)
    .bind(&new.spec_json)
    .bind(&new.spec_hash)
    .bind(&at)
    .bind(format_time(now + new.ttl))
    .bind(Phase::Pending.as_str())
    .bind(new.state.as_str())
    .execute(&mut **tx)
    .await?;
    insert_event(
        tx,
        &at,
        &NewEvent {
            chat_id: &new.chat_id.to_string(),
            session_id: Some(&session_id.to_string()),
            container_id: None,
            action: EventAction::SessionCreated,
            outcome: EventOutcome::Ok,
            error: None,
            actor: None,
            detail: None,
        },
    )
    .await?;
    Ok(sqlx::query_as(row::SELECT_ONE)
        .bind(new.chat_id.to_string())
        .fetch_one(&mut **tx)
        .await?)
}
