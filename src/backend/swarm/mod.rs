//! Docker Swarm backend: each sandbox is a one-replica service on an attachable overlay,
//! created through a manager's engine. The rest of sandboxd sees it through the
//! [`crate::runtime`] seam, exactly as it sees the docker backend: a service stands where a
//! container stood (its id is the "container id" in the store), and its running task's overlay
//! address is the endpoint.
//!
//! Who restarts (docs/architecture.md): sandboxd, always. Services run with restart
//! condition `none`, so Swarm never starts a second task on its own: when an agent exits, its
//! node is drained or lost, the service has no running task, and the loop replaces it (a crash
//! with the per-chat backoff, a drain or a lost node at once). Measured here, that is faster
//! than Swarm's own rescheduling (which waits for the old task to stop), and one owner of
//! restarts means one task per chat. A service whose task is on its way (just created) is left
//! out of the list, so a pass never replaces a start in flight; a start for it finds the
//! service under its deterministic name and waits for the task.
//!
//! The manager reports no task changes as events (and no container events of other nodes):
//! `events` polls the task list every second and turns a change into a wake-up.

pub mod api;
pub mod nodes;
pub mod placement;
pub mod service;
pub mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::{NetworkCreateRequest, NodeSpecAvailabilityEnum, NodeState};
use bollard::query_parameters::{
    InspectNetworkOptions, ListNodesOptions, ListServicesOptionsBuilder,
};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use crate::backend::engine::{Engine, EngineAddress};
use crate::backend::error::{status_of, BackendError, ErrorKind, Result};
use crate::backend::{labels, Backend, EngineEvent, NameHolder, StartRequest, Started};
use crate::config::Settings;
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;

use crate::backend::raw::RawApi;
use placement::{EngineFacts, NetworkKind, NodeFacts, Refusal};

impl From<Refusal> for BackendError {
    fn from(r: Refusal) -> Self {
        BackendError::new(ErrorKind::Refused, r.0)
    }
}

/// A failure of the swarm backend's own (not an engine call's).
fn swarm_error(kind: ErrorKind, message: impl std::fmt::Display) -> BackendError {
    BackendError::new(kind, format!("swarm: {message}"))
}

/// How long node facts (labels, each engine's `docker info`) are reused between starts.
const NODE_FACTS_FOR: Duration = Duration::from_secs(5);

/// Node facts, and when they were read.
type FactsAt = (Instant, Vec<NodeFacts>);

#[derive(Clone)]
pub struct SwarmRuntime {
    engine: Engine,
    raw: Arc<RawApi>,
    network: String,
    start_timeout: Duration,
    stop_grace_seconds: u64,
    /// Each node's own engine, by hostname (`swarm.nodes`).
    node_engines: Arc<BTreeMap<String, EngineAddress>>,
    node_facts: Arc<tokio::sync::Mutex<Option<FactsAt>>>,
}

impl SwarmRuntime {
    /// Connects to the manager's engine, checks that it is one, and makes sure the sandbox
    /// network exists (an attachable overlay).
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self> {
        let rt = Self::connect_manager(settings, metrics).await?;
        rt.ensure_overlay(&settings.sandbox.network_name, NetworkKind::Open)
            .await?;
        Ok(rt)
    }

