//! Runs one planned action against Docker and records the outcome in the store.
//!
//! The queue holds keys, not objects: a Start re-reads its row right before acting, so it never
//! starts a session that was replaced, deleted or expired since the plan was made.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::backoff::BackoffPolicy;
use crate::docker::{DockerRuntime, StartRequest};
use crate::domain::spec::{ContainerSpec, MountKind};
use crate::domain::volume::VolumePolicy;
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::{Action, Key, RemoveReason};
use crate::store::{RunningContainer, SandboxRow, Store, StoreError};

/// Why an action did not complete; the controller retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("host directory {path}: {reason}")]
    HostDir { path: String, reason: String },
}

/// How an action ended when it did not error.
pub enum Outcome {
    Done,
    /// The row changed since the plan; nothing was done.
    Skipped,
    /// A start failed and was recorded in the row; it is due again at `retry_at` (the row's
    /// `next_attempt_at`), `None` when the session changed meanwhile.
    StartFailed {
        retry_at: Option<DateTime<Utc>>,
    },
}

pub struct Executor {
    pub store: Store,
    pub runtime: DockerRuntime,
    pub backoff: BackoffPolicy,
    pub volumes: Arc<VolumePolicy>,
    pub metrics: Arc<Metrics>,
}

impl Executor {
    /// Runs the action and counts its outcome.
    pub async fn run(&self, action: Action) -> Result<Outcome, ActionError> {
        let kind = action.kind();
        let expiring = matches!(
            &action,
            Action::Remove {
                reason: RemoveReason::Expire { .. },
                ..
            }
        );
        let result = self.run_inner(action).await;
        let outcome = match &result {
            Ok(Outcome::Done) => "ok",
            Ok(Outcome::StartFailed { .. }) => "error",
            Ok(Outcome::Skipped) => "skipped",
            Err(_) => "error",
        };
        self.metrics.action(kind, outcome);
        if expiring {
            let counter = match &result {
                Ok(_) => &self.metrics.cleanup_total,
                Err(_) => &self.metrics.cleanup_errors_total,
            };
            counter.inc();
        }
        result
    }

    #[tracing::instrument(skip_all, fields(action = action.kind(), chat_id = tracing::field::Empty, session_id = tracing::field::Empty, container_id = tracing::field::Empty))]
    async fn run_inner(&self, action: Action) -> Result<Outcome, ActionError> {
        let span = tracing::Span::current();
        match &action.key() {
            Key::Chat(c) => span.record("chat_id", tracing::field::display(c)),
            Key::Container(id) => span.record("container_id", id.as_str()),
        };
        match action {
            Action::Start {
                chat_id,
                session_id,
                stale,
            } => self.start(chat_id, session_id, &stale).await,
            Action::Adopt {
                chat_id,
                session_id,
                container_id,
                ip,
                stale,
            } => {
                let Some(row) = self.store.get(chat_id).await? else {
                    return Ok(Outcome::Skipped);
                };
                span.record("session_id", tracing::field::display(session_id));
                span.record("container_id", container_id.as_str());
                let port = parse_spec(&row)?.agent_port;
                let running = RunningContainer {
                    container_id: &container_id,
                    ip: &ip,
                    port,
                };
                // Record the healthy one first: a stale container that resists removal must
                // not keep a working sandbox from being served.
                self.store
                    .record_running(chat_id, session_id, &running, "adopt", Utc::now())
                    .await?;
                info!(%chat_id, %session_id, %container_id, "adopted running container");
                self.remove_all(&stale).await?;
                Ok(Outcome::Done)
            }
            Action::Remove {
                key,
                containers,
                reason,
            } => {
                if let (Key::Chat(chat_id), RemoveReason::Expire { session_id }) = (&key, &reason) {
                    // A renew may have landed since the plan: re-read before removing.
                    let row = self.store.get(*chat_id).await?;
                    let renewed =
                        row.is_some_and(|r| r.session_id == *session_id && r.is_live(Utc::now()));
                    if renewed {
                        return Ok(Outcome::Skipped);
                    }
                }
                self.remove_all(&containers).await?;
                let now = Utc::now();
                match (key, reason) {
                    (Key::Chat(chat_id), RemoveReason::Expire { session_id }) => {
                        self.store
                            .record_expired(chat_id, session_id, &containers, now)
                            .await?;
                        info!(%chat_id, %session_id, "session expired; container removed");
                    }
                    (Key::Chat(chat_id), RemoveReason::Finalize { session_id }) => {
                        self.store
                            .purge(chat_id, session_id, &containers, now)
                            .await?;
                        info!(%chat_id, %session_id, "deleted");
                    }
                    (key, reason) => {
                        let chat = match &key {
                            Key::Chat(c) => c.to_string(),
                            Key::Container(_) => "-".to_string(),
                        };
                        let action = if reason == RemoveReason::Orphan {
                            "remove_orphan"
                        } else {
                            "remove_stale"
                        };
                        for id in &containers {
                            self.store
                                .event(&chat, None, Some(id), action, "ok", None, now)
                                .await?;
                        }
                        info!(?key, ?containers, action, "removed containers");
                    }
                }
                Ok(Outcome::Done)
            }
        }
    }

