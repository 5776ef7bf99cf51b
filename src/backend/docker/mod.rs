//! Docker adapter (bollard): one narrow type, one method per operation we need. bollard types
//! stay inside `backend/`; the rest of sandboxd sees it through the [`Backend`] seam, with
//! every optional capability: host egress rules, takeover of the old service, image events
//! and builds, warm starts.
//!
//! Every step is idempotent: a 404 on remove is success, a 304 on start means it already runs.
//! A name conflict on create is reported (`NameTaken`); the executor decides what it means.

mod build;
pub mod io;

pub use build::BuildReport;

mod shards;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HostConfig, Mount,
    MountBindOptions, MountBindOptionsPropagationEnum, MountType, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    InspectContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use chrono::{DateTime, Utc};

use super::engine::{bind_mounts, Engine, EngineAddress};
use super::error::{status_of, BackendError, ErrorKind, Result};
use super::hardening::Translated;
use super::{
    labels, Backend, EngineEvent, HostRules, ImageBuilds, ImageWatch, LegacyContainer,
    LegacyTakeover, MemberRequest, NameHolder, StartRequest, Started, WarmStarts,
};
use crate::config::{PullPolicy, Settings};
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;

/// The host port the engine bound for the container's `port`/tcp (published at an ephemeral
/// port, so only the inspect knows it).
fn host_port(settings: Option<&bollard::models::NetworkSettings>, port: u16) -> Option<u16> {
    settings?
        .ports
        .as_ref()?
        .get(&format!("{port}/tcp"))?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

/// The container's address on the network it was created on (its `NetworkMode`, which
/// sandboxd sets to the spec's network), else on `fallback`: a sandbox keeps its endpoint when
/// `sandbox.network_name` changes after it was created.
pub(crate) fn own_address(
    networks: Option<HashMap<String, EndpointSettings>>,
    network_mode: Option<&str>,
    fallback: &str,
) -> (Option<String>, Option<String>) {
    let mut networks = networks.unwrap_or_default();
    // Podman reports every container's mode as `bridge` (and none in a list): a container
    // on one network is on that one.
    let only = (networks.len() == 1)
        .then(|| networks.keys().next().cloned())
        .flatten();
    let name = network_mode
        .filter(|m| networks.contains_key(*m))
        .map(str::to_string)
        .or_else(|| {
            networks
                .contains_key(fallback)
                .then(|| fallback.to_string())
        })
        .or(only)
        .unwrap_or_else(|| fallback.to_string());
    // A stopped container keeps its endpoint (without an address): it is still on it.
    let endpoint = networks.remove(&name);
    let on = endpoint.is_some().then_some(name);
    let ip = endpoint
        .and_then(|e| e.ip_address)
        .filter(|ip| !ip.is_empty());
    (on, ip)
}

/// The error of a create whose name another container holds.
fn name_taken(name: &str) -> BackendError {
    BackendError::new(
        ErrorKind::NameTaken,
        format!("the container name {name} is taken"),
    )
}

/// What a backend on the Docker API may change in the container body: Podman's
/// compatible API takes the same body with these differences (`backend/podman/`).
#[derive(Debug, Clone, Default)]
pub struct BodyOptions {
    /// Resource limits set explicitly on every container (`nofile`, `nproc`), as
    /// (name, soft = hard).
    pub ulimits: Vec<(String, i64)>,
    /// With a read-only root: directories the engine would make writable on its own,
    /// mounted as empty read-only tmpfs instead.
    pub read_only_tmpfs: Vec<String>,
}

#[derive(Clone)]
pub struct DockerRuntime {
    engine: Engine,
    network: String,
    pull_policy: PullPolicy,
    /// With `pull_policy: build`: the Dockerfile's directory, and the one-build-at-a-time gate.
    build_context: Option<std::path::PathBuf>,
    builds: Arc<build::BuildGate>,
    body: BodyOptions,
    describe: &'static str,
}

impl DockerRuntime {
    /// Connects to `docker.base_url` (API version negotiated, pinged) and makes sure the
    /// sandbox network exists.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self> {
        let rt = Self::connect_with(
            settings,
            metrics,
            BodyOptions::default(),
            "the Docker engine",
        )
        .await?;
        rt.ensure_bridge(&settings.sandbox.network_name).await?;
        Ok(rt)
    }

    /// Connects to an engine that speaks the Docker API, with its body differences; the
    /// sandbox network is the caller's.
    pub async fn connect_with(
        settings: &Settings,
        metrics: Arc<Metrics>,
        body: BodyOptions,
        describe: &'static str,
    ) -> Result<Self> {
        let address = EngineAddress::plain(
            &settings.docker.base_url,
            Duration::from_secs(settings.docker.timeout_seconds),
        );
        let engine = Engine::connect(&address, &settings.controller.instance, metrics).await?;
        Ok(Self {
            engine,
            network: settings.sandbox.network_name.clone(),
            pull_policy: settings.docker.pull_policy,
            build_context: settings.docker.build_context.clone(),
            builds: Arc::default(),
            body,
            describe,
        })
    }

    /// The engine core (client, metrics, instance).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The configured sandbox network (where a container's address is looked up when its
    /// own network is not told).
    pub fn network(&self) -> &str {
        &self.network
    }

    /// Runs one Docker call, metered.
    async fn call<T>(
        &self,
        operation: &'static str,
        benign: &[u16],
        fut: impl std::future::Future<Output = Result<T, BollardError>>,
    ) -> Result<T, BollardError> {
        self.engine.call(operation, benign, fut).await
    }

    /// Creates a bridge network unless it exists.
    async fn ensure_bridge(&self, network: &str) -> Result<()> {
        if self.engine.network(network, None).await?.is_some() {
            return Ok(());
        }
        self.engine
            .create_network(NetworkCreateRequest {
                name: network.to_string(),
                driver: Some("bridge".into()),
                ..Default::default()
            })
            .await
    }

    /// The runtimes the engine offers (`docker info`).
    pub async fn runtimes(&self) -> Result<Vec<String>> {
        let info = self
            .call("info", &[], self.engine.docker.info())
            .await
            .map_err(BackendError::from_engine("info"))?;
        Ok(info.runtimes.unwrap_or_default().into_keys().collect())
    }

    /// Every container (running or not) labelled for this instance.
    pub async fn list_managed(&self) -> Result<Vec<Observed>> {
        self.list_labelled(&[]).await
    }

    /// Containers labelled for this instance and carrying every label key in `keys`.
    async fn list_labelled(&self, keys: &[&str]) -> Result<Vec<Observed>> {
        let mut wanted = labels::instance_filter(&self.engine.instance);
        wanted.extend(keys.iter().map(|k| k.to_string()));
        let filters = HashMap::from([("label", wanted)]);
        Ok(self
            .list_matching(filters)
            .await?
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let parsed = labels::parse(&c.labels.unwrap_or_default());
                let mode = c.host_config.and_then(|h| h.network_mode);
                let networks = c.network_settings.and_then(|n| n.networks);
                let (network, ip) = own_address(networks, mode.as_deref(), &self.network);
                Some(Observed {
                    container_id: id,
                    chat_id: parsed.chat_id,
                    session_id: parsed.session_id,
                    spec_hash: parsed.spec_hash,
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                    paused: c.state == Some(ContainerSummaryStateEnum::PAUSED),
                    ip,
                    legacy: false,
                    pool_slot: parsed.pool_slot,
                    network,
                })
            })
            .collect())
    }

    /// Containers in any state matching `filters`.
    async fn list_matching(
        &self,
        filters: HashMap<&str, Vec<String>>,
    ) -> Result<Vec<bollard::models::ContainerSummary>> {
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        self.call(
            "list",
            &[],
            self.engine.docker.list_containers(Some(options)),
        )
        .await
        .map_err(BackendError::from_engine("list_containers"))
    }

    async fn list_legacy_matching(
        &self,
        filters: HashMap<&str, Vec<String>>,
    ) -> Result<Vec<LegacyContainer>> {
        Ok(self
            .list_matching(filters)
            .await?
            .into_iter()
            .filter_map(|c| {
                let session = labels::parse_legacy(c.labels.as_ref()?)?;
                let mode = c.host_config.and_then(|h| h.network_mode);
                let networks = c.network_settings.and_then(|n| n.networks);
                let (network, ip) = own_address(networks, mode.as_deref(), &self.network);
                Some(LegacyContainer {
                    container_id: c.id?,
                    session,
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                    paused: c.state == Some(ContainerSummaryStateEnum::PAUSED),
                    network,
                    ip,
                    created_at: c.created.and_then(|t| DateTime::from_timestamp(t, 0)),
                })
            })
            .collect())
    }

    /// Creates a container from a body as given; a missing image or network is an error
    /// here, not repaired (`create` does that).
    pub async fn create_named(&self, name: &str, body: ContainerCreateBody) -> Result<String> {
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        self.call(
            "create",
            &[],
            self.engine.docker.create_container(Some(options), body),
        )
        .await
        .map(|r| r.id)
        .map_err(BackendError::from_engine("create_container"))
    }

    /// Creates the session's container under `name`, repairing a missing network or image
    /// (as the pull policy says) once.
    async fn create(&self, name: &str, req: &StartRequest<'_>) -> Result<String> {
        let body = self.create_body(req);
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let first = self
            .call(
                "create",
                &[],
                self.engine
                    .docker
                    .create_container(Some(options.clone()), body.clone()),
            )
            .await;
        // What a failed create means is read from the engine's state, never from its message:
        // dockerd answers 409 for a taken name and 404 for a missing network or image; Podman
        // answers 500 for a taken name and a missing network, 404 for a missing image.
        match first {
            Ok(r) => return Ok(r.id),
            Err(e) if status_of(&e) == Some(409) => return Err(name_taken(name)),
            Err(e) => {
                if self
                    .engine
                    .network(&req.spec.network, None)
                    .await?
                    .is_none()
                {
                    // Removed under us (e.g. `docker network prune`): recreate it.
                    self.ensure_bridge(&req.spec.network).await?;
                } else if status_of(&e) == Some(404) {
                    match self.pull_policy {
                        PullPolicy::Never => {
                            return Err(BackendError::new(
                                ErrorKind::ImageMissing,
                                format!(
                                    "image `{}` is not present locally and the pull policy is \
                                     `never`",
                                    req.spec.image
                                ),
                            ))
                        }
                        PullPolicy::IfNotPresent => self.pull(&req.spec.image).await?,
                        PullPolicy::Build => self.build_once(&req.spec.image).await?,
                    }
                } else if self.holds_name(name).await? {
                    return Err(name_taken(name));
                } else {
                    return Err(BackendError::engine("create_container", e));
                }
            }
        }
        match self.create_named(name, body).await {
            Err(e) if e.kind() == ErrorKind::Conflict => Err(name_taken(name)),
            Err(e) if e.kind() == ErrorKind::Other && self.holds_name(name).await? => {
                Err(name_taken(name))
            }
            other => other,
        }
    }

    /// Whether a container holds `name`.
    async fn holds_name(&self, name: &str) -> Result<bool> {
        match self.inspect(name, &[404]).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(BackendError::engine("inspect_container", e)),
        }
    }

    async fn pull(&self, image: &str) -> Result<()> {
        tracing::info!(image, "pulling image (pull policy if_not_present)");
        // Without a tag the engine would pull every tag of the repository.
        let last = image.rsplit('/').next().unwrap_or(image);
        let reference = if last.contains(':') || image.contains('@') {
            image.to_string()
        } else {
            format!("{image}:latest")
        };
        let options = CreateImageOptionsBuilder::new()
            .from_image(&reference)
            .build();
        let pull = self
            .engine
            .docker
            .create_image(Some(options), None, None)
            .try_collect::<Vec<_>>();
        self.call("pull", &[], pull)
            .await
            .map(|_| ())
            .map_err(BackendError::from_engine("pull_image"))
    }

    /// The exact container body sandboxd sends for a session (public for the bench, whose
    /// raw baseline creates the very same container).
    pub fn create_body(&self, req: &StartRequest<'_>) -> ContainerCreateBody {
        let spec = req.spec;
        let hardening = Translated::of(&spec.hardening);
        let base = HostConfig {
            port_bindings: spec.publish_host_ip.as_ref().map(|ip| {
                HashMap::from([(
                    format!("{}/tcp", spec.agent_port),
                    Some(vec![bollard::models::PortBinding {
                        host_ip: Some(ip.clone()),
                        // Empty: the engine picks a free ephemeral port.
                        host_port: Some(String::new()),
                    }]),
                )])
            }),
            mounts: Some(bind_mounts(spec)),
            // The profile's runtime (`runsc` for gVisor); never a silent fallback: an
            // unknown one fails the create.
            runtime: spec.runtime().map(str::to_string),
            network_mode: Some(spec.network.clone()),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels::for_request(&self.engine.instance, req)),
            user: hardening.user.clone(),
            exposed_ports: spec
                .publish_host_ip
                .as_ref()
                .map(|_| vec![format!("{}/tcp", spec.agent_port)]),
            host_config: Some(self.read_only_tmpfs(
                hardening.host_config(base, &self.body.ulimits),
                hardening.read_only_rootfs,
            )),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    spec.network.clone(),
                    EndpointSettings::default(),
                )])),
            }),
            ..Default::default()
        }
    }

    /// The backend's extra read-only tmpfs on a read-only root.
    fn read_only_tmpfs(&self, mut hc: HostConfig, read_only_rootfs: bool) -> HostConfig {
        if read_only_rootfs && !self.body.read_only_tmpfs.is_empty() {
            let tmpfs = hc.tmpfs.get_or_insert_with(HashMap::new);
            for path in &self.body.read_only_tmpfs {
                tmpfs.insert(path.clone(), "ro,nosuid,nodev,noexec,size=4k".into());
            }
        }
        hc
    }

    /// Inspects a container (by id or name); `benign` statuses count as success in metrics.
    async fn inspect(
        &self,
        id: &str,
        benign: &[u16],
    ) -> Result<bollard::models::ContainerInspectResponse, BollardError> {
        let options = None::<InspectContainerOptions>;
        self.call(
            "inspect",
            benign,
            self.engine.docker.inspect_container(id, options),
        )
        .await
    }
}

