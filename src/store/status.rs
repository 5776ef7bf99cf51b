//! The controller's status writes. Every one is conditional on the session it is about, so
//! an action that lost a race can never overwrite a newer session.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::events::{insert_event, EventAction, EventOutcome, NewEvent};
use super::{Result, Store};
use crate::domain::{format_time, ChatId, Phase, SessionId};

/// A container observed running for a session, with its endpoint.
#[derive(Debug, Clone, Copy)]
pub struct RunningContainer<'a> {
    pub container_id: &'a str,
    pub ip: &'a str,
    pub port: u16,
    /// The published host port of the agent port, if published.
    pub host_port: Option<u16>,
    /// How it started: `warm`, or why cold (`pool_empty`, …); for the event's detail.
    pub start: Option<&'a str>,
    /// The network it is on (`None`: unknown, e.g. a backend without networks of its own).
    pub network: Option<&'a str>,
}

impl Store {
    /// Records a running container for the session. Returns false if the session changed.
    pub async fn record_running(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        running: &RunningContainer<'_>,
        action: EventAction,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let RunningContainer {
            container_id,
            ip,
            port,
            host_port,
            start,
            network,
        } = *running;
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let done = sqlx::query(
            "UPDATE sandboxes SET phase = ?7, container_id = ?3, endpoint_ip = ?4, \
             endpoint_port = ?5, observed_generation = generation, attempts = 0, \
             last_error = NULL, next_attempt_at = NULL, running_since = ?6, updated_at = ?6, \
             host_port = ?8, last_active_at = CASE WHEN ?9 THEN ?6 ELSE last_active_at END, \
             network = ?10 WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(container_id)
        .bind(ip)
        .bind(i64::from(port))
        .bind(&at)
        .bind(Phase::Running.as_str())
        .bind(host_port.map(i64::from))
        // A resume is activity: the idle clock starts when the sandbox runs again, not when
        // the resume was asked for (a resume slower than `idle_pause_seconds` must not be
        // paused again before its caller gets to it).
        .bind(action == EventAction::Resume)
        .bind(network)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = EventOutcome::of_write(done);
        // The address it was recorded at: the history (and the watch stream) show where a
        // sandbox moved to, e.g. after a swarm node was drained.
        let mut endpoint = serde_json::json!({ "ip": ip, "port": port });
        if let Some(p) = host_port {
            endpoint["host_port"] = p.into();
        }
        if let Some(n) = network {
            endpoint["network"] = n.into();
        }
        let mut detail = serde_json::json!({ "endpoint": endpoint });
        if let Some(how) = start {
            detail["start"] = how.into();
        }
        let detail = detail.to_string();
        insert_event(
            &mut tx,
            &at,
            &NewEvent {
                chat_id: &chat_id.to_string(),
                session_id: Some(&session_id.to_string()),
                container_id: Some(container_id),
                action,
                outcome,
                error: None,
                actor: None,
                detail: Some(&detail),
            },
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }

    /// Records a failed attempt; returns the attempt count and when the next attempt is due,
    /// or `None` if the session changed.
    pub async fn record_failure(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        action: EventAction,
        error: &str,
        backoff: impl FnOnce(u32) -> Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<(u32, DateTime<Utc>)>> {
        let (mut tx, gate) = self.begin_write().await?;
        let attempts: Option<i64> = sqlx::query_scalar(
            "SELECT attempts FROM sandboxes WHERE chat_id = ?1 AND session_id = ?2 \
             AND deleted_at IS NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let at = format_time(now);
        let result = match attempts {
            Some(previous) => {
                let attempts = u32::try_from(previous).unwrap_or(0).saturating_add(1);
                let delay = chrono::Duration::from_std(backoff(attempts))
                    .unwrap_or(chrono::Duration::seconds(60));
                let next_attempt_at = now + delay;
                sqlx::query(
                    "UPDATE sandboxes SET phase = ?7, attempts = ?3, last_error = ?4, \
                     next_attempt_at = ?5, container_id = NULL, endpoint_ip = NULL, \
                     endpoint_port = NULL, host_port = NULL, network = NULL, running_since = NULL, updated_at = ?6 \
                     WHERE chat_id = ?1 AND session_id = ?2",
                )
                .bind(chat_id.to_string())
                .bind(session_id.to_string())
                .bind(i64::from(attempts))
                .bind(error)
                .bind(format_time(next_attempt_at))
                .bind(&at)
                .bind(Phase::Failed.as_str())
                .execute(&mut *tx)
                .await?;
                Some((attempts, next_attempt_at))
            }
            None => None,
        };
        insert_event(
            &mut tx,
            &at,
            &NewEvent {
                chat_id: &chat_id.to_string(),
                session_id: Some(&session_id.to_string()),
                container_id: None,
                action,
                outcome: EventOutcome::Error,
                error: Some(error),
                actor: None,
                detail: None,
            },
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(result)
    }

    /// Records that the session's container exited on its own (`message` says how), as
    /// exit number `restarts` of a crash loop. With `retry_at` the restart waits until then:
    /// phase `failed`, `attempts` = `restarts`, `last_error` = `message`. Without, only the
    /// count and an event are written (the restart follows at once). Returns false if the
    /// session changed.
    pub async fn record_exit(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        message: &str,
        restarts: u32,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let query = match retry_at {
            Some(retry_at) => sqlx::query(
                "UPDATE sandboxes SET restarts = ?3, phase = ?7, attempts = ?3, \
                 last_error = ?4, next_attempt_at = ?5, container_id = NULL, \
                 endpoint_ip = NULL, endpoint_port = NULL, host_port = NULL, network = NULL, running_since = NULL, updated_at = ?6 \
                 WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
            )
            .bind(chat_id.to_string())
            .bind(session_id.to_string())
            .bind(i64::from(restarts))
            .bind(message)
            .bind(format_time(retry_at))
            .bind(&at),
            None => sqlx::query(
                "UPDATE sandboxes SET restarts = ?3, updated_at = ?4 \
                 WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
            )
            .bind(chat_id.to_string())
            .bind(session_id.to_string())
            .bind(i64::from(restarts))
            .bind(&at),
        };
        let done = query
            .bind(Phase::Failed.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        insert_event(
            &mut tx,
            &at,
            &NewEvent {
                chat_id: &chat_id.to_string(),
                session_id: Some(&session_id.to_string()),
                container_id: None,
                action: EventAction::Exit,
                outcome: if retry_at.is_some() {
                    EventOutcome::Backoff
                } else {
                    EventOutcome::Restart
                },
                error: Some(message),
                actor: None,
                detail: None,
            },
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }

    /// Records that the session expired and its containers are gone. Does nothing if the
    /// session was renewed in the meantime (its `expires_at` is in the future again).
    pub async fn record_expired(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        removed: &[String],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let done = sqlx::query(
            "UPDATE sandboxes SET phase = ?4, container_id = NULL, endpoint_ip = NULL, \
             endpoint_port = NULL, host_port = NULL, network = NULL, running_since = NULL, next_attempt_at = NULL, updated_at = ?3 \
             WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL \
             AND (expires_at <= ?3 OR phase = ?4)",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(&at)
        .bind(Phase::Expired.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = EventOutcome::of_write(done);
        insert_event(
            &mut tx,
            &at,
            &NewEvent {
                chat_id: &chat_id.to_string(),
                session_id: Some(&session_id.to_string()),
                container_id: removed.first().map(String::as_str),
                action: EventAction::Expire,
                outcome,
                error: None,
                actor: None,
                detail: None,
            },
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(())
    }

    /// Deletes a row whose deletion was requested, once its containers are gone.
    pub async fn purge(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        removed: &[String],
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (mut tx, gate) = self.begin_write().await?;
        let done = sqlx::query(
            "DELETE FROM sandboxes WHERE chat_id = ?1 AND session_id = ?2 \
             AND deleted_at IS NOT NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = EventOutcome::of_write(done);
        insert_event(
            &mut tx,
            &format_time(now),
            &NewEvent {
                chat_id: &chat_id.to_string(),
                session_id: Some(&session_id.to_string()),
                container_id: removed.first().map(String::as_str),
                action: EventAction::Purge,
                outcome,
                error: None,
                actor: None,
                detail: None,
            },
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }
}
