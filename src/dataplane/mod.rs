//! The data plane: exec, files and watch on running sandboxes, beside the control loop. It
//! finds a sandbox's container in the store (never in Docker: the store is the truth about
//! what should run) and talks to the engine directly, through the backend's
//! [`crate::backend::io`] seam. The desired-state API never comes here.
//!
//! `paths.rs` (path rules), `limits.rs` (concurrency), `output.rs` (capture and encoding),
//! `ring.rs` (a process's output by offset) are pure; `tap.rs` holds a pump's pid and ring; `filewatch.rs` watches a mount with
//! inotify on the host; `exec.rs`, `files.rs` and
//! `processes.rs` (background processes) and `terminals.rs` (TTYs) run calls; `watch.rs` is the change stream.

pub mod exec;
pub mod files;
pub mod filewatch;
pub mod limits;
pub mod output;
pub mod paths;
pub mod processes;
pub mod ring;
pub mod tap;
pub mod terminals;
pub mod watch;

use std::sync::Arc;

use chrono::Utc;

use crate::backend::io::{Locate, SandboxIo};
use crate::backend::{BackendError, ErrorKind};
use crate::context::Context;
use crate::domain::spec::ContainerSpec;
use crate::domain::{ChatId, Phase, SessionId};
use crate::store::{EventAction, EventOutcome, NewEvent, StoreError};

use limits::Slot;
use paths::{Mounts, PathError};

/// Why a data-plane call failed; the HTTP edge maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("sandbox_not_found")]
    NotFound,
    #[error("process_not_found")]
    ProcessNotFound,
    #[error(
        "terminal_not_found: no open terminal with that id (closed, or its grace period ran out)"
    )]
    TerminalNotFound,
    /// A process call that its state does not allow (it ended, its stdin is closed).
    #[error("{0}")]
    ProcessConflict(String),
    #[error("sandbox_not_running: the sandbox is {0}")]
    NotRunning(String),
    /// A paused or hibernated sandbox could not be resumed for the call.
    #[error("{0}")]
    Resume(String),
    #[error("too many data-plane calls in flight ({0})")]
    Busy(String),
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("no such file or directory: {0}")]
    NoSuchPath(String),
    #[error("{path} is a directory")]
    IsDirectory { path: String },
    #[error("{path} is not a directory")]
    NotDirectory { path: String },
    #[error("{0}")]
    TooLarge(String),
    /// The engine refused a file operation (e.g. a read-only file system).
    #[error("{0}")]
    Forbidden(String),
    /// The engine refused the request as malformed.
    #[error("{0}")]
    Refused(String),
    #[error("docker engine unavailable: {0}")]
    EngineDown(String),
    /// The backend cannot reach the sandbox's engine (swarm mode: a node whose engine
    /// `swarm.nodes` does not list).
    #[error("{0}")]
    NodeNotConfigured(String),
    #[error("docker engine error: {0}")]
    Engine(String),
    /// The host refused something sandboxd needs (an inotify watch).
    #[error("{0}")]
    Host(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("unreadable sandbox spec: {0}")]
    Spec(String),
}

type Result<T, E = DataPlaneError> = std::result::Result<T, E>;

impl DataPlaneError {
    /// An engine failure as the client should see it, by its kind.
    fn engine(e: BackendError, path: Option<&str>) -> Self {
        let message = e.engine_message().unwrap_or(&e.to_string()).to_string();
        match e.kind() {
            ErrorKind::Unavailable => DataPlaneError::EngineDown(e.to_string()),
            ErrorKind::NoSuchPath => {
                DataPlaneError::NoSuchPath(path.unwrap_or_default().to_string())
            }
            ErrorKind::NotFound => {
                DataPlaneError::NotRunning("gone (its container was removed)".into())
            }
            ErrorKind::Conflict => DataPlaneError::NotRunning(format!("not running ({message})")),
            ErrorKind::Forbidden => DataPlaneError::Forbidden(message),
            ErrorKind::Refused => DataPlaneError::Refused(message),
            ErrorKind::Unsupported => DataPlaneError::NodeNotConfigured(message),
            ErrorKind::NameTaken | ErrorKind::ImageMissing | ErrorKind::Other => {
                DataPlaneError::Engine(e.to_string())
            }
        }
    }
}

/// The running container of a chat, and what its spec says about paths and users.
#[derive(Debug, Clone)]
pub struct Target {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    /// The container as the store names it (a service id in swarm mode).
    pub stored_container_id: String,
    /// The container on the engine that runs it (a swarm node's, in swarm mode).
    pub container_id: String,
    /// That engine.
    pub io: Arc<dyn SandboxIo>,
    /// The session's environment (`AGENT_ID`, the configured env): an exec gets it as the
    /// agent does, also in a warm-started container, whose own env lacks what the claim set.
    pub env: Vec<String>,
    pub mounts: Mounts,
    /// Owner for written files: the spec's user when it is numeric (`uid[:gid]`).
    pub owner: (u64, u64),
}

/// Who asked, for the audit log.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `token@address` or `anonymous@address`.
    pub actor: String,
    pub request_id: Option<String>,
}

