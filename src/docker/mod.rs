//! Docker adapter (bollard): one narrow type, one method per operation we need. bollard types
//! stay inside this module; the rest of sandboxd sees it through the [`crate::runtime`] seam.
//!
//! Every step is idempotent: a 404 on remove is success, a 304 on start means it already runs.
//! A name conflict on create is reported (`NameTaken`); the executor decides what it means.

mod build;
pub mod labels;
pub mod sandbox_io;

pub use build::BuildReport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HostConfig, Mount, MountType,
    NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    InspectContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures::{Stream, StreamExt, TryStreamExt};

use chrono::{DateTime, Utc};

use crate::config::{DockerSettings, PullPolicy};
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;
pub use crate::runtime::{EngineEvent, LegacyContainer, NameHolder, StartRequest};

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot connect to the Docker engine at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: BollardError,
    },
    #[error("docker {op} failed: {source}")]
    Api {
        op: &'static str,
        #[source]
        source: BollardError,
    },
    #[error("image `{image}` is not present locally and the pull policy is `never`")]
    ImageMissing { image: String },
    #[error("container {container} has no IP address on network `{network}`")]
    NoEndpoint { container: String, network: String },
    #[error("the container name {name} is taken")]
    NameTaken { name: String },
    /// The engine did not answer (transport failure, timeout): not an answer about the call.
    #[error("docker engine unavailable: {op} failed: {source}")]
    Unavailable {
        op: &'static str,
        #[source]
        source: BollardError,
    },
    /// The engine answered in a way the API does not describe.
    #[error("docker {op}: {message}")]
    Unexpected { op: &'static str, message: String },
    /// `docker.pull_policy: build` and the build failed.
    #[error("building image `{image}` from {context} failed: {message}")]
    BuildFailed {
        image: String,
        context: String,
        message: String,
    },
}

impl DockerError {
    /// An answer from the engine is `Api`; no answer at all is `Unavailable`.
    pub(crate) fn api(op: &'static str) -> impl FnOnce(BollardError) -> DockerError {
        move |source| match source {
            BollardError::DockerResponseServerError { .. }
            | BollardError::JsonDataError { .. }
            | BollardError::JsonSerdeError { .. } => DockerError::Api { op, source },
            other => DockerError::Unavailable { op, source: other },
        }
    }

    /// The engine did not answer: the connection may be gone.
    pub fn unavailable(&self) -> bool {
        matches!(
            self,
            DockerError::Unavailable { .. } | DockerError::Connect { .. }
        )
    }
}

/// A 404 from create names either the image or the network; only the message tells which.
fn is_missing_network(e: &BollardError) -> bool {
    match e {
        BollardError::DockerResponseServerError { message, .. } => {
            message.to_ascii_lowercase().contains("network")
        }
        _ => false,
    }
}

/// The HTTP status of an engine answer (`None`: no answer).
pub(crate) fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

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
fn own_address(
    networks: Option<HashMap<String, EndpointSettings>>,
    network_mode: Option<&str>,
    fallback: &str,
) -> (Option<String>, Option<String>) {
    let mut networks = networks.unwrap_or_default();
    let name = network_mode
        .filter(|m| networks.contains_key(*m))
        .unwrap_or(fallback)
        .to_string();
    let ip = networks
        .remove(&name)
        .and_then(|e| e.ip_address)
        .filter(|ip| !ip.is_empty());
    (ip.is_some().then_some(name), ip)
}

/// Runs one engine call and records its duration and outcome in the metrics; `benign`
/// statuses (a 404 on remove, a 304 on start) count as success.
pub(crate) async fn metered<T>(
    metrics: &Metrics,
    operation: &'static str,
    benign: &[u16],
    fut: impl std::future::Future<Output = Result<T, BollardError>>,
) -> Result<T, BollardError> {
    let started = Instant::now();
    let result = fut.await;
    let ok = match &result {
        Ok(_) => true,
        Err(e) => status_of(e).is_some_and(|s| benign.contains(&s)),
    };
    metrics.docker_call(operation, ok, started.elapsed());
    result
}