#[async_trait::async_trait]
impl Backend for DockerRuntime {
    fn describe(&self) -> &'static str {
        self.describe
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        self.list_managed().await
    }

    async fn list_members(&self) -> Result<Vec<Observed>> {
        self.list_labelled(&[labels::POOL_SLOT]).await
    }

    fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        labels::container_name(&self.engine.instance, chat_id, session_id)
    }

    async fn create_container(&self, req: &StartRequest<'_>) -> Result<String> {
        let name = self.container_name(req.chat_id, req.session_id);
        self.create(&name, req).await
    }

    async fn name_holder(&self, name: &str) -> Result<NameHolder> {
        let existing = self
            .inspect(name, &[])
            .await
            .map_err(BackendError::from_engine("inspect_container"))?;
        let found = existing
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let id = existing.id.unwrap_or_else(|| name.to_string());
        Ok(self.engine.holder(id, &found))
    }

    /// Starts the container (a 304, already running, is success) and reads its address on
    /// `network`, the spec's network, and its published host port of `port`, if any.
    async fn start_container(&self, id: &str, network: &str, port: u16) -> Result<Started> {
        match self
            .call(
                "start",
                &[304],
                self.engine.docker.start_container(id, None),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(304) => {}
            Err(e) => return Err(BackendError::engine("start_container", e)),
        }
        let inspect = self
            .inspect(id, &[])
            .await
            .map_err(BackendError::from_engine("inspect_container"))?;
        let host_port = host_port(inspect.network_settings.as_ref(), port);
        // Its own network first (a resumed sandbox may sit on a shard of `network`).
        let mode = inspect.host_config.and_then(|h| h.network_mode);
        let networks = inspect.network_settings.and_then(|n| n.networks);
        let (on, ip) = own_address(networks, mode.as_deref(), network);
        let ip = ip.ok_or_else(|| {
            BackendError::new(
                ErrorKind::Other,
                format!("container {id} has no IP address on network `{network}`"),
            )
        })?;
        Ok(Started {
            ip,
            host_port,
            network: on,
        })
    }

    async fn ensure_network_named(&self, network: &str) -> Result<()> {
        self.ensure_bridge(network).await
    }

    /// Force-removes a container; one that is already gone counts as removed.
    async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self
            .call(
                "remove",
                &[404],
                self.engine.docker.remove_container(id, Some(options)),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // 409 "removal already in progress": the container still exists; retried later.
            Err(e) => Err(BackendError::engine("remove_container", e)),
        }
    }

    /// How a container ended: its exit code and when it finished; `None` while it runs or
    /// when it is gone.
    async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>> {
        let inspect = match self.inspect(id, &[404]).await {
            Ok(i) => i,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(BackendError::engine("inspect_container", e)),
        };
        let Some(state) = inspect.state.filter(|s| s.running == Some(false)) else {
            return Ok(None);
        };
        let finished = state
            .finished_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .filter(|t| t.timestamp() > 0);
        Ok(finished.map(|t| (state.exit_code.unwrap_or_default(), t)))
    }

    async fn profile_problems(&self, settings: &Settings) -> Result<Vec<String>> {
        let offered = self.runtimes().await?;
        Ok(settings
            .sandbox
            .profiles
            .iter()
            .filter(|(_, profile)| !offered.contains(&profile.runtime))
            .map(|(name, profile)| {
                format!(
                    "profile {name}: runtime `{}` is not registered with the engine (it offers \
                     {})",
                    profile.runtime,
                    offered.join(", ")
                )
            })
            .collect())
    }

    async fn published_port(&self, id: &str, port: u16) -> Result<Option<u16>> {
        let inspect = self
            .inspect(id, &[])
            .await
            .map_err(BackendError::from_engine("inspect_container"))?;
        Ok(host_port(inspect.network_settings.as_ref(), port))
    }

    /// Container events of this instance that may need an answer, as a stream of wake-ups.
    /// Ends on error; the caller reconnects. Correctness never depends on it.
    fn events(&self, since: Option<i64>) -> BoxStream<'static, Result<EngineEvent>> {
        // Only changes sandboxd does not make itself: its own creates and starts would wake a
        // pass per call (a burst of 50 starts made ≈ 200 extra container lists).
        let changes = ["die", "destroy", "oom", "pause", "unpause", "rename"];
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", labels::instance_filter(&self.engine.instance)),
            ("event", changes.map(String::from).to_vec()),
        ]);
        self.engine
            .events(&filters, since)
            .map_ok(|(event, _)| event)
            .boxed()
    }

    fn host_rules(&self) -> Option<&dyn HostRules> {
        Some(self)
    }

    fn legacy(&self) -> Option<&dyn LegacyTakeover> {
        Some(self)
    }

    fn images(&self) -> Option<&dyn ImageWatch> {
        Some(self)
    }

    fn builds(&self) -> Option<&dyn ImageBuilds> {
        Some(self)
    }

    fn warm(&self) -> Option<&dyn WarmStarts> {
        Some(self)
    }

    fn networks(&self) -> Option<&dyn super::ShardedNetworks> {
        Some(self)
    }

    fn hibernation(&self) -> Option<&dyn super::Hibernation> {
        Some(self)
    }
}