    /// Connects to the manager's engine and checks that it is one.
    pub async fn connect_manager(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self> {
        let timeout = Duration::from_secs(settings.docker.timeout_seconds);
        let manager = EngineAddress::plain(&settings.docker.base_url, timeout);
        let engine = Engine::connect(&manager, &settings.controller.instance, metrics).await?;
        let info = engine
            .docker
            .info()
            .await
            .map_err(BackendError::from_engine("info"))?;
        let is_manager = info
            .swarm
            .as_ref()
            .and_then(|s| s.control_available)
            .unwrap_or(false);
        if !is_manager {
            return Err(BackendError::new(
                ErrorKind::Refused,
                format!(
                    "the engine at {} is not a swarm manager (runtime: swarm needs one)",
                    manager.base_url
                ),
            ));
        }
        let node_engines = settings
            .swarm
            .nodes
            .iter()
            .map(|(host, e)| {
                (
                    host.clone(),
                    EngineAddress {
                        base_url: e.base_url.clone(),
                        tls: e.tls.clone(),
                        timeout,
                    },
                )
            })
            .collect();
        let raw_metrics = engine.metrics.clone();
        Ok(Self {
            engine,
            raw: Arc::new(RawApi::new(&manager.base_url, timeout)?.metered(raw_metrics)),
            network: settings.sandbox.network_name.clone(),
            start_timeout: Duration::from_secs(settings.swarm.start_timeout_seconds),
            stop_grace_seconds: settings.swarm.stop_grace_seconds,
            node_engines: Arc::new(node_engines),
            node_facts: Arc::default(),
        })
    }

    /// Runs one call, metered.
    async fn call<T>(
        &self,
        operation: &'static str,
        benign: &[u16],
        fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, bollard::errors::Error> {
        self.engine.call(operation, benign, fut).await
    }

    /// An attachable overlay of this kind; an existing network of another kind is refused
    /// (an `egress: deny` profile needs its own, internal, network).
    pub async fn ensure_overlay(&self, name: &str, kind: NetworkKind) -> Result<()> {
        let internal = kind == NetworkKind::Internal;
        let options = InspectNetworkOptions {
            scope: Some("swarm".into()),
            ..Default::default()
        };
        if let Some(n) = self.engine.network(name, Some(options)).await? {
            let driver = n.driver.unwrap_or_default();
            if driver != "overlay" || n.attachable != Some(true) {
                return Err(Refusal(format!(
                    "network `{name}` is a {driver} network; swarm sandboxes need an \
                     attachable overlay"
                ))
                .into());
            }
            if n.internal.unwrap_or(false) != internal {
                return Err(Refusal(format!(
                    "network `{name}` is {}internal, but the profile's egress needs it {}: \
                     give profiles with `egress: deny` their own `network`",
                    if internal { "not " } else { "" },
                    if internal { "internal" } else { "routed" },
                ))
                .into());
            }
            return Ok(());
        }
        self.engine
            .create_network(NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("overlay".into()),
                attachable: Some(true),
                internal: Some(internal),
                ..Default::default()
            })
            .await
    }

    /// The swarm's nodes as placement sees them: labels from the manager, and what each
    /// node's own engine enforces where `swarm.nodes` reaches it. Reused for a few seconds.
    pub async fn nodes(&self) -> Result<Vec<NodeFacts>> {
        let mut cached = self.node_facts.lock().await;
        if let Some((at, facts)) = cached.as_ref() {
            if at.elapsed() < NODE_FACTS_FOR {
                return Ok(facts.clone());
            }
        }
        let nodes = self
            .call(
                "list_nodes",
                &[],
                self.engine.docker.list_nodes(None::<ListNodesOptions>),
            )
            .await
            .map_err(BackendError::from_engine("list_nodes"))?;
        let mut facts = Vec::with_capacity(nodes.len());
        for n in nodes {
            let spec = n.spec.unwrap_or_default();
            let hostname = n.description.and_then(|d| d.hostname).unwrap_or_default();
            let ready = n.status.and_then(|s| s.state) == Some(NodeState::READY);
            let active = spec.availability == Some(NodeSpecAvailabilityEnum::ACTIVE);
            let engine = self.engine_facts(&hostname).await;
            facts.push(NodeFacts {
                id: n.id.unwrap_or_default(),
                hostname,
                schedulable: ready && active,
                labels: spec.labels.unwrap_or_default().into_iter().collect(),
                engine,
            });
        }
        *cached = Some((Instant::now(), facts.clone()));
        Ok(facts)
    }

    /// What a node's own engine says it enforces; `None` when it is not configured or did
    /// not answer (its labels then stand alone).
    async fn engine_facts(&self, hostname: &str) -> Option<EngineFacts> {
        let address = self.node_engines.get(hostname)?;
        let info = async {
            let docker = address.connect().await.ok()?;
            docker.info().await.ok()
        };
        let info = tokio::time::timeout(Duration::from_secs(2), info)
            .await
            .ok()
            .flatten()?;
        Some(EngineFacts {
            default_runtime: info.default_runtime.unwrap_or_else(|| "runc".into()),
        })
    }

    /// Every service of this instance whose task runs or has ended, as the planner sees
    /// them. One on its way (placed or moved by Swarm) is left out: see the module comment.
    async fn list_managed(&self) -> Result<Vec<Observed>> {
        let filters = HashMap::from([("label", labels::instance_filter(&self.engine.instance))]);
        let options = ListServicesOptionsBuilder::new().filters(&filters).build();
        let services = self
            .call(
                "list_services",
                &[],
                self.engine.docker.list_services(Some(options)),
            )
            .await
            .map_err(BackendError::from_engine("list_services"))?;
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_service: HashMap<String, Vec<api::TaskView>> = HashMap::new();
        for t in api::tasks(&self.raw, &json!({"desired-state": ["running"]})).await? {
            by_service.entry(t.service_id.clone()).or_default().push(t);
        }
        Ok(services
            .into_iter()
            .filter_map(|s| {
                let id = s.id?;
                let spec = s.spec.unwrap_or_default();
                let found = spec.labels.unwrap_or_default();
                let parsed = labels::parse(&found);
                let tasks = by_service.remove(&id).unwrap_or_default();
                // On its way, and not for longer than a start may wait: a service no node can
                // take is shown (not running) after that, so it is replaced or removed.
                let young = s
                    .created_at
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_none_or(|t| {
                        (Utc::now() - t.with_timezone(&Utc))
                            .to_std()
                            .is_ok_and(|age| age < self.start_timeout)
                    });
                if young
                    && tasks::starting(&tasks)
                    && tasks::serving(&tasks, &self.network).is_none()
                {
                    return None;
                }
                let serving = tasks::serving(&tasks, &self.network);
                Some(Observed {
                    container_id: id,
                    chat_id: parsed.chat_id,
                    session_id: parsed.session_id,
                    spec_hash: parsed.spec_hash,
                    running: serving.is_some(),
                    paused: false,
                    ip: serving.and_then(|s| s.ip),
                    legacy: false,
                    pool_slot: None,
                    network: None,
                })
            })
            .collect())
    }

    /// The tasks of one service, in any state.
    async fn tasks_of(&self, service: &str) -> Result<Vec<api::TaskView>> {
        let result = api::tasks(&self.raw, &json!({ "service": [service] })).await;
        // Keep this service's own, whatever else the filter matched.
        Ok(result?
            .into_iter()
            .filter(|t| t.service_id == service)
            .collect())
    }

    /// Waits until the service's task runs, and returns its address on `network`. A task
    /// that ended without running (`tasks::ended`), or none running within
    /// `swarm.start_timeout_seconds`, is an error naming why (the executor then removes the
    /// service, and the retry is placed afresh).
    pub async fn wait_running(&self, id: &str, network: &str) -> Result<String> {
        let deadline = Instant::now() + self.start_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let tasks = self.tasks_of(id).await?;
            if let Some(s) = tasks::serving(&tasks, network) {
                return s.ip.ok_or_else(|| {
                    BackendError::new(
                        ErrorKind::Other,
                        format!("service {id} has no IP address on network `{network}`"),
                    )
                });
            }
            let gave_up = Instant::now() >= deadline;
            if gave_up || tasks::ended(&tasks) {
                let why =
                    tasks::why_not_running(&tasks).unwrap_or_else(|| "no task was created".into());
                return Err(swarm_error(
                    ErrorKind::Other,
                    format!(
                        "service {id} did not run within {} s: {why}",
                        self.start_timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// The task serving a service: its node's hostname and its container there (for the
    /// data plane). `None` when no task runs.
    pub async fn locate(&self, id: &str) -> Result<Option<(String, String)>> {
        let tasks = self.tasks_of(id).await?;
        let Some(s) = tasks::serving(&tasks, &self.network) else {
            return Ok(None);
        };
        let (Some(node), Some(container)) = (s.node_id, s.container_id) else {
            return Ok(None);
        };
        let n = self
            .call("inspect_node", &[], self.engine.docker.inspect_node(&node))
            .await
            .map_err(BackendError::from_engine("inspect_node"))?;
        let hostname = n.description.and_then(|d| d.hostname).unwrap_or(node);
        Ok(Some((hostname, container)))
    }

    /// The engine configured for a node, if any.
    pub fn node_engine(&self, hostname: &str) -> Option<&EngineAddress> {
        self.node_engines.get(hostname)
    }

    /// A wake-up whenever the running tasks change (one ends, one starts, one is told to
    /// stop); polled every second, since the manager emits no task events. Ends on error.
    fn task_changes(&self) -> BoxStream<'static, Result<EngineEvent>> {
        let raw = self.raw.clone();
        async_stream::try_stream! {
            let mut last: Option<Vec<(String, String, String)>> = None;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let tasks = api::tasks(&raw, &json!({"desired-state": ["running", "shutdown"]})).await?;
                let mut now: Vec<(String, String, String)> = tasks
                    .into_iter()
                    .filter(|t| t.status.state == "running" || t.desired_state == "running")
                    .map(|t| (t.id, t.status.state, t.desired_state))
                    .collect();
                now.sort();
                if last.as_ref().is_some_and(|l| *l != now) {
                    yield EngineEvent {
                        at: Utc::now().timestamp(),
                        action: "task-change".into(),
                        container_id: String::new(),
                        exit_code: None,
                    };
                }
                last = Some(now);
            }
        }
        .boxed()
    }
}

#[async_trait::async_trait]
impl Backend for SwarmRuntime {
    fn describe(&self) -> &'static str {
        "the Docker Swarm manager"
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        self.list_managed().await
    }

    /// The session's deterministic service name.
    fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        service::service_name(chat_id, session_id)
    }

    /// Checks what the profile asks against what the nodes give, then creates the service
    /// (Swarm starts its task). A taken name is `NameTaken`.
    async fn create_container(&self, req: &StartRequest<'_>) -> Result<String> {
        let kind = placement::network_kind(req.spec)?;
        let nodes = self.nodes().await?;
        let placed = placement::place(&placement::Needs::of(req.spec), &nodes)?;
        if !placed.contradicted.is_empty() {
            tracing::warn!(nodes = ?placed.contradicted, "node labels claim protections their engine does not enforce; those nodes are left out");
        }
        self.ensure_overlay(&req.spec.network, kind).await?;
        let defaults = service::ServiceDefaults {
            instance: &self.engine.instance,
            stop_grace_seconds: self.stop_grace_seconds,
        };
        let spec = service::service_spec(req, &defaults, placed.constraints);
        let name = self.container_name(req.chat_id, req.session_id);
        match self
            .call(
                "create_service",
                &[409],
                self.engine.docker.create_service(spec, None),
            )
            .await
        {
            Ok(r) => {
                r.id.ok_or_else(|| swarm_error(ErrorKind::Other, "service create returned no id"))
            }
            Err(e) if status_of(&e) == Some(409) => Err(BackendError::new(
                ErrorKind::NameTaken,
                format!("the service name {name} is taken"),
            )),
            Err(e) => Err(BackendError::engine("create_service", e)),
        }
    }

    async fn name_holder(&self, name: &str) -> Result<NameHolder> {
        let s = self
            .call(
                "inspect_service",
                &[],
                self.engine.docker.inspect_service(name, None),
            )
            .await
            .map_err(BackendError::from_engine("inspect_service"))?;
        let found = s.spec.and_then(|s| s.labels).unwrap_or_default();
        let id = s.id.unwrap_or_else(|| name.to_string());
        Ok(self.engine.holder(id, &found))
    }

    /// Waits for the service's task to run (`wait_running`); nothing is published.
    async fn start_container(&self, id: &str, network: &str, _port: u16) -> Result<Started> {
        Ok(Started {
            ip: self.wait_running(id, network).await?,
            host_port: None,
            network: None,
        })
    }

    async fn ensure_network_named(&self, network: &str) -> Result<()> {
        self.ensure_overlay(network, NetworkKind::Open).await
    }

    /// Removes a service (Swarm stops its task); one already gone counts as removed.
    async fn remove(&self, id: &str) -> Result<()> {
        match self
            .call("remove", &[404], self.engine.docker.delete_service(id))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(BackendError::engine("remove_service", e)),
        }
    }

    /// How the service's agent ended, when it exited on its own (`tasks::exited`).
    async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>> {
        Ok(tasks::exited(&self.tasks_of(id).await?))
    }

    /// What would be refused at placement.
    async fn profile_problems(&self, settings: &Settings) -> Result<Vec<String>> {
        let nodes = match self.nodes().await {
            Ok(n) => n,
            Err(e) => return Ok(vec![format!("cannot list the swarm's nodes: {e}")]),
        };
        let mut problems = Vec::new();
        for name in settings.sandbox.profiles.keys() {
            // The spec a session under this profile would freeze (its chat is irrelevant).
            let spec = crate::config::spec::resolve(
                &settings.sandbox,
                ChatId(uuid::Uuid::nil()),
                "",
                std::path::Path::new(""),
                Some(name),
            );
            if let Err(e) = placement::network_kind(&spec) {
                problems.push(format!("profile {name}: {}", e.0));
            }
            if let Err(e) = placement::place(&placement::Needs::of(&spec), &nodes) {
                problems.push(format!("profile {name}: {}", e.0));
            }
        }
        Ok(problems)
    }

    /// Service and node changes, as wake-ups (correctness never depends on them). The
    /// manager sees no container events of other nodes; a task that ends is found by the
    /// next pass.
    fn events(&self, since: Option<i64>) -> BoxStream<'static, Result<EngineEvent>> {
        // Node updates (drain, down, ready) and services changed by someone else; sandboxd's
        // own creates would only wake a pass per call.
        let filters = HashMap::from([
            ("type", vec!["service".to_string(), "node".to_string()]),
            ("event", vec!["update".to_string(), "remove".to_string()]),
        ]);
        let engine = self
            .engine
            .events(&filters, since)
            .map_ok(|(event, _)| event);
        futures::stream::select(engine, self.task_changes()).boxed()
    }
}
