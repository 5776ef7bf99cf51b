//! The seam between the controller and a container backend. The controller, its executor,
//! supervisor and takeover speak only to [`Runtime`] and the types here; the planner, the
//! store and the HTTP code know nothing of it. Today there is one backend, a Docker engine
//! (`docker/`); another (Docker Swarm services) becomes another variant.
//!
//! The policies stay above the seam: what a taken container name means (adopt or clear) is
//! the executor's, crash-loop pacing too. A backend offers primitives: list, create, start,
//! remove, inspect an exit, and an event stream.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::Stream;

use crate::config::Settings;
use crate::docker::{DockerError, DockerRuntime};
use crate::domain::spec::ContainerSpec;
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;

/// A backend's failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Docker(#[from] DockerError),
}

impl RuntimeError {
    /// The backend did not answer: the connection may be gone (the supervisor reconnects).
    pub fn unavailable(&self) -> bool {
        matches!(self, RuntimeError::Docker(e) if e.unavailable())
    }

    /// The session's container name is held by another container.
    pub fn name_taken(&self) -> bool {
        matches!(self, RuntimeError::Docker(DockerError::NameTaken { .. }))
    }
}

type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// What a start needs besides the spec.
#[derive(Debug, Clone)]
pub struct StartRequest<'a> {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub agent_id: &'a str,
    pub spec: &'a ContainerSpec,
    pub spec_hash: &'a str,
    /// For the old service's labels only.
    pub volume_host_path: &'a str,
    /// For the old service's labels only (the expiry at creation).
    pub expires_at: DateTime<Utc>,
}

/// The container holding a name, as its labels describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameHolder {
    pub container_id: String,
    /// Labelled for this instance (`sandboxd.managed` and `sandboxd.instance`).
    pub ours: bool,
    pub session_id: Option<SessionId>,
    pub spec_hash: Option<String>,
}

/// A container event of this instance.
#[derive(Debug, Clone)]
pub struct EngineEvent {
    /// Unix seconds.
    pub at: i64,
    /// `die`, `destroy`, …
    pub action: String,
    pub container_id: String,
    /// The process's exit code, on `die`.
    pub exit_code: Option<i64>,
}

/// A container the old Python service started (its six labels, no sandboxd labels).
#[derive(Debug, Clone)]
pub struct LegacyContainer {
    pub container_id: String,
    pub session: crate::docker::labels::LegacySession,
    pub running: bool,
    /// The network it joined and its address there.
    pub network: Option<String>,
    pub ip: Option<String>,
    /// When Docker created it.
    pub created_at: Option<DateTime<Utc>>,
}

/// The container backend.
#[derive(Clone)]
pub enum Runtime {
    Docker(DockerRuntime),
}

impl Runtime {
    /// Connects as the settings say, and makes sure the sandbox network exists.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self> {
        let rt = DockerRuntime::connect(
            &settings.docker,
            &settings.controller.instance,
            &settings.sandbox.network_name,
            metrics,
        )
        .await?;
        rt.ensure_network().await?;
        Ok(Runtime::Docker(rt))
    }

    /// Every container of this instance, in any state.
    pub async fn list(&self) -> Result<Vec<Observed>> {
        match self {
            Runtime::Docker(d) => Ok(d.list_managed().await?),
        }
    }

    /// The old service's containers among `ids`, as the planner sees them.
    pub async fn observe_legacy(&self, ids: &[String]) -> Result<Vec<Observed>> {
        match self {
            Runtime::Docker(d) => Ok(d.observe_legacy(ids).await?),
        }
    }

    /// Every container the old Python service started.
    pub async fn list_legacy(&self) -> Result<Vec<LegacyContainer>> {
        match self {
            Runtime::Docker(d) => Ok(d.list_legacy().await?),
        }
    }

    /// The session's deterministic container name.
    pub fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        match self {
            Runtime::Docker(d) => d.container_name(chat_id, session_id),
        }
    }

    /// Creates the session's container; a taken name is an error with `name_taken()`.
    pub async fn create_container(&self, req: &StartRequest<'_>) -> Result<String> {
        match self {
            Runtime::Docker(d) => Ok(d.create_container(req).await?),
        }
    }

    /// Who holds a container name.
    pub async fn name_holder(&self, name: &str) -> Result<NameHolder> {
        match self {
            Runtime::Docker(d) => Ok(d.name_holder(name).await?),
        }
    }

    /// Starts a created container; its address on `network`, and the host port `port` is
    /// published on (when the spec publishes it).
    pub async fn start_container(
        &self,
        id: &str,
        network: &str,
        port: u16,
    ) -> Result<(String, Option<u16>)> {
        match self {
            Runtime::Docker(d) => Ok(d.start_container(id, network, port).await?),
        }
    }

    /// Creates a sandbox network (a bridge) unless it exists.
    pub async fn ensure_network_named(&self, network: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => Ok(d.ensure_named_network(network).await?),
        }
    }

    /// The host interface of a sandbox network (egress rules match on it).
    pub async fn bridge_of(&self, network: &str) -> Result<String> {
        match self {
            Runtime::Docker(d) => Ok(d.bridge_of(network).await?),
        }
    }

    /// The container runtimes the backend offers (`runc`, `runsc`, …).
    pub async fn runtimes(&self) -> Result<Vec<String>> {
        match self {
            Runtime::Docker(d) => Ok(d.runtimes().await?),
        }
    }

    /// The host port a running container publishes `port` on, if any (for adoption).
    pub async fn published_port(&self, id: &str, port: u16) -> Result<Option<u16>> {
        match self {
            Runtime::Docker(d) => Ok(d.published_port(id, port).await?),
        }
    }

    /// Removes a container; one already gone counts as removed.
    pub async fn remove(&self, id: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => Ok(d.remove(id).await?),
        }
    }

    /// How a container ended (exit code, when), `None` while it runs or when it is gone.
    pub async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>> {
        match self {
            Runtime::Docker(d) => Ok(d.exit_state(id).await?),
        }
    }

    /// Image builds done since the last call (`docker.pull_policy: build`), for the event log.
    pub fn take_build_reports(&self) -> Vec<crate::docker::BuildReport> {
        match self {
            Runtime::Docker(d) => d.take_build_reports(),
        }
    }

    /// Names of images that appeared on the engine (an accelerator for missing-image retries).
    pub fn image_events(&self) -> impl Stream<Item = Result<String>> + Send + 'static {
        use futures::StreamExt;
        match self {
            Runtime::Docker(d) => d.image_events().map(|r| r.map_err(RuntimeError::from)),
        }
    }

    /// Changes sandboxd does not make itself, as wake-ups; ends on error (the caller
    /// reconnects). `since` (unix seconds) replays a gap.
    pub fn events(
        &self,
        since: Option<i64>,
    ) -> impl Stream<Item = Result<EngineEvent>> + Send + 'static {
        use futures::StreamExt;
        match self {
            Runtime::Docker(d) => d.events(since).map(|r| r.map_err(RuntimeError::from)),
        }
    }
}
