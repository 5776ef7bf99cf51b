//! The seam between the controller and a container backend. The controller, its executor,
//! supervisor and takeover speak only to [`Runtime`] and the types here; the planner, the
//! store and the HTTP code know nothing of it. Two backends: one Docker engine (`docker/`),
//! and Docker Swarm services through a manager (`swarm/`), where a service stands in for a
//! container (its id is the "container id") and its task's overlay address is the endpoint.
//!
//! The policies stay above the seam: what a taken container name means (adopt or clear) is
//! the executor's, crash-loop pacing too. A backend offers primitives: list, create, start,
//! remove, inspect an exit, and an event stream.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::Stream;

use crate::config::{RuntimeKind, Settings};
use crate::docker::{DockerError, DockerRuntime};
use crate::domain::spec::ContainerSpec;
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;
use crate::swarm::{SwarmError, SwarmRuntime};

/// A backend's failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Swarm(#[from] SwarmError),
}

impl RuntimeError {
    /// The backend did not answer: the connection may be gone (the supervisor reconnects).
    pub fn unavailable(&self) -> bool {
        match self {
            RuntimeError::Docker(e) => e.unavailable(),
            RuntimeError::Swarm(e) => e.unavailable(),
        }
    }

    /// The session's container (or service) name is held by another.
    pub fn name_taken(&self) -> bool {
        matches!(
            self,
            RuntimeError::Docker(DockerError::NameTaken { .. })
                | RuntimeError::Swarm(SwarmError::NameTaken { .. })
        )
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
    Swarm(SwarmRuntime),
}

impl Runtime {
    /// Connects as the settings say, and makes sure the sandbox network exists.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self> {
        match settings.runtime {
            RuntimeKind::Docker => {
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
            RuntimeKind::Swarm => {
                let rt = SwarmRuntime::connect(settings, metrics).await?;
                rt.ensure_network().await?;
                Ok(Runtime::Swarm(rt))
            }
        }
    }

    /// The backend's name, for logs.
    pub fn describe(&self) -> &'static str {
        match self {
            Runtime::Docker(_) => "the Docker engine",
            Runtime::Swarm(_) => "the Docker Swarm manager",
        }
    }

    /// Whether sandboxd keeps egress rules on this host for the backend's sandboxes (only
    /// the docker backend's run here).
    pub fn keeps_host_rules(&self) -> bool {
        matches!(self, Runtime::Docker(_))
    }

    /// Every container (service) of this instance, in any state.
    pub async fn list(&self) -> Result<Vec<Observed>> {
        match self {
            Runtime::Docker(d) => Ok(d.list_managed().await?),
            Runtime::Swarm(s) => Ok(s.list_managed().await?),
        }
    }

    /// The old service's containers among `ids`, as the planner sees them.
    pub async fn observe_legacy(&self, ids: &[String]) -> Result<Vec<Observed>> {
        match self {
            Runtime::Docker(d) => Ok(d.observe_legacy(ids).await?),
            // The old service ran on one engine; a swarm has none of its containers.
            Runtime::Swarm(_) => Ok(Vec::new()),
        }
    }

    /// Every container the old Python service started.
    pub async fn list_legacy(&self) -> Result<Vec<LegacyContainer>> {
        match self {
            Runtime::Docker(d) => Ok(d.list_legacy().await?),
            Runtime::Swarm(_) => Ok(Vec::new()),
        }
    }

