//! Runs one planned action against Docker and records the outcome in the store.
//!
//! The queue holds keys, not objects: a Start re-reads its row right before acting, so it never
//! starts a session that was replaced, deleted or expired since the plan was made.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::backoff::BackoffPolicy;
use super::deaths::RecentDeaths;
use super::observed::ObservedCache;
use crate::backend::{SharedBackend, StartRequest};
use crate::context::Context;
use crate::domain::hibernation::SandboxState;
use crate::domain::spec::{ContainerSpec, MountKind};
use crate::domain::volume::VolumePolicy;
use crate::domain::{ChatId, Phase, SessionId};
use crate::planner::Found;
use crate::planner::{Action, Key, Observed, RemoveReason};
use crate::pool::ClaimOutcome;
use crate::store::{
    Declared, EventAction, EventOutcome, NewEvent, RunningContainer, SandboxRow, StoreError,
};

/// Why an action did not complete; the controller retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Runtime(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("host directory {path}: {reason}")]
    HostDir { path: String, reason: String },
    #[error(transparent)]
    Egress(#[from] crate::egress::iptables::FirewallError),
    #[error(transparent)]
    Place(#[from] super::networks::PlaceError),
}

impl From<super::egress::EgressError> for ActionError {
    fn from(e: super::egress::EgressError) -> Self {
        match e {
            super::egress::EgressError::Engine(e) => ActionError::Runtime(e),
            super::egress::EgressError::Firewall(e) => ActionError::Egress(e),
        }
    }
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
    /// The store, metrics and volume policy the process shares.
    pub ctx: Arc<Context>,
    pub runtime: SharedBackend,
    pub backoff: BackoffPolicy,
    /// Deaths the engine reported, with exit codes: tells a crash from a removal or drift.
    pub deaths: Arc<RecentDeaths>,
    /// The loop's copy of the engine: what this action changes is written into it.
    pub observed: Arc<ObservedCache>,
    /// Tells the supervisor the engine stopped answering (it reconnects).
    pub connection_failed: Arc<tokio::sync::Notify>,
    /// The host's egress rules: in place before a sandbox that needs them starts.
    pub egress: Arc<super::egress::EgressKeeper>,
    /// Warm starts: a start claims a member when it can, else starts cold.
    pub pool: Arc<crate::pool::WarmPool>,
    /// Which network a new container goes on (one fills up at 1,023).
    pub networks: Arc<super::networks::Networks>,
}

/// A session's container that stopped on its own.
#[derive(Debug, Clone, Copy)]
struct Exit {
    code: i64,
    ran_for: chrono::Duration,
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
        if let Err(ActionError::Runtime(e)) = &result {
            self.engine_unanswered(e);
        }
        let outcome = match &result {
            Ok(Outcome::Done) => "ok",
            Ok(Outcome::StartFailed { .. }) => "error",
            Ok(Outcome::Skipped) => "skipped",
            Err(_) => "error",
        };
        self.ctx.metrics.action(kind, outcome);
        if expiring {
            let counter = match &result {
                Ok(_) => &self.ctx.metrics.cleanup_total,
                Err(_) => &self.ctx.metrics.cleanup_errors_total,
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
                let Some(row) = self.ctx.store.get(chat_id).await? else {
                    return Ok(Outcome::Skipped);
                };
                span.record("session_id", tracing::field::display(session_id));
                span.record("container_id", container_id.as_str());
                let spec = parse_spec(&row)?;
                let port = spec.agent_port;
                // Published ports are only known to the engine: ask it for this container.
                let host_port = match &spec.publish_host_ip {
                    Some(_) => self.runtime.published_port(&container_id, port).await?,
                    None => None,
                };
                // The engine's answer (the list this plan came from), else what was recorded.
                let network = self.networks.network_of(&container_id).or(row.network);
                let running = RunningContainer {
                    container_id: &container_id,
                    ip: &ip,
                    port,
                    host_port,
                    start: None,
                    network: network.as_deref(),
                };
                // Record the healthy one first: a stale container that resists removal must
                // not keep a working sandbox from being served.
                self.ctx
                    .store
                    .record_running(
                        chat_id,
                        session_id,
                        &running,
                        EventAction::Adopt,
                        Utc::now(),
                    )
                    .await?;
                info!(%chat_id, %session_id, %container_id, "adopted running container");
                self.remove_all(&stale).await?;
                Ok(Outcome::Done)
            }
            Action::Transition {
                chat_id,
                session_id,
                container_id,
                found,
                to,
                stale,
            } => {
                span.record("session_id", tracing::field::display(session_id));
                self.transition(chat_id, session_id, container_id, found, to, &stale)
                    .await
            }
            Action::HibernateAtExpiry {
                chat_id,
                session_id,
            } => {
                let sandbox = &self.ctx.settings.sandbox;
                let declared = self
                    .ctx
                    .store
                    .declare_state(
                        chat_id,
                        session_id,
                        SandboxState::Hibernated,
                        Declared::Expiry,
                        chrono::Duration::zero(),
                        sandbox.hibernated_retention(),
                        Utc::now(),
                    )
                    .await?;
                Ok(match declared {
                    Some(_) => Outcome::Done,
                    None => Outcome::Skipped,
                })
            }
            Action::Remove {
                key,
                containers,
                reason,
            } => {
                if let (Key::Chat(chat_id), RemoveReason::Expire { session_id }) = (&key, &reason) {
                    // A renew may have landed since the plan: re-read before removing.
                    let row = self.ctx.store.get(*chat_id).await?;
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
                        self.ctx
                            .store
                            .record_expired(chat_id, session_id, &containers, now)
                            .await?;
                        info!(%chat_id, %session_id, "session expired; container removed");
                    }
                    (Key::Chat(chat_id), RemoveReason::Finalize { session_id }) => {
                        self.ctx
                            .store
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
                            EventAction::RemoveOrphan
                        } else {
                            EventAction::RemoveStale
                        };
                        for id in &containers {
                            let event = NewEvent {
                                chat_id: &chat,
                                session_id: None,
                                container_id: Some(id),
                                action,
                                outcome: EventOutcome::Ok,
                                error: None,
                                actor: None,
                                detail: None,
                            };
                            self.ctx.store.event(&event, now).await?;
                        }
                        info!(
                            ?key,
                            ?containers,
                            action = action.as_str(),
                            "removed containers"
                        );
                    }
                }
                Ok(Outcome::Done)
            }
        }
    }

    async fn remove_all(&self, ids: &[String]) -> Result<(), ActionError> {
        for id in ids {
            if let Err(e) = self.runtime.remove(id).await {
                // Unknown state now: the next pass lists.
                self.observed.invalidate();
                return Err(e.into());
            }
            // A claimed pool member's host mounts go with it.
            self.pool.removed(id).await;
        }
        self.observed.removed(ids);
        Ok(())
    }

    async fn start(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        stale: &[String],
    ) -> Result<Outcome, ActionError> {
        let Some(row) = self.ctx.store.get(chat_id).await? else {
            return Ok(Outcome::Skipped);
        };
        if row.session_id != session_id || !row.is_live(Utc::now()) {
            return Ok(Outcome::Skipped); // superseded since the plan; the next pass sees the new truth
        }
        tracing::Span::current().record("session_id", tracing::field::display(session_id));
        if let Some(exit) = self.exit_of(&row).await {
            if let Some(retry_at) = self.crashed(&row, exit).await? {
                // The dead container goes now; the restart waits for the backoff.
                self.remove_all(stale).await?;
                return Ok(Outcome::StartFailed {
                    retry_at: Some(retry_at),
                });
            }
        }
        let result = async {
            self.remove_all(stale).await?;
            let spec = parse_spec(&row)?;
            prepare_host(
                &spec,
                &self.ctx.volumes,
                &self.ctx.settings.sandbox.chats_root,
            )?;
            // Never a sandbox without its rules: a failure here is a failed start.
            self.egress.ensure_for_start(&self.runtime, &spec).await?;
            let req = StartRequest {
                chat_id,
                session_id,
                agent_id: &row.agent_id,
                spec: &spec,
                spec_hash: &row.spec_hash,
                volume_host_path: &row.volume_host_path,
                expires_at: row.expires_at,
            };
            let started = match self.pool.claim(&self.runtime, &req).await {
                ClaimOutcome::Warm(c) => {
                    // Published ports are only known to the engine.
                    let host_port = match &spec.publish_host_ip {
                        Some(_) => {
                            self.runtime
                                .published_port(&c.container_id, spec.agent_port)
                                .await?
                        }
                        None => None,
                    };
                    Started {
                        network: self.networks.network_of(&c.container_id),
                        container_id: c.container_id,
                        ip: c.ip,
                        host_port,
                        adopted: false,
                        how: "warm",
                    }
                }
                ClaimOutcome::Cold(why) => Started {
                    how: why,
                    ..self.create_and_start(&req).await?
                },
            };
            Ok::<_, ActionError>((started, spec.agent_port))
        }
        .await;
        self.record_builds(chat_id, session_id).await;
        if result.is_ok() {
            self.egress.after_start(&self.runtime).await;
        }
        match result {
            Ok((started, port)) => {
                self.observed.started(observed(
                    &row,
                    &started.container_id,
                    Found::Running,
                    Some(started.ip.clone()),
                    started.network.clone(),
                ));
                let action = if started.adopted {
                    EventAction::Adopt
                } else {
                    EventAction::Start
                };
                let recorded = self
                    .ctx
                    .store
                    .record_running(
                        chat_id,
                        session_id,
                        &RunningContainer {
                            container_id: &started.container_id,
                            ip: &started.ip,
                            port,
                            host_port: started.host_port,
                            start: Some(started.how),
                            network: started.network.as_deref(),
                        },
                        action,
                        Utc::now(),
                    )
                    .await?;
                if recorded {
                    let waited = (Utc::now() - row.created_at).to_std().unwrap_or_default();
                    let start = if started.how == "warm" {
                        "warm"
                    } else {
                        "cold"
                    };
                    self.ctx
                        .metrics
                        .time_to_running_seconds
                        .get_or_create(&crate::metrics::StartLabel { start })
                        .observe(waited.as_secs_f64());
                }
                tracing::Span::current().record("container_id", started.container_id.as_str());
                info!(%chat_id, %session_id, container_id = %started.container_id, ip = %started.ip, recorded, "sandbox running");
                Ok(Outcome::Done)
            }
            Err(e) => {
                if let ActionError::Runtime(e) = &e {
                    self.engine_unanswered(e);
                }
                let message = e.to_string();
                let attempts = self
                    .ctx
                    .store
                    .record_failure(
                        chat_id,
                        session_id,
                        EventAction::Start,
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

impl Executor {
    /// Brings the session's container to `to`: pause, stop (hibernate), unpause or start it
    /// again (resume), or only record what the engine shows. Pauses and stops first write the
    /// phase they go to, conditional on the row still wanting it (`begin_transition`); a resume
    /// that fails falls back to a cold start of the session with its mounts.
    async fn transition(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        container_id: Option<String>,
        found: Found,
        to: SandboxState,
        stale: &[String],
    ) -> Result<Outcome, ActionError> {
        let now = Utc::now();
        let Some(row) = self.ctx.store.get(chat_id).await? else {
            return Ok(Outcome::Skipped);
        };
        let policy = self.ctx.settings.sandbox.hibernation();
        if row.session_id != session_id
            || !row.is_live(now)
            || row.effective_state(&policy, now).0 != to
        {
            return Ok(Outcome::Skipped); // a call or a client moved it on since the plan
        }
        self.remove_all(stale).await?;
        let reason = if row.desired_state == to {
            "declared"
        } else {
            "idle"
        };
        // A sandbox serving a data-plane call is not idle (the call's end restarts the clock).
        if reason == "idle" && self.ctx.calls.in_flight_for(chat_id) > 0 {
            return Ok(Outcome::Skipped);
        }
        let started = std::time::Instant::now();
        match (to, container_id) {
            (SandboxState::Running, Some(id)) => {
                self.resume(&row, &id, found).await?;
                Ok(Outcome::Done)
            }
            (SandboxState::Running, None) | (SandboxState::Paused, None) => Ok(Outcome::Skipped),
            (SandboxState::Paused, Some(id)) => {
                let (id, found, row) = if found == Found::Stopped {
                    // Started again first, then frozen.
                    let id = self.resume(&row, &id, found).await?;
                    // A call may have declared it running meanwhile: then it stays running.
                    match self.ctx.store.get(chat_id).await? {
                        Some(row)
                            if row.session_id == session_id
                                && row.effective_state(&policy, Utc::now()).0 == to =>
                        {
                            (id, Found::Running, row)
                        }
                        _ => return Ok(Outcome::Done),
                    }
                } else {
                    (id, found, row)
                };
                if found == Found::Running {
                    if !self
                        .ctx
                        .store
                        .begin_transition(&row, Phase::Pausing, now)
                        .await?
                    {
                        return Ok(Outcome::Skipped);
                    }
                    let paused = self.hibernation()?.pause(&id).await;
                    if let Err(e) = paused {
                        self.transition_failed(&row, Phase::Paused, &id, &e).await;
                        return Err(e.into());
                    }
                }
                let ip = row.endpoint_ip.clone();
                self.observed
                    .started(observed(&row, &id, Found::Paused, ip, row.network.clone()));
                self.settled(&row, Phase::Paused, Some(&id), reason, started)
                    .await?;
                info!(%chat_id, %session_id, container_id = %id, reason, "sandbox paused");
                Ok(Outcome::Done)
            }
            (SandboxState::Hibernated, id) => {
                if let (Some(id), Found::Running | Found::Paused) = (&id, found) {
                    if !self
                        .ctx
                        .store
                        .begin_transition(&row, Phase::Hibernating, now)
                        .await?
                    {
                        return Ok(Outcome::Skipped);
                    }
                    let engine = self.hibernation()?;
                    let grace = std::time::Duration::from_secs(
                        self.ctx.settings.sandbox.hibernate_stop_seconds,
                    );
                    self.deaths.stopping(id, tokio::time::Instant::now(), grace);
                    let mut stopped = Ok(());
                    if found == Found::Paused {
                        stopped = engine.unpause(id).await;
                    }
                    if stopped.is_ok() {
                        stopped = engine.stop(id, grace).await;
                    }
                    if let Err(e) = stopped {
                        self.transition_failed(&row, Phase::Hibernated, id, &e)
                            .await;
                        return Err(e.into());
                    }
                    self.observed.started(observed(
                        &row,
                        id,
                        Found::Stopped,
                        None,
                        row.network.clone(),
                    ));
                }
                self.settled(&row, Phase::Hibernated, id.as_deref(), reason, started)
                    .await?;
                info!(%chat_id, %session_id, container_id = ?id, reason, "sandbox hibernated");
                Ok(Outcome::Done)
            }
        }
    }

    /// Thaws or starts the session's container again and records it running with its
    /// (possibly new) address. When the engine refuses, the container goes and the session
    /// starts cold (its failure, if that fails too, is recorded like a failed start's, so a
    /// waiting call answers 503). Returns the container that runs.
    async fn resume(
        &self,
        row: &SandboxRow,
        id: &str,
        found: Found,
    ) -> Result<String, ActionError> {
        let spec = parse_spec(row)?;
        let started = std::time::Instant::now();
        // Never a sandbox running without its rules, also when it comes back.
        self.egress.ensure_for_resume(&self.runtime, &spec).await?;
        let resumed: Result<crate::backend::Started, crate::backend::BackendError> = async {
            if found == Found::Paused {
                self.hibernation()?.unpause(id).await?;
            }
            // A thawed container keeps its address; a started one is read again.
            self.runtime
                .start_container(id, &spec.network, spec.agent_port)
                .await
        }
        .await;
        let (container_id, ip, host_port, network, how) = match resumed {
            Ok(s) => {
                // Whatever `die` the stop left is over: this container runs again.
                self.deaths.forget(id);
                (id.to_string(), s.ip, s.host_port, s.network, "resume")
            }
            Err(e) => {
                self.engine_unanswered(&e);
                warn!(chat_id = %row.chat_id, container_id = %id, error = %e, "resume failed; starting the session cold");
                self.ctx.metrics.resume_fallbacks_total.inc();
                self.resume_event(row, id, &e.to_string()).await;
                match self.cold_start(row, &spec, id).await {
                    Ok(s) => (
                        s.container_id,
                        s.ip,
                        s.host_port,
                        s.network,
                        "resume_fallback",
                    ),
                    Err(err) => {
                        let message =
                            format!("resume failed ({e}), and so did a cold start: {err}");
                        self.ctx
                            .store
                            .record_failure(
                                row.chat_id,
                                row.session_id,
                                EventAction::Resume,
                                &message,
                                |n| self.backoff.delay(n),
                                Utc::now(),
                            )
                            .await?;
                        return Err(err);
                    }
                }
            }
        };
        self.observed.started(observed(
            row,
            &container_id,
            Found::Running,
            Some(ip.clone()),
            network.clone(),
        ));
        self.egress.after_start(&self.runtime).await;
        self.ctx
            .store
            .record_running(
                row.chat_id,
                row.session_id,
                &RunningContainer {
                    container_id: &container_id,
                    ip: &ip,
                    port: spec.agent_port,
                    host_port,
                    start: Some(how),
                    network: network.as_deref(),
                },
                EventAction::Resume,
                Utc::now(),
            )
            .await?;
        self.ctx
            .metrics
            .resume_seconds
            .observe(started.elapsed().as_secs_f64());
        info!(chat_id = %row.chat_id, %container_id, %ip, how, "sandbox resumed");
        Ok(container_id)
    }

    /// The resume's fallback: the refused container goes, the session starts cold with the
    /// chat's mounts.
    async fn cold_start(
        &self,
        row: &SandboxRow,
        spec: &ContainerSpec,
        refused: &str,
    ) -> Result<Started, ActionError> {
        self.remove_all(&[refused.to_string()]).await?;
        prepare_host(
            spec,
            &self.ctx.volumes,
            &self.ctx.settings.sandbox.chats_root,
        )?;
        // A new container: its network's bridge is looked up afresh, as for any start.
        self.egress.ensure_for_start(&self.runtime, spec).await?;
        let req = StartRequest {
            chat_id: row.chat_id,
            session_id: row.session_id,
            agent_id: &row.agent_id,
            spec,
            spec_hash: &row.spec_hash,
            volume_host_path: &row.volume_host_path,
            expires_at: row.expires_at,
        };
        self.create_and_start(&req).await
    }

    /// The engine's refusal of a resume, in the event log (the fallback follows).
    async fn resume_event(&self, row: &SandboxRow, id: &str, error: &str) {
        let (chat, session) = (row.chat_id.to_string(), row.session_id.to_string());
        let detail = serde_json::json!({ "fallback": "cold start" }).to_string();
        let event = NewEvent {
            chat_id: &chat,
            session_id: Some(&session),
            container_id: Some(id),
            action: EventAction::Resume,
            outcome: EventOutcome::Error,
            error: Some(error),
            actor: None,
            detail: Some(&detail),
        };
        if let Err(e) = self.ctx.store.event(&event, Utc::now()).await {
            warn!(error = %e, "cannot record a refused resume");
        }
    }

    /// The engine's pause, unpause and stop, or why this backend has none.
    fn hibernation(
        &self,
    ) -> Result<&dyn crate::backend::Hibernation, crate::backend::BackendError> {
        self.runtime.hibernation().ok_or_else(|| {
            crate::backend::BackendError::new(
                crate::backend::ErrorKind::Unsupported,
                format!(
                    "{} cannot pause or stop a sandbox in place",
                    self.runtime.describe()
                ),
            )
        })
    }

    /// Records a pause or hibernation done: its phase, why (`declared` or `idle`) and how long
    /// the engine took.
    async fn settled(
        &self,
        row: &SandboxRow,
        phase: Phase,
        id: Option<&str>,
        reason: &str,
        started: std::time::Instant,
    ) -> Result<(), StoreError> {
        let detail = serde_json::json!({
            "reason": reason,
            "ms": started.elapsed().as_millis() as u64,
        });
        self.ctx
            .store
            .record_state(row, phase, id, None, &detail, Utc::now())
            .await?;
        Ok(())
    }

    /// A pause or stop the engine refused: in the event log; the engine's state is unknown
    /// now, so the next pass lists.
    async fn transition_failed(
        &self,
        row: &SandboxRow,
        phase: Phase,
        id: &str,
        e: &crate::backend::BackendError,
    ) {
        self.observed.invalidate();
        let message = e.to_string();
        let detail = serde_json::json!({});
        if let Err(err) = self
            .ctx
            .store
            .record_state(row, phase, Some(id), Some(&message), &detail, Utc::now())
            .await
        {
            warn!(error = %err, "cannot record a failed transition");
        }
    }
}

/// A container started (or adopted after a name conflict) for a session.
struct Started {
    container_id: String,
    ip: String,
    host_port: Option<u16>,
    /// The network it is on.
    network: Option<String>,
    /// An earlier attempt had created it (and crashed before recording it).
    adopted: bool,
    /// `warm` (a pool member claimed), or why the start went cold (`pool_empty`, …).
    how: &'static str,
}

impl Executor {
    /// Creates and starts the session's container. A taken name means an earlier attempt
    /// created it and crashed before recording it: a container of this instance for this
    /// session and spec is adopted; one of ours with stale labels is removed (the next attempt
    /// works); anyone else's is never touched. A container that fails after creation is
    /// removed before the error is returned.
    async fn create_and_start(&self, req: &StartRequest<'_>) -> Result<Started, ActionError> {
        let rt = &self.runtime;
        // A network with room: the profile's, or a further one once that is full.
        let placement = self.networks.place(rt, &req.spec.network).await?;
        let placed_spec;
        let req = if placement.network == req.spec.network {
            req.clone()
        } else {
            let mut spec = req.spec.clone();
            spec.network = placement.network.clone();
            placed_spec = spec;
            // Its rules before its first sandbox (a shard carries its base's policy).
            self.egress.ensure_for_start(rt, &placed_spec).await?;
            StartRequest {
                spec: &placed_spec,
                ..req.clone()
            }
        };
        let (id, adopted) = match rt.create_container(&req).await {
            Ok(id) => {
                placement.created(&id);
                (id, false)
            }
            Err(taken) if taken.name_taken() => {
                let name = rt.container_name(req.chat_id, req.session_id);
                let holder = rt.name_holder(&name).await?;
                let same = holder.session_id == Some(req.session_id)
                    && holder.spec_hash.as_deref() == Some(req.spec_hash);
                if !holder.ours {
                    return Err(taken.into());
                }
                if !same {
                    self.remove_all(std::slice::from_ref(&holder.container_id))
                        .await?;
                    return Err(taken.into());
                }
                (holder.container_id, true)
            }
            Err(e) => return Err(e.into()),
        };
        match rt
            .start_container(&id, &req.spec.network, req.spec.agent_port)
            .await
        {
            Ok(started) => Ok(Started {
                container_id: id,
                ip: started.ip,
                host_port: started.host_port,
                network: started.network,
                adopted,
                how: "cold",
            }),
            Err(e) => {
                if let Err(cleanup) = rt.remove(&id).await {
                    warn!(container_id = %id, error = %cleanup, "rollback of a failed start failed; the next pass removes it");
                }
                Err(e.into())
            }
        }
    }

    /// Writes image builds the start caused to the event log (their output's tail included).
    async fn record_builds(&self, chat_id: ChatId, session_id: SessionId) {
        let Some(builds) = self.runtime.builds() else {
            return;
        };
        for b in builds.take_build_reports() {
            let (chat, session) = (chat_id.to_string(), session_id.to_string());
            let detail = serde_json::json!({
                "image": b.image,
                "context": b.context,
                "duration_ms": b.duration_ms,
                "log": b.log,
            })
            .to_string();
            let event = NewEvent {
                chat_id: &chat,
                session_id: Some(&session),
                container_id: None,
                action: EventAction::ImageBuild,
                outcome: if b.error.is_some() {
                    EventOutcome::Error
                } else {
                    EventOutcome::Ok
                },
                error: b.error.as_deref(),
                actor: None,
                detail: Some(&detail),
            };
            if let Err(e) = self.ctx.store.event(&event, Utc::now()).await {
                warn!(error = %e, "cannot record an image build");
            }
        }
    }

    /// After a failed call: if the engine did not answer at all, what the loop knows of it is
    /// doubtful (it lists again) and the connection may be gone (the supervisor reconnects).
    fn engine_unanswered(&self, e: &crate::backend::BackendError) {
        if e.unavailable() {
            self.observed.invalidate();
            self.connection_failed.notify_one();
        }
    }

    /// How the session's recorded container ended, when it stopped on its own: the row says
    /// it was running and the engine says it exited (the `die` event's exit code, or an
    /// inspect). `None` when it was removed (by hand: recreated at once) or still runs (drift).
    async fn exit_of(&self, row: &SandboxRow) -> Option<Exit> {
        if row.phase != Phase::Running {
            return None;
        }
        let id = row.container_id.as_deref()?;
        let since = row.running_since?;
        let (code, finished) = match self.deaths.exit(id, tokio::time::Instant::now()) {
            Some(exit) => exit,
            None => self.runtime.exit_state(id).await.ok()??,
        };
        Some(Exit {
            code,
            ran_for: (finished - since).max(chrono::Duration::zero()),
        })
    }

    /// Counts an exit into the session's crash loop. The first exit in a row is restarted at
    /// once; each further quick exit waits the backoff for its count (returned). An exit
    /// after a run longer than the backoff cap starts a new count.
    async fn crashed(
        &self,
        row: &SandboxRow,
        exit: Exit,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let stable = chrono::Duration::from_std(self.backoff.max).unwrap_or(chrono::Duration::MAX);
        let restarts = if exit.ran_for >= stable {
            1
        } else {
            row.restarts.saturating_add(1)
        };
        let secs = exit.ran_for.num_milliseconds() as f64 / 1000.0;
        let message = format!("exited with code {} after {secs:.1} s", exit.code);
        let now = Utc::now();
        let retry_at = (restarts > 1).then(|| {
            now + chrono::Duration::from_std(self.backoff.delay(restarts - 1))
                .unwrap_or(chrono::Duration::seconds(60))
        });
        self.ctx
            .store
            .record_exit(
                row.chat_id,
                row.session_id,
                &message,
                restarts,
                retry_at,
                now,
            )
            .await?;
        let result = if retry_at.is_some() {
            "backoff"
        } else {
            "restart"
        };
        self.ctx
            .metrics
            .sandbox_exits_total
            .get_or_create(&crate::metrics::ResultLabel { result })
            .inc();
        warn!(chat_id = %row.chat_id, session_id = %row.session_id, restarts, ?retry_at, "{message}");
        Ok(retry_at)
    }
}

/// The session's container `id` as the loop's copy should now show it: running, frozen
/// (`Found::Paused`) or stopped, at `ip`.
fn observed(
    row: &SandboxRow,
    id: &str,
    found: Found,
    ip: Option<String>,
    network: Option<String>,
) -> Observed {
    Observed {
        container_id: id.to_string(),
        chat_id: Some(row.chat_id),
        session_id: Some(row.session_id),
        spec_hash: Some(row.spec_hash.clone()),
        running: found == Found::Running,
        paused: found == Found::Paused,
        ip,
        legacy: false,
        pool_slot: None,
        network,
    }
}

/// The frozen spec of a row; a row that cannot be read is reported, never guessed at.
fn parse_spec(row: &SandboxRow) -> Result<ContainerSpec, StoreError> {
    ContainerSpec::from_json(&row.spec_json).map_err(|e| StoreError::Corrupt {
        chat_id: row.chat_id.to_string(),
        message: format!("spec_json: {e}"),
    })
}

/// Makes the host side of every mount ready, checking again what was checked at request time:
/// the chat directory is created under `chats_root` (a workspace's chat directory must exist
/// already: made anywhere else it would escape its workspace's file system and quota), the
/// request volume must still pass the volume policy and resolve to the same path (no symlink
/// swapped in since), the read-only ones must exist.
fn prepare_host(
    spec: &ContainerSpec,
    volumes: &VolumePolicy,
    chats_root: &Path,
) -> Result<(), ActionError> {
    for m in &spec.mounts {
        let host_err = |reason: String| ActionError::HostDir {
            path: m.source.clone(),
            reason,
        };
        match m.kind {
            MountKind::Chat if Path::new(&m.source).starts_with(chats_root) => {
                std::fs::create_dir_all(&m.source).map_err(|e| host_err(e.to_string()))?
            }
            MountKind::Chat => {
                if !Path::new(&m.source).is_dir() {
                    return Err(host_err(
                        "the workspace chat's directory is missing (is its file system mounted?)"
                            .into(),
                    ));
                }
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