    async fn remove_all(&self, ids: &[String]) -> Result<(), ActionError> {
        for id in ids {
            self.runtime.remove(id).await?;
        }
        Ok(())
    }

    async fn start(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        stale: &[String],
    ) -> Result<Outcome, ActionError> {
        let Some(row) = self.store.get(chat_id).await? else {
            return Ok(Outcome::Skipped);
        };
        if row.session_id != session_id || !row.is_live(Utc::now()) {
            return Ok(Outcome::Skipped); // superseded since the plan; the next pass sees the new truth
        }
        tracing::Span::current().record("session_id", tracing::field::display(session_id));
        let result = async {
            self.remove_all(stale).await?;
            let spec = parse_spec(&row)?;
            prepare_host(&spec, &self.volumes)?;
            let started = self
                .runtime
                .start(&StartRequest {
                    chat_id,
                    session_id,
                    agent_id: &row.agent_id,
                    spec: &spec,
                    spec_hash: &row.spec_hash,
                    volume_host_path: &row.volume_host_path,
                    expires_at: row.expires_at,
                })
                .await?;
            Ok::<_, ActionError>((started, spec.agent_port))
        }
        .await;
        match result {
            Ok((started, port)) => {
                let action = if started.adopted { "adopt" } else { "start" };
                let recorded = self
                    .store
                    .record_running(
                        chat_id,
                        session_id,
                        &RunningContainer {
                            container_id: &started.container_id,
                            ip: &started.ip,
                            port,
                        },
                        action,
                        Utc::now(),
                    )
                    .await?;
                if recorded {
                    let waited = (Utc::now() - row.created_at).to_std().unwrap_or_default();
                    self.metrics
                        .time_to_running_seconds
                        .observe(waited.as_secs_f64());
                }
                tracing::Span::current().record("container_id", started.container_id.as_str());
                info!(%chat_id, %session_id, container_id = %started.container_id, ip = %started.ip, recorded, "sandbox running");
                Ok(Outcome::Done)
            }
            Err(e) => {
                let message = e.to_string();
                let attempts = self
                    .store
                    .record_failure(
                        chat_id,
                        session_id,
                        "start",
                        &message,
                        |n| self.backoff.delay(n),
                        Utc::now(),
                    )
                    .await?;
                warn!(%chat_id, %session_id, ?attempts, error = %message, "start failed; will retry with backoff");
                // Recorded in the row; the row's next_attempt_at paces the retry.
                Ok(Outcome::StartFailed {
                    retry_at: attempts.map(|(_, at)| at),
                })
            }
        }
    }
}

/// The frozen spec of a row; a row that cannot be read is reported, never guessed at.
fn parse_spec(row: &SandboxRow) -> Result<ContainerSpec, StoreError> {
    serde_json::from_str(&row.spec_json).map_err(|e| StoreError::Corrupt {
        chat_id: row.chat_id.to_string(),
        message: format!("spec_json: {e}"),
    })
}

/// Makes the host side of every mount ready, checking again what was checked at request time:
/// the chat directory is created, the request volume must still pass the volume policy and
/// resolve to the same path (no symlink swapped in since), the read-only ones must exist.
fn prepare_host(spec: &ContainerSpec, volumes: &VolumePolicy) -> Result<(), ActionError> {
    for m in &spec.mounts {
        let host_err = |reason: String| ActionError::HostDir {
            path: m.source.clone(),
            reason,
        };
        match m.kind {
            MountKind::Chat => {
                std::fs::create_dir_all(&m.source).map_err(|e| host_err(e.to_string()))?
            }
            MountKind::Volume => {
                let canonical = volumes
                    .check(&m.source)
                    .map_err(|e| host_err(e.to_string()))?;
                if canonical != Path::new(&m.source) {
                    return Err(host_err(format!(
                        "now resolves to {}; refusing to mount it",
                        canonical.display()
                    )));
                }
            }
            MountKind::Dependencies | MountKind::Tools => {
                if !Path::new(&m.source).is_dir() {
                    return Err(host_err("is not an existing directory".into()));
                }
            }
        }
    }
    Ok(())
}