#[async_trait::async_trait]
impl super::Hibernation for DockerRuntime {
    async fn pause(&self, id: &str) -> Result<()> {
        self.call("pause", &[], self.engine.docker.pause_container(id))
            .await
            .map_err(BackendError::from_engine("pause_container"))
    }

    async fn unpause(&self, id: &str) -> Result<()> {
        self.call("unpause", &[], self.engine.docker.unpause_container(id))
            .await
            .map_err(BackendError::from_engine("unpause_container"))
    }

    /// A 304 (already stopped) is success.
    async fn stop(&self, id: &str, grace: Duration) -> Result<()> {
        let options = bollard::query_parameters::StopContainerOptionsBuilder::new()
            .t(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX))
            .build();
        match self
            .call(
                "stop",
                &[304],
                self.engine.docker.stop_container(id, Some(options)),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) => Err(BackendError::engine("stop_container", e)),
        }
    }
}

#[async_trait::async_trait]
impl HostRules for DockerRuntime {
    async fn bridge_of(&self, network: &str) -> Result<String> {
        let n = self.engine.network_brief(network).await?.ok_or_else(|| {
            BackendError::new(
                ErrorKind::NotFound,
                format!("network `{network}` not found"),
            )
        })?;
        if n.driver.as_deref().is_some_and(|d| d != "bridge") {
            return Err(BackendError::new(
                ErrorKind::Refused,
                format!(
                    "docker inspect_network: network `{network}` uses driver {:?}: egress rules \
                     need a bridge network",
                    n.driver
                ),
            ));
        }
        let named = n.options.get("com.docker.network.bridge.name").cloned();
        let id = n.id;
        Ok(named.unwrap_or_else(|| format!("br-{}", &id[..id.len().min(12)])))
    }
}

