//! The seam between sandboxd and a container engine. The controller, its executor,
//! supervisor, takeover and warm pool speak only to [`Backend`]; the data plane only to
//! [`io::SandboxIo`] through [`io::Locate`]. The planner, the store and the HTTP code know
//! nothing of either. Three engines enter through it:
//! - `docker/`: one Docker engine (bollard);
//! - `podman/`: Podman's Docker-compatible API, the docker backend with Podman's differences;
//! - `swarm/`: Docker Swarm services through a manager, where a service stands in for a
//!   container (its id is the "container id") and its task's overlay address is the endpoint;
//!
//! and `fake.rs`, an in-memory engine with injectable faults for the controller's unit tests.
//! Under them: `engine.rs` (connect, metered calls, networks), `error.rs` (one error, typed
//! kinds), `hardening.rs` (the one translation of a session's hardening), `labels.rs`.
//!
//! The policies stay above the seam: what a taken container name means (adopt or clear) is
//! the executor's, crash-loop pacing too. A backend offers primitives: list, create, start,
//! remove, inspect an exit, and an event stream; what only some engines can do is declared
//! as an optional capability ([`Backend::host_rules`], [`Backend::legacy`],
//! [`Backend::images`], [`Backend::warm`]), never matched on by name.

pub mod docker;
pub mod engine;
pub mod error;
pub mod fake;
pub mod hardening;
pub mod io;
pub mod labels;
pub mod podman;
pub mod raw;
pub mod swarm;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::config::{RuntimeKind, Settings};
use crate::domain::spec::ContainerSpec;
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;

pub use error::{BackendError, ErrorKind, Result};

/// The backend the controller holds: one per connection, shared by its tasks.
pub type SharedBackend = Arc<dyn Backend>;

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

/// A started container: its address on the spec's network, and the host port its agent
/// port is published on (when the spec publishes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub ip: String,
    pub host_port: Option<u16>,
    /// The network the address is on (`None` where the engine places: swarm).
    pub network: Option<String>,
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
    pub session: labels::LegacySession,
    pub running: bool,
    /// Frozen by the engine's pause.
    pub paused: bool,
    /// The network it joined and its address there.
    pub network: Option<String>,
    pub ip: Option<String>,
    /// When Docker created it.
    pub created_at: Option<DateTime<Utc>>,
}

/// A container engine, as the controller uses it.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// The backend's name, for logs and readiness ("the Docker engine").
    fn describe(&self) -> &'static str;

    /// Every container (service) of this instance, in any state.
    async fn list(&self) -> Result<Vec<Observed>>;

    /// This instance's warm-pool members (`sandboxd.pool_slot`), in any state: the pool looks
    /// at them after every claim, so engines filter by the label instead of listing all.
    async fn list_members(&self) -> Result<Vec<Observed>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|o| o.pool_slot.is_some())
            .collect())
    }

    /// The session's deterministic container (service) name: a start retried after a crash
    /// collides with what the first attempt made.
    fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String;

    /// Creates the session's container (a service, whose task Swarm starts at once); a
    /// taken name is an error of kind `NameTaken`.
    async fn create_container(&self, req: &StartRequest<'_>) -> Result<String>;

    /// Who holds a container (service) name.
    async fn name_holder(&self, name: &str) -> Result<NameHolder>;

    /// Starts a created container (waits for a service's task to run) and reads where it
    /// serves.
    async fn start_container(&self, id: &str, network: &str, port: u16) -> Result<Started>;

    /// Creates a sandbox network unless it exists.
    async fn ensure_network_named(&self, network: &str) -> Result<()>;

    /// Removes a container (service); one already gone counts as removed.
    async fn remove(&self, id: &str) -> Result<()>;

    /// How a container ended (exit code, when), `None` while it runs or when it is gone.
    async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>>;

    /// What would keep the configured profiles' sandboxes from starting (readiness names
    /// them): a runtime the engine does not offer; in swarm mode, what no node gives.
    async fn profile_problems(&self, settings: &Settings) -> Result<Vec<String>>;

    /// The host port a running container publishes `port` on, if any (for adoption).
    async fn published_port(&self, _id: &str, _port: u16) -> Result<Option<u16>> {
        Ok(None)
    }

    /// Changes sandboxd does not make itself, as wake-ups; ends on error (the caller
    /// reconnects). `since` (unix seconds) replays a gap.
    fn events(&self, since: Option<i64>) -> BoxStream<'static, Result<EngineEvent>>;

    /// Sandboxes on host bridges whose egress sandboxd keeps in the host's firewall.
    fn host_rules(&self) -> Option<&dyn HostRules> {
        None
    }

    /// Containers the old Python service started on this engine, to take over.
    fn legacy(&self) -> Option<&dyn LegacyTakeover> {
        None
    }

    /// Image events: an accelerator for missing-image retries.
    fn images(&self) -> Option<&dyn ImageWatch> {
        None
    }

    /// Reports of the image builds its starts made (`docker.pull_policy: build`), for the
    /// event log.
    fn builds(&self) -> Option<&dyn ImageBuilds> {
        None
    }

    /// Warm starts: pool members made and bound through host mount propagation.
    fn warm(&self) -> Option<&dyn WarmStarts> {
        None
    }

    /// Pause, unpause and stop in place: hibernation (`docs/hibernation.md`). A stopped
    /// container is started again with [`Backend::start_container`].
    fn hibernation(&self) -> Option<&dyn Hibernation> {
        None
    }

    /// Further sandbox networks when one is full (`controller/networks.rs`); engines that
    /// place containers themselves (swarm's overlays) offer none.
    fn networks(&self) -> Option<&dyn ShardedNetworks> {
        None
    }
}