    /// The session's deterministic container (service) name.
    pub fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        match self {
            Runtime::Docker(d) => d.container_name(chat_id, session_id),
            Runtime::Swarm(s) => s.container_name(chat_id, session_id),
        }
    }

    /// Creates the session's container (a service, whose task Swarm starts at once); a
    /// taken name is an error with `name_taken()`.
    pub async fn create_container(&self, req: &StartRequest<'_>) -> Result<String> {
        match self {
            Runtime::Docker(d) => Ok(d.create_container(req).await?),
            Runtime::Swarm(s) => Ok(s.create_service(req).await?),
        }
    }

    /// Who holds a container (service) name.
    pub async fn name_holder(&self, name: &str) -> Result<NameHolder> {
        match self {
            Runtime::Docker(d) => Ok(d.name_holder(name).await?),
            Runtime::Swarm(s) => Ok(s.name_holder(name).await?),
        }
    }

    /// Starts a created container (waits for a service's task to run); its address on
    /// `network`, and the host port `port` is published on (when the spec publishes it).
    pub async fn start_container(
        &self,
        id: &str,
        network: &str,
        port: u16,
    ) -> Result<(String, Option<u16>)> {
        match self {
            Runtime::Docker(d) => Ok(d.start_container(id, network, port).await?),
            Runtime::Swarm(s) => Ok((s.wait_running(id, network).await?, None)),
        }
    }

    /// Creates a sandbox network (a bridge) unless it exists.
    pub async fn ensure_network_named(&self, network: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => Ok(d.ensure_named_network(network).await?),
            Runtime::Swarm(s) => Ok(s
                .ensure_overlay(network, crate::swarm::placement::NetworkKind::Open)
                .await?),
        }
    }

    /// The host interface of a sandbox network (egress rules match on it).
    pub async fn bridge_of(&self, network: &str) -> Result<String> {
        match self {
            Runtime::Docker(d) => Ok(d.bridge_of(network).await?),
            Runtime::Swarm(_) => Err(SwarmError::Config(format!(
                "network `{network}` is an overlay: sandboxd keeps no host rules in swarm mode"
            ))
            .into()),
        }
    }

    /// What would keep the configured profiles' sandboxes from starting (readiness names
    /// them): a runtime the engine does not offer; in swarm mode, what no node gives.
    pub async fn profile_problems(&self, settings: &Settings) -> Result<Vec<String>> {
        match self {
            Runtime::Docker(d) => {
                let offered = d.runtimes().await?;
                Ok(settings
                    .sandbox
                    .profiles
                    .iter()
                    .filter(|(_, profile)| !offered.contains(&profile.runtime))
                    .map(|(name, profile)| {
                        format!(
                            "profile {name}: runtime `{}` is not registered with the engine (it \
                             offers {})",
                            profile.runtime,
                            offered.join(", ")
                        )
                    })
                    .collect())
            }
            Runtime::Swarm(s) => Ok(s.profile_problems(settings).await),
        }
    }

    /// The host port a running container publishes `port` on, if any (for adoption).
    pub async fn published_port(&self, id: &str, port: u16) -> Result<Option<u16>> {
        match self {
            Runtime::Docker(d) => Ok(d.published_port(id, port).await?),
            // Config validation refuses published ports in swarm mode.
            Runtime::Swarm(_) => Ok(None),
        }
    }

    /// Removes a container (service); one already gone counts as removed.
    pub async fn remove(&self, id: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => Ok(d.remove(id).await?),
            Runtime::Swarm(s) => Ok(s.remove(id).await?),
        }
    }

    /// How a container ended (exit code, when), `None` while it runs or when it is gone.
    pub async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>> {
        match self {
            Runtime::Docker(d) => Ok(d.exit_state(id).await?),
            Runtime::Swarm(s) => Ok(s.exit_state(id).await?),
        }
    }

    /// Image builds done since the last call (`docker.pull_policy: build`), for the event log.
    pub fn take_build_reports(&self) -> Vec<crate::docker::BuildReport> {
        match self {
            Runtime::Docker(d) => d.take_build_reports(),
            Runtime::Swarm(_) => Vec::new(),
        }
    }

    /// Names of images that appeared on the engine (an accelerator for missing-image retries).
    pub fn image_events(
        &self,
    ) -> std::pin::Pin<Box<dyn Stream<Item = Result<String>> + Send + 'static>> {
        use futures::StreamExt;
        match self {
            Runtime::Docker(d) => d
                .image_events()
                .map(|r| r.map_err(RuntimeError::from))
                .boxed(),
            // Images are each node's; nothing here says when one appears everywhere.
            Runtime::Swarm(_) => futures::stream::pending().boxed(),
        }
    }

    /// Changes sandboxd does not make itself, as wake-ups; ends on error (the caller
    /// reconnects). `since` (unix seconds) replays a gap.
    pub fn events(
        &self,
        since: Option<i64>,
    ) -> std::pin::Pin<Box<dyn Stream<Item = Result<EngineEvent>> + Send + 'static>> {
        use futures::StreamExt;
        match self {
            Runtime::Docker(d) => d
                .events(since)
                .map(|r| r.map_err(RuntimeError::from))
                .boxed(),
            Runtime::Swarm(s) => s
                .events(since)
                .map(|r| r.map_err(RuntimeError::from))
                .boxed(),
        }
    }
}