#[derive(Clone)]
pub struct DataPlane {
    /// The store, settings, and the calls' slots (`Context::calls`, shared with the executor).
    ctx: Arc<Context>,
    engines: Arc<dyn Locate>,
    /// Background processes started in this run.
    processes: Arc<processes::Registry>,
    /// Terminals open in this run.
    terminals: Arc<terminals::Terminals>,
    /// File watches open (each is an inotify instance: the host's limits are small).
    file_watches: limits::Slots,
}

impl DataPlane {
    pub fn new(ctx: Arc<Context>) -> crate::backend::Result<Self> {
        let d = &ctx.settings.data_plane;
        Ok(Self {
            engines: crate::backend::locator(&ctx.settings, &ctx.metrics)?,
            processes: Arc::new(processes::Registry::new(
                d.max_processes,
                d.max_processes_per_sandbox,
                ctx.metrics.processes_running.clone(),
            )),
            terminals: Arc::new(terminals::Terminals::new(
                d.max_terminals,
                d.max_terminals_per_sandbox,
                ctx.metrics.terminals_open.clone(),
            )),
            file_watches: limits::Slots::new(
                d.max_file_watches,
                d.max_file_watches_per_sandbox,
                ctx.metrics.file_watches_open.clone(),
            ),
            ctx,
        })
    }

    /// The chat's running container, and a slot for one call on it. A paused or
    /// hibernated sandbox is resumed first (`resume.rs`); the call restarts its idle clock.
    async fn target(&self, chat_id: ChatId, call: &str) -> Result<(Target, Slot)> {
        // The slot first: a call in flight keeps the idle policy off the sandbox from the
        // resume on, so it cannot be paused again between running and the call.
        let slot = self.ctx.calls.try_take(chat_id).map_err(|b| {
            DataPlaneError::Busy(b.detail("max_concurrent", "max_concurrent_per_sandbox"))
        })?;
        let row = crate::resume::awake(&self.ctx, chat_id, call)
            .await
            .map_err(|e| match e {
                crate::resume::ResumeError::Store(e) => DataPlaneError::Store(e),
                e => DataPlaneError::Resume(e.to_string()),
            })?
            .ok_or(DataPlaneError::NotFound)?;
        let phase = if row.deleted_at.is_some() {
            Phase::Deleting
        } else {
            row.phase
        };
        let container_id = match (&row.container_id, phase, row.is_live(Utc::now())) {
            (Some(c), Phase::Running, true) => c.clone(),
            (_, Phase::Running, false) => return Err(DataPlaneError::NotRunning("expired".into())),
            _ => return Err(DataPlaneError::NotRunning(phase.as_str().into())),
        };
        let spec = ContainerSpec::from_json(&row.spec_json)
            .map_err(|e| DataPlaneError::Spec(e.to_string()))?;
        let (io, engine_id) = self
            .engines
            .locate(&container_id)
            .await
            .map_err(|e| DataPlaneError::engine(e, None))?;
        Ok((
            Target {
                chat_id,
                session_id: row.session_id,
                stored_container_id: container_id,
                container_id: engine_id,
                io,
                env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                mounts: Mounts::of(&spec),
                owner: numeric_owner(spec.hardening.user.as_deref()),
            },
            slot,
        ))
    }

    /// Appends an audit line; a failure to write it is logged, not returned (the call
    /// itself already happened).
    async fn audit(
        &self,
        t: &Target,
        caller: &Caller,
        action: EventAction,
        outcome: EventOutcome,
        detail: serde_json::Value,
    ) {
        let mut detail = detail;
        if let (Some(id), Some(obj)) = (&caller.request_id, detail.as_object_mut()) {
            obj.insert("request_id".into(), id.clone().into());
        }
        let (chat, session) = (t.chat_id.to_string(), t.session_id.to_string());
        let detail = detail.to_string();
        let event = NewEvent {
            chat_id: &chat,
            session_id: Some(&session),
            container_id: Some(&t.container_id),
            action,
            outcome,
            error: None,
            actor: Some(&caller.actor),
            detail: Some(&detail),
        };
        if let Err(e) = self.ctx.store.event(&event, Utc::now()).await {
            tracing::error!(error = %e, chat_id = %chat, action = action.as_str(), "cannot write the audit event");
        }
    }
}

/// `uid[:gid]` when numeric, else root (the engine's default for archive entries).
fn numeric_owner(user: Option<&str>) -> (u64, u64) {
    let Some(user) = user else { return (0, 0) };
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u.parse().ok(), Some(g.parse().ok())),
        None => (user.parse().ok(), None),
    };
    match (uid, gid) {
        (Some(u), Some(Some(g))) => (u, g),
        (Some(u), None) => (u, u),
        // A name on either side: the engine's default (root) rather than a guess.
        _ => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::numeric_owner;

    #[test]
    fn owners_come_from_numeric_users_only() {
        assert_eq!(numeric_owner(None), (0, 0));
        assert_eq!(numeric_owner(Some("1000")), (1000, 1000));
        assert_eq!(numeric_owner(Some("1000:50")), (1000, 50));
        assert_eq!(numeric_owner(Some("agent")), (0, 0));
        assert_eq!(numeric_owner(Some("1000:staff")), (0, 0));
    }
}