/// The networks sandboxd adds beside a full one: made with its settings, labelled
/// `sandboxd.shard_of` and `sandboxd.instance`, and removed when unused.
#[async_trait::async_trait]
pub trait ShardedNetworks: Send + Sync {
    /// Makes `name` with `base`'s settings (driver, options, internal, IPv6; a subnet of its
    /// own), labelled as this instance's shard of `base`, unless it exists.
    async fn ensure_shard(&self, base: &str, name: &str) -> Result<()>;

    /// The addresses `network`'s IPv4 subnets give containers: `None` when there is no such
    /// network, `Some(None)` when its subnets do not bound it.
    async fn address_room(&self, network: &str) -> Result<Option<Option<u32>>>;

    /// This instance's shard networks, as (name, base).
    async fn shards(&self) -> Result<Vec<(String, String)>>;

    /// Removes the shard unless a container (of any instance, in any state) is on it;
    /// whether it was removed.
    async fn remove_if_unused(&self, name: &str) -> Result<bool>;
}

/// Freezing and stopping a sandbox's container in place, keeping it (id, name, writable
/// layer, mounts) for a resume.
#[async_trait::async_trait]
pub trait Hibernation: Send + Sync {
    /// Freezes every process (the cgroup freezer).
    async fn pause(&self, id: &str) -> Result<()>;

    /// Thaws a paused container.
    async fn unpause(&self, id: &str) -> Result<()>;

    /// Stops the container (SIGTERM, SIGKILL after `grace`), keeping it; one already
    /// stopped counts as stopped.
    async fn stop(&self, id: &str, grace: std::time::Duration) -> Result<()>;
}

/// Host egress rules: the backend's sandboxes sit on host bridges.
#[async_trait::async_trait]
pub trait HostRules: Send + Sync {
    /// The host interface of a sandbox network (egress rules match on it).
    async fn bridge_of(&self, network: &str) -> Result<String>;

    /// The IPv4 chain of `FORWARD` traffic whose first rule jumps to sandboxd's rules:
    /// dockerd's `DOCKER-USER` (its own rules come after it).
    fn forward_hook(&self) -> &'static str {
        "DOCKER-USER"
    }

    /// The engine may put its own rules above sandboxd's jump when it starts a container
    /// (netavark does, on a network's first start): the rules are read back after each
    /// start, not only every resync.
    fn reorders_on_start(&self) -> bool {
        false
    }
}