#[async_trait::async_trait]
impl LegacyTakeover for DockerRuntime {
    /// Every container the old Python service started: its six labels, no sandboxd labels.
    async fn list_legacy(&self) -> Result<Vec<LegacyContainer>> {
        let filters = HashMap::from([(
            "label",
            labels::legacy::ALL.iter().map(|l| l.to_string()).collect(),
        )]);
        self.list_legacy_matching(filters).await
    }

    /// The old service's containers among `ids`, as the planner sees them: adopted ones are
    /// watched this way until their session ends.
    async fn observe_legacy(&self, ids: &[String]) -> Result<Vec<Observed>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let filters = HashMap::from([("id", ids.to_vec())]);
        Ok(self
            .list_legacy_matching(filters)
            .await?
            .into_iter()
            .filter(|c| ids.contains(&c.container_id))
            .map(|c| Observed {
                container_id: c.container_id,
                chat_id: Some(c.session.chat_id),
                session_id: Some(c.session.session_id),
                spec_hash: None,
                running: c.running,
                paused: c.paused,
                ip: c.ip,
                legacy: true,
                pool_slot: None,
                network: c.network,
            })
            .collect())
    }
}

impl ImageWatch for DockerRuntime {
    /// Names of images that appeared (tagged, pulled, loaded, imported), as they happen. Ends
    /// on error; the caller reconnects. Only an accelerator: a start that failed for a missing
    /// image is retried at once instead of at its backoff.
    fn image_events(&self) -> BoxStream<'static, Result<String>> {
        let filters = HashMap::from([
            ("type", vec!["image".to_string()]),
            (
                "event",
                ["tag", "pull", "load", "import"].map(String::from).to_vec(),
            ),
        ]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        self.engine
            .docker
            .events(Some(options))
            .map(|r| {
                r.map(|e| {
                    let actor = e.actor.unwrap_or_default();
                    actor
                        .attributes
                        .and_then(|mut a| a.remove("name"))
                        .or(actor.id)
                        .unwrap_or_default()
                })
                .map_err(BackendError::from_engine("events"))
            })
            .boxed()
    }
}