/// Creates a network; one someone else created in between counts as created.
pub(crate) async fn create_network(
    docker: &Docker,
    metrics: &Metrics,
    request: NetworkCreateRequest,
) -> Result<(), DockerError> {
    let (name, driver) = (request.name.clone(), request.driver.clone());
    match metered(
        metrics,
        "create_network",
        &[409],
        docker.create_network(request),
    )
    .await
    {
        Ok(_) => {
            tracing::info!(network = %name, driver = ?driver, "created sandbox network");
            Ok(())
        }
        Err(e) if status_of(&e) == Some(409) => Ok(()),
        Err(e) => Err(DockerError::api("create_network")(e)),
    }
}

/// The spec's bind mounts, as the engine takes them (a container's, or a service's).
pub(crate) fn bind_mounts(spec: &crate::domain::spec::ContainerSpec) -> Vec<Mount> {
    spec.mounts
        .iter()
        .map(|m| Mount {
            target: Some(m.target.clone()),
            source: Some(m.source.clone()),
            typ: Some(MountType::BIND),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect()
}

/// Where an engine is, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineAddress {
    /// `unix://`, `tcp://`/`http://`, or `https://` (with `tls`).
    pub base_url: String,
    pub tls: Option<crate::config::NodeTls>,
    /// Per request.
    pub timeout: Duration,
}

impl EngineAddress {
    /// Connects and negotiates the API version (20.10 speaks 1.41).
    pub async fn connect(&self) -> Result<Docker, DockerError> {
        let url = self.base_url.clone();
        let connect_err = |source| DockerError::Connect {
            url: url.clone(),
            source,
        };
        let docker = match &self.tls {
            Some(tls) => Docker::connect_with_ssl(
                &url,
                &tls.key,
                &tls.cert,
                &tls.ca,
                self.timeout.as_secs().max(1),
                bollard::API_DEFAULT_VERSION,
            ),
            None => Docker::connect_with_host(&url),
        }
        .map_err(connect_err)?
        .with_timeout(self.timeout);
        docker.negotiate_version().await.map_err(connect_err)
    }
}

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    instance: String,
    network: String,
    pull_policy: PullPolicy,
    metrics: Arc<Metrics>,
    /// With `pull_policy: build`: the Dockerfile's directory, and the one-build-at-a-time gate.
    build_context: Option<std::path::PathBuf>,
    builds: Arc<build::BuildGate>,
}