/// Takeover of the old service's containers.
#[async_trait::async_trait]
pub trait LegacyTakeover: Send + Sync {
    /// Every container the old Python service started.
    async fn list_legacy(&self) -> Result<Vec<LegacyContainer>>;

    /// The old service's containers among `ids`, as the planner sees them.
    async fn observe_legacy(&self, ids: &[String]) -> Result<Vec<Observed>>;
}

/// Images as the engine sees them.
pub trait ImageWatch: Send + Sync {
    /// Names of images that appeared on the engine; ends on error (the caller reconnects).
    fn image_events(&self) -> BoxStream<'static, Result<String>>;
}

/// Image builds made by starts.
pub trait ImageBuilds: Send + Sync {
    /// Image builds done since the last call (`docker.pull_policy: build`).
    fn take_build_reports(&self) -> Vec<docker::BuildReport>;
}

/// A warm pool member's container: the class spec, with the slot's directories where the
/// chat's will be bound, and the wrapper that waits for a claim.
#[derive(Debug, Clone)]
pub struct MemberRequest<'a> {
    pub name: &'a str,
    pub spec: &'a ContainerSpec,
    /// The member's labels (instance, pool slot and class; no session).
    pub labels: std::collections::HashMap<String, String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Bind sources mounted with `rslave` propagation: a claim's mounts under them appear
    /// inside the running member.
    pub propagated: Vec<String>,
    /// A read-only bind of the claim directory: (host source, container target).
    pub claim_dir: (String, String),
}

/// Warm starts.
#[async_trait::async_trait]
pub trait WarmStarts: Send + Sync {
    /// The instance whose labels the members carry.
    fn instance(&self) -> &str;

    /// The image's own entrypoint and command (a member runs them after its claim).
    async fn image_command(&self, image: &str) -> Result<(Vec<String>, Vec<String>)>;

    /// Creates a member's container (not started).
    async fn create_member(&self, req: &MemberRequest<'_>) -> Result<String>;
}

/// How the controller's supervisor gets a backend: at start and again after a failed call.
/// The settings' engine in production ([`FromSettings`]); the fake in unit tests.
#[async_trait::async_trait]
pub trait Connect: Send + Sync {
    async fn connect(&self) -> Result<SharedBackend>;
}

/// Connects as the settings say ([`connect`]).
pub struct FromSettings {
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl Connect for FromSettings {
    async fn connect(&self) -> Result<SharedBackend> {
        connect(&self.settings, self.metrics.clone()).await
    }
}

/// Connects to the engine the settings name, and makes sure the sandbox network exists.
/// The one place that knows the backends by name.
pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<SharedBackend> {
    Ok(match settings.runtime {
        RuntimeKind::Docker => Arc::new(docker::DockerRuntime::connect(settings, metrics).await?),
        RuntimeKind::Podman => Arc::new(podman::PodmanRuntime::connect(settings, metrics).await?),
        RuntimeKind::Swarm => Arc::new(swarm::SwarmRuntime::connect(settings, metrics).await?),
    })
}

/// How the data plane finds the engine of a sandbox, for the settings' backend. It holds
/// connections of its own, made on first use.
pub fn locator(settings: &Arc<Settings>, metrics: &Arc<Metrics>) -> Result<Arc<dyn io::Locate>> {
    let timeout = std::time::Duration::from_secs(settings.docker.timeout_seconds);
    let local = || {
        docker::io::EngineIo::at(engine::EngineAddress::plain(
            &settings.docker.base_url,
            timeout,
        ))
    };
    Ok(match settings.runtime {
        RuntimeKind::Docker => Arc::new(io::OneEngine(Arc::new(local()))),
        RuntimeKind::Podman => {
            let raw = raw::RawApi::new(&settings.docker.base_url, timeout)?;
            Arc::new(io::OneEngine(Arc::new(podman::io::PodmanIo::new(
                local(),
                Arc::new(raw),
            ))))
        }
        RuntimeKind::Swarm => Arc::new(swarm::nodes::SwarmNodes::new(
            settings.clone(),
            metrics.clone(),
        )),
    })
}
