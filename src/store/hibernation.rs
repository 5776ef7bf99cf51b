//! Hibernation writes: the declared state (API, shortcuts, transparent resume, the expiry
//! policy), the idle clock, and the controller's records of pauses, stops and resumes. Every
//! write is conditional on the session it is about.

use chrono::{DateTime, Duration, Utc};

use super::events::{insert_event, EventAction, EventOutcome, NewEvent};
use super::row::{self, SandboxRow};
use super::{select_row, Result, Store};
use crate::domain::hibernation::SandboxState;
use crate::domain::{format_time, ChatId, Phase, SessionId};

/// Who declared a state, for the event's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared<'a> {
    /// A client: `PUT` or a shortcut.
    Client,
    /// `sandbox.on_expiry: hibernate` at the end of the TTL.
    Expiry,
    /// A call on a paused or hibernated sandbox (`create`, `exec`, `files`, `renew`).
    Call(&'a str),
}

impl Declared<'_> {
    fn detail(self, state: SandboxState) -> String {
        let by = match self {
            Declared::Client => "client".to_string(),
            Declared::Expiry => "expiry".to_string(),
            Declared::Call(call) => call.to_string(),
        };
        serde_json::json!({ "state": state.as_str(), "by": by }).to_string()
    }
}

/// What a touch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The clock was restarted less than a second ago: nothing written.
    Fresh,
    /// Restarted now.
    Touched,
    /// Not (or no longer) declared and observed running: nothing written.
    NotAwake,
}

impl Store {
    /// Declares the state of the chat's live session `session_id`. Running also restarts the
    /// idle clock and, for a sandbox that was declared hibernated, gives it at least `ttl`
    /// again; hibernated keeps it for `retention` from now. `None` when the session is not
    /// live (or changed); the row otherwise (unchanged when it already had that state).
    #[allow(clippy::too_many_arguments)]
    pub async fn declare_state(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        state: SandboxState,
        by: Declared<'_>,
        ttl: Duration,
        retention: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<SandboxRow>> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, chat_id).await?;
        let live = current.filter(|r| {
            r.session_id == session_id
                && r.deleted_at.is_none()
                && r.phase != Phase::Expired
                && (r.expires_at > now || by == Declared::Expiry)
        });
        let Some(cur) = live else {
            tx.rollback().await?;
            return Ok(None);
        };
        let expires_at = match state {
            SandboxState::Hibernated => now + retention,
            SandboxState::Running if cur.desired_state == SandboxState::Hibernated => {
                cur.expires_at.max(now + ttl)
            }
            _ => cur.expires_at,
        };
        let at = format_time(now);
        let changed = cur.desired_state != state || expires_at != cur.expires_at;
        sqlx::query(
            "UPDATE sandboxes SET desired_state = ?2, expires_at = ?3, last_active_at = ?4, \
             updated_at = CASE WHEN ?5 THEN ?4 ELSE updated_at END WHERE chat_id = ?1",
        )
        .bind(chat_id.to_string())
        .bind(state.as_str())
        .bind(format_time(expires_at))
        .bind(&at)
        .bind(changed)
        .execute(&mut *tx)
        .await?;
        if changed {
            let detail = by.detail(state);
            insert_event(
                &mut tx,
                &at,
                &NewEvent {
                    chat_id: &chat_id.to_string(),
                    session_id: Some(&session_id.to_string()),
                    container_id: cur.container_id.as_deref(),
                    action: EventAction::StateDeclared,
                    outcome: EventOutcome::Ok,
                    error: None,
                    actor: None,
                    detail: Some(&detail),
                },
            )
            .await?;
        }
        let row: SandboxRow = sqlx::query_as(row::SELECT_ONE)
            .bind(chat_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(Some(row))
    }