impl DockerRuntime {
    /// Connects, negotiates the API version with the engine (20.10 speaks 1.41) and pings.
    pub async fn connect(
        settings: &DockerSettings,
        instance: &str,
        network: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DockerError> {
        let url = settings.base_url.clone();
        let connect_err = |source| DockerError::Connect {
            url: url.clone(),
            source,
        };
        let docker = Docker::connect_with_host(&settings.base_url)
            .map_err(connect_err)?
            .with_timeout(Duration::from_secs(settings.timeout_seconds))
            .negotiate_version()
            .await
            .map_err(connect_err)?;
        docker.ping().await.map_err(connect_err)?;
        Ok(Self {
            docker,
            instance: instance.to_string(),
            network: network.to_string(),
            pull_policy: settings.pull_policy,
            metrics,
            build_context: settings.build_context.clone(),
            builds: Arc::default(),
        })
    }

    /// Runs one Docker call and records its duration and outcome (`metered`).
    async fn call<T>(
        &self,
        operation: &'static str,
        benign: &[u16],
        fut: impl std::future::Future<Output = Result<T, BollardError>>,
    ) -> Result<T, BollardError> {
        metered(&self.metrics, operation, benign, fut).await
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(DockerError::api("ping"))
    }

    /// Creates the configured sandbox network if it does not exist.
    pub async fn ensure_network(&self) -> Result<(), DockerError> {
        self.ensure_named_network(&self.network).await
    }

    /// Creates a sandbox network if it does not exist.
    pub async fn ensure_named_network(&self, network: &str) -> Result<(), DockerError> {
        match self
            .call(
                "inspect_network",
                &[404],
                self.docker.inspect_network(network, None),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(DockerError::api("inspect_network")(e)),
        }
        let request = NetworkCreateRequest {
            name: network.to_string(),
            driver: Some("bridge".into()),
            ..Default::default()
        };
        create_network(&self.docker, &self.metrics, request).await
    }

    /// The host interface of a bridge network (what egress rules match on).
    pub async fn bridge_of(&self, network: &str) -> Result<String, DockerError> {
        let n = self
            .call(
                "inspect_network",
                &[],
                self.docker.inspect_network(network, None),
            )
            .await
            .map_err(DockerError::api("inspect_network"))?;
        if n.driver.as_deref().is_some_and(|d| d != "bridge") {
            return Err(DockerError::Unexpected {
                op: "inspect_network",
                message: format!(
                    "network `{network}` uses driver {:?}: egress rules need a bridge network",
                    n.driver
                ),
            });
        }
        let named = n
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.bridge.name"))
            .cloned();
        let id = n.id.unwrap_or_default();
        Ok(named.unwrap_or_else(|| format!("br-{}", &id[..id.len().min(12)])))
    }

    /// The runtimes the engine offers (`docker info`).
    pub async fn runtimes(&self) -> Result<Vec<String>, DockerError> {
        let info = self
            .call("info", &[], self.docker.info())
            .await
            .map_err(DockerError::api("info"))?;
        Ok(info.runtimes.unwrap_or_default().into_keys().collect())
    }

    /// Every container (running or not) labelled for this instance.
    pub async fn list_managed(&self) -> Result<Vec<Observed>, DockerError> {
        let filters = HashMap::from([("label", labels::instance_filter(&self.instance))]);
        Ok(self
            .list(filters)
            .await?
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let parsed = labels::parse(&c.labels.unwrap_or_default());
                let mode = c.host_config.and_then(|h| h.network_mode);
                let networks = c.network_settings.and_then(|n| n.networks);
                let (_, ip) = own_address(networks, mode.as_deref(), &self.network);
                Some(Observed {
                    container_id: id,
                    chat_id: parsed.chat_id,
                    session_id: parsed.session_id,
                    spec_hash: parsed.spec_hash,
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                    ip,
                    legacy: false,
                    pool_slot: parsed.pool_slot,
                })
            })
            .collect())
    }

    /// Containers in any state matching `filters`.
    async fn list(
        &self,
        filters: HashMap<&str, Vec<String>>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        self.call("list", &[], self.docker.list_containers(Some(options)))
            .await
            .map_err(DockerError::api("list_containers"))
    }

    /// Every container the old Python service started: its six labels, no sandboxd labels.
    pub async fn list_legacy(&self) -> Result<Vec<LegacyContainer>, DockerError> {
        let filters = HashMap::from([(
            "label",
            labels::legacy::ALL.iter().map(|l| l.to_string()).collect(),
        )]);
        self.list_legacy_matching(filters).await
    }

    /// The old service's containers among `ids`, as the planner sees them: adopted ones are
    /// watched this way until their session ends.
    pub async fn observe_legacy(&self, ids: &[String]) -> Result<Vec<Observed>, DockerError> {
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
                ip: c.ip,
                legacy: true,
                pool_slot: None,
            })
            .collect())
    }

    async fn list_legacy_matching(
        &self,
        filters: HashMap<&str, Vec<String>>,
    ) -> Result<Vec<LegacyContainer>, DockerError> {
        Ok(self
            .list(filters)
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
                    network,
                    ip,
                    created_at: c.created.and_then(|t| DateTime::from_timestamp(t, 0)),
                })
            })
            .collect())
    }

    /// The session's container name: deterministic, so a start retried after a crash
    /// collides with the container the first attempt made (`DockerError::NameTaken`).
    pub fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        labels::container_name(&self.instance, chat_id, session_id)
    }

    /// Creates the session's container under its name. A name already taken is
    /// `DockerError::NameTaken`: what to do about it is the executor's policy.
    pub async fn create_container(&self, req: &StartRequest<'_>) -> Result<String, DockerError> {
        let name = self.container_name(req.chat_id, req.session_id);
        match self.create(&name, req).await {
            Err(DockerError::Api { source, .. }) if status_of(&source) == Some(409) => {
                Err(DockerError::NameTaken { name })
            }
            other => other,
        }
    }

    /// Who holds a container name: its id, and whether it is this instance's and for which
    /// session and spec.
    pub async fn name_holder(&self, name: &str) -> Result<NameHolder, DockerError> {
        let existing = self
            .inspect(name, &[])
            .await
            .map_err(DockerError::api("inspect_container"))?;
        let found = existing
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let ours = labels::is_ours(&found, &self.instance);
        let parsed = labels::parse(&found);
        Ok(NameHolder {
            container_id: existing.id.unwrap_or_else(|| name.to_string()),
            ours,
            session_id: parsed.session_id,
            spec_hash: parsed.spec_hash,
        })
    }

    /// The image's own entrypoint and command (a pool member runs them after its claim).
    pub async fn image_command(
        &self,
        image: &str,
    ) -> Result<(Vec<String>, Vec<String>), DockerError> {
        let i = self
            .call("inspect_image", &[], self.docker.inspect_image(image))
            .await
            .map_err(DockerError::api("inspect_image"))?;
        let config = i.config.unwrap_or_default();
        Ok((
            config.entrypoint.unwrap_or_default(),
            config.cmd.unwrap_or_default(),
        ))
    }

    /// Creates a container from a body as given (a pool member's); a missing image or network
    /// is an error here, not repaired (the cold path does that).
    pub async fn create_named(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        self.call(
            "create",
            &[],
            self.docker.create_container(Some(options), body),
        )
        .await
        .map(|r| r.id)
        .map_err(DockerError::api("create_container"))
    }

    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Starts a created container and reads its address on `network` (the spec's network),
    /// and its published host port of `port`, if any. A 304 (already running) is success.
    pub async fn start_container(
        &self,
        id: &str,
        network: &str,
        port: u16,
    ) -> Result<(String, Option<u16>), DockerError> {
        self.start_and_locate(id, network, port).await
    }

    /// The host port a running container publishes `port` on, if it does.
    pub async fn published_port(&self, id: &str, port: u16) -> Result<Option<u16>, DockerError> {
        let inspect = self
            .inspect(id, &[])
            .await
            .map_err(DockerError::api("inspect_container"))?;
        Ok(host_port(inspect.network_settings.as_ref(), port))
    }

    async fn create(&self, name: &str, req: &StartRequest<'_>) -> Result<String, DockerError> {
        let body = self.create_body(req);
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let first = self
            .call(
                "create",
                &[],
                self.docker
                    .create_container(Some(options.clone()), body.clone()),
            )
            .await;
        // A 404 names either the network or the image; repair that one, then try once more.
        match first {
            Ok(r) => return Ok(r.id),
            Err(e) if status_of(&e) == Some(404) && is_missing_network(&e) => {
                // The network was removed under us (e.g. `docker network prune`): recreate it.
                self.ensure_named_network(&req.spec.network).await?;
            }
            Err(e) if status_of(&e) == Some(404) => match self.pull_policy {
                PullPolicy::Never => {
                    return Err(DockerError::ImageMissing {
                        image: req.spec.image.clone(),
                    })
                }
                PullPolicy::IfNotPresent => self.pull(&req.spec.image).await?,
                PullPolicy::Build => self.build_once(&req.spec.image).await?,
            },
            Err(e) => return Err(DockerError::api("create_container")(e)),
        }
        self.create_named(name, body).await
    }

    async fn pull(&self, image: &str) -> Result<(), DockerError> {
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
            .docker
            .create_image(Some(options), None, None)
            .try_collect::<Vec<_>>();
        self.call("pull", &[], pull)
            .await
            .map(|_| ())
            .map_err(DockerError::api("pull_image"))
    }

    /// Starts the container and reads its address on `network`, the spec's network.
    async fn start_and_locate(
        &self,
        id: &str,
        network: &str,
        port: u16,
    ) -> Result<(String, Option<u16>), DockerError> {
        match self
            .call("start", &[304], self.docker.start_container(id, None))
            .await
        {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(304) => {}
            Err(e) => return Err(DockerError::api("start_container")(e)),
        }
        let inspect = self
            .inspect(id, &[])
            .await
            .map_err(DockerError::api("inspect_container"))?;
        let published = host_port(inspect.network_settings.as_ref(), port);
        let ip = inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| DockerError::NoEndpoint {
                container: id.to_string(),
                network: network.to_string(),
            })?;
        Ok((ip, published))
    }

    /// The exact container body sandboxd sends for a session (public for the bench, whose
    /// raw baseline creates the very same container).
    pub fn create_body(&self, req: &StartRequest<'_>) -> ContainerCreateBody {
        let spec = req.spec;
        let h = &spec.hardening;
        let mounts = bind_mounts(spec);
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels::for_request(&self.instance, req)),
            user: h.user.clone(),
            exposed_ports: spec
                .publish_host_ip
                .as_ref()
                .map(|_| vec![format!("{}/tcp", spec.agent_port)]),
            host_config: Some(HostConfig {
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
                mounts: Some(mounts),
                // The profile's runtime (`runsc` for gVisor); never a silent fallback: an
                // unknown one fails the create.
                runtime: spec.runtime().map(str::to_string),
                network_mode: Some(spec.network.clone()),
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(h.cap_add.clone()),
                // The engine's default seccomp profile stays in force: it is never overridden.
                security_opt: h
                    .no_new_privileges
                    .then(|| vec!["no-new-privileges:true".to_string()]),
                pids_limit: Some(h.pids_limit),
                memory: i64::try_from(h.memory_mb.saturating_mul(1024 * 1024)).ok(),
                nano_cpus: i64::try_from(h.cpu_millis.saturating_mul(1_000_000)).ok(),
                readonly_rootfs: Some(h.read_only_rootfs),
                tmpfs: h.read_only_rootfs.then(|| {
                    HashMap::from([(
                        "/tmp".to_string(),
                        format!("rw,nosuid,nodev,size={}m,mode=1777", h.tmpfs_tmp_mb),
                    )])
                }),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    spec.network.clone(),
                    EndpointSettings::default(),
                )])),
            }),
            ..Default::default()
        }
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
            self.docker.inspect_container(id, options),
        )
        .await
    }

    /// How a container ended: its exit code and when it finished; `None` while it runs or
    /// when it is gone.
    pub async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>, DockerError> {
        let inspect = match self.inspect(id, &[404]).await {
            Ok(i) => i,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(DockerError::api("inspect_container")(e)),
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

    /// Force-removes a container; one that is already gone counts as removed.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self
            .call(
                "remove",
                &[404],
                self.docker.remove_container(id, Some(options)),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            // 409 "removal already in progress": the container still exists; retried later.
            Err(e) => Err(DockerError::api("remove_container")(e)),
        }
    }

    /// Names of images that appeared (tagged, pulled, loaded, imported), as they happen. Ends
    /// on error; the caller reconnects. Only an accelerator: a start that failed for a missing
    /// image is retried at once instead of at its backoff.
    pub fn image_events(&self) -> impl Stream<Item = Result<String, DockerError>> + Send + 'static {
        let filters = HashMap::from([
            ("type", vec!["image".to_string()]),
            (
                "event",
                ["tag", "pull", "load", "import"].map(String::from).to_vec(),
            ),
        ]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        self.docker.events(Some(options)).map(|r| {
            r.map(|e| {
                let actor = e.actor.unwrap_or_default();
                actor
                    .attributes
                    .and_then(|mut a| a.remove("name"))
                    .or(actor.id)
                    .unwrap_or_default()
            })
            .map_err(DockerError::api("events"))
        })
    }

    /// Container events of this instance that may need an answer, as a stream of wake-ups. Ends on error; the caller
    /// reconnects. Correctness never depends on it.
    /// `since` (unix seconds) replays what happened while the stream was down.
    pub fn events(
        &self,
        since: Option<i64>,
    ) -> impl Stream<Item = Result<EngineEvent, DockerError>> + Send + 'static {
        // Only changes sandboxd does not make itself: its own creates and starts would wake a
        // pass per call (a burst of 50 starts made ≈ 200 extra container lists).
        let changes = ["die", "destroy", "oom", "pause", "unpause", "rename"];
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", labels::instance_filter(&self.instance)),
            ("event", changes.map(String::from).to_vec()),
        ]);
        let mut options = EventsOptionsBuilder::new().filters(&filters);
        if let Some(since) = since {
            options = options.since(&since.to_string());
        }
        self.docker.events(Some(options.build())).map(|r| {
            r.map(|e| {
                let actor = e.actor.unwrap_or_default();
                let exit_code = actor
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("exitCode"))
                    .and_then(|c| c.parse().ok());
                EngineEvent {
                    at: e.time.unwrap_or_default(),
                    action: e.action.unwrap_or_default(),
                    container_id: actor.id.unwrap_or_default(),
                    exit_code,
                }
            })
            .map_err(DockerError::api("events"))
        })
    }
}