impl ImageBuilds for DockerRuntime {
    fn take_build_reports(&self) -> Vec<BuildReport> {
        self.builds
            .reports
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl WarmStarts for DockerRuntime {
    fn instance(&self) -> &str {
        &self.engine.instance
    }

    async fn image_command(&self, image: &str) -> Result<(Vec<String>, Vec<String>)> {
        let i = self
            .call(
                "inspect_image",
                &[],
                self.engine.docker.inspect_image(image),
            )
            .await
            .map_err(BackendError::from_engine("inspect_image"))?;
        let config = i.config.unwrap_or_default();
        Ok((
            config.entrypoint.unwrap_or_default(),
            config.cmd.unwrap_or_default(),
        ))
    }

    /// The session body of the class spec, with the member's labels, the wrapper as its
    /// command, `rslave` propagation on the slot's directories and the claim directory.
    async fn create_member(&self, m: &MemberRequest<'_>) -> Result<String> {
        let req = StartRequest {
            chat_id: ChatId(uuid::Uuid::nil()),
            session_id: SessionId(uuid::Uuid::nil()),
            agent_id: "",
            spec: m.spec,
            spec_hash: "",
            volume_host_path: "",
            expires_at: Utc::now(),
        };
        let mut body = self.create_body(&req);
        body.labels = Some(m.labels.clone());
        body.entrypoint = Some(m.entrypoint.clone());
        body.cmd = Some(m.cmd.clone());
        if let Some(mounts) = body.host_config.as_mut().and_then(|h| h.mounts.as_mut()) {
            for mount in mounts.iter_mut() {
                if mount
                    .source
                    .as_ref()
                    .is_some_and(|s| m.propagated.contains(s))
                {
                    mount.bind_options = Some(MountBindOptions {
                        propagation: Some(MountBindOptionsPropagationEnum::RSLAVE),
                        ..Default::default()
                    });
                }
            }
            mounts.push(Mount {
                target: Some(m.claim_dir.1.clone()),
                source: Some(m.claim_dir.0.clone()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            });
        }
        self.create_named(m.name, body).await
    }
}