    /// Restarts the chat's idle clock (a call reached it), in the same write as the check
    /// that the sandbox is awake (declared and observed running): a pause committed just
    /// before it is seen, never raced past. Writes only when the clock is further behind
    /// than the store's activity granularity (calls within it of the last recorded activity
    /// write nothing: an exec loop does not become a write loop): 1 s with an idle policy (an
    /// idle step is longer than that, so no pause can be due meanwhile).
    pub async fn touch(&self, chat_id: ChatId, now: DateTime<Utc>) -> Result<Touch> {
        let fresh = self
            .get(chat_id)
            .await?
            .is_none_or(|r| r.last_active_at + self.activity_granularity() > now);
        if fresh {
            return Ok(Touch::Fresh);
        }
        let (mut tx, gate) = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE sandboxes SET last_active_at = ?2 WHERE chat_id = ?1 AND deleted_at IS NULL \
             AND desired_state = 'running' AND phase = 'running'",
        )
        .bind(chat_id.to_string())
        .bind(format_time(now))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        self.commit_without_events(tx, gate, chat_id).await?;
        Ok(if done {
            Touch::Touched
        } else {
            Touch::NotAwake
        })
    }

    /// Restarts the chat's idle clock off the caller's path, where nothing acts on the clock
    /// at once (no idle policy: it is only shown). A thousand chats reused after a quiet
    /// minute would otherwise queue their writes behind one another on their requests (the
    /// scale bench's p99). One write per chat at a time; a fresh clock spawns nothing.
    pub fn touch_later(&self, chat_id: ChatId, now: DateTime<Utc>) {
        let stale = self
            .last_active(chat_id)
            .is_none_or(|at| at + self.activity_granularity() <= now);
        if !stale {
            return;
        }
        {
            let mut touching = self.touching.lock().unwrap_or_else(|e| e.into_inner());
            if !touching.insert(chat_id) {
                return;
            }
        }
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch(chat_id, now).await {
                tracing::warn!(error = %e, %chat_id, "cannot restart the idle clock");
            }
            let mut touching = store.touching.lock().unwrap_or_else(|e| e.into_inner());
            touching.remove(&chat_id);
        });
    }

    /// Before freezing or stopping the session's container: writes `pausing` or `hibernating`,
    /// if the row still wants it (no call restarted the idle clock, no client declared
    /// otherwise since `seen` was read). A stop under way is then never taken for a crash,
    /// and a call arriving meanwhile waits for the resume. False when the row moved on.
    pub async fn begin_transition(
        &self,
        seen: &SandboxRow,
        phase: Phase,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (mut tx, gate) = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE sandboxes SET phase = ?3, updated_at = ?4 WHERE chat_id = ?1 \
             AND session_id = ?2 AND deleted_at IS NULL AND desired_state = ?5 \
             AND COALESCE(last_active_at, updated_at) = ?6",
        )
        .bind(seen.chat_id.to_string())
        .bind(seen.session_id.to_string())
        .bind(phase.as_str())
        .bind(format_time(now))
        .bind(seen.desired_state.as_str())
        .bind(format_time(seen.last_active_at))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        self.commit(tx, gate, seen.chat_id).await?;
        Ok(done)
    }

    /// Records a paused or hibernated sandbox (a hibernated one has no address; its container,
    /// if any, is kept for the resume). `error` records a failed transition instead (the row
    /// is left as it is; the controller retries).
    pub async fn record_state(
        &self,
        seen: &SandboxRow,
        phase: Phase,
        container_id: Option<&str>,
        error: Option<&str>,
        detail: &serde_json::Value,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (chat_id, session_id) = (seen.chat_id, seen.session_id);
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let done = match error {
            Some(_) => false,
            None => {
                sqlx::query(
                    "UPDATE sandboxes SET phase = ?3, container_id = ?4, \
                     endpoint_ip = CASE WHEN ?3 = 'hibernated' THEN NULL ELSE endpoint_ip END, \
                     host_port = CASE WHEN ?3 = 'hibernated' THEN NULL ELSE host_port END, \
                     updated_at = ?5 \
                     WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
                )
                .bind(chat_id.to_string())
                .bind(session_id.to_string())
                .bind(phase.as_str())
                .bind(container_id)
                .bind(&at)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1
            }
        };
        let action = match phase {
            Phase::Paused => EventAction::Pause,
            _ => EventAction::Hibernate,
        };
        let outcome = match error {
            Some(_) => EventOutcome::Error,
            None => EventOutcome::of_write(done),
        };
        let detail = detail.to_string();
        insert_event(
            &mut tx,
            &at,
            &NewEvent {
                chat_id: &chat_id.to_string(),
                session_id: Some(&session_id.to_string()),
                container_id,
                action,
                outcome,
                error,
                actor: None,
                detail: Some(&detail),
            },
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }
}
