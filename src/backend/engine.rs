//! The engine core every backend stands on: where an engine is and how to connect (API
//! version negotiated), metered calls, networks, and the reading of a name holder's labels.
//! Docker, Podman (its Docker-compatible API) and a Swarm manager all speak this API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{Ipam, Mount, MountType, Network, NetworkCreateRequest, NetworkInspect};
use bollard::query_parameters::{
    EventsOptionsBuilder, InspectNetworkOptions, ListNetworksOptionsBuilder,
};
use bollard::Docker;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::error::{status_of, BackendError, ErrorKind, Result};
use super::{labels, EngineEvent, NameHolder};
use crate::metrics::Metrics;

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
    /// A local engine without TLS.
    pub fn plain(base_url: &str, timeout: Duration) -> Self {
        Self {
            base_url: base_url.to_string(),
            tls: None,
            timeout,
        }
    }

    /// Connects and negotiates the API version (20.10 speaks 1.41).
    pub async fn connect(&self) -> Result<Docker> {
        let url = self.base_url.clone();
        let connect_err = |source: BollardError| {
            BackendError::new(
                ErrorKind::Unavailable,
                format!("cannot connect to the Docker engine at {url}: {source}"),
            )
        };
        let docker = match &self.tls {
            Some(tls) => Docker::connect_with_ssl(
                &self.base_url,
                &tls.key,
                &tls.cert,
                &tls.ca,
                self.timeout.as_secs().max(1),
                bollard::API_DEFAULT_VERSION,
            ),
            None => Docker::connect_with_host(&self.base_url),
        }
        .map_err(connect_err)?
        .with_timeout(self.timeout);
        docker.negotiate_version().await.map_err(connect_err)
    }
}

/// Runs one engine call and records its duration and outcome in the metrics; `benign`
/// statuses (a 404 on remove, a 304 on start) count as success.
pub async fn metered<T>(
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

/// What sandboxd reads of a network: its settings, never its endpoints.
#[derive(Debug, Clone, Default)]
pub struct NetworkBrief {
    pub id: String,
    pub driver: Option<String>,
    pub options: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    pub internal: Option<bool>,
    pub attachable: Option<bool>,
    pub enable_ipv6: Option<bool>,
    pub ipam: Option<Ipam>,
}

impl From<Network> for NetworkBrief {
    fn from(n: Network) -> Self {
        Self {
            id: n.id.unwrap_or_default(),
            driver: n.driver,
            options: n.options.unwrap_or_default(),
            labels: n.labels.unwrap_or_default(),
            internal: n.internal,
            attachable: n.attachable,
            enable_ipv6: n.enable_ipv6,
            ipam: n.ipam,
        }
    }
}

impl From<NetworkInspect> for NetworkBrief {
    fn from(n: NetworkInspect) -> Self {
        Self {
            id: n.id.unwrap_or_default(),
            driver: n.driver,
            options: n.options.unwrap_or_default(),
            labels: n.labels.unwrap_or_default(),
            internal: n.internal,
            attachable: n.attachable,
            enable_ipv6: n.enable_ipv6,
            ipam: n.ipam,
        }
    }
}

/// One connected engine of one sandboxd instance: the client, the metrics its calls are
/// counted in, and the instance whose labels mark what is ours.
#[derive(Clone)]
pub struct Engine {
    pub docker: Docker,
    pub instance: String,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// Connects to `address` and pings it.
    pub async fn connect(
        address: &EngineAddress,
        instance: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let docker = address.connect().await?;
        docker.ping().await.map_err(|e| {
            BackendError::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot connect to the Docker engine at {}: {e}",
                    address.base_url
                ),
            )
        })?;
        Ok(Self {
            docker,
            instance: instance.to_string(),
            metrics,
        })
    }

    /// Runs one call, metered (see [`metered`]).
    pub async fn call<T>(
        &self,
        operation: &'static str,
        benign: &[u16],
        fut: impl std::future::Future<Output = Result<T, BollardError>>,
    ) -> Result<T, BollardError> {
        metered(&self.metrics, operation, benign, fut).await
    }

    /// The engine's events matching `filters` (from `since`, unix seconds, to replay a gap),
    /// each with its actor's attributes (labels among them) for a backend that filters
    /// further. Ends on error (the caller reconnects).
    pub fn events(
        &self,
        filters: &HashMap<&str, Vec<String>>,
        since: Option<i64>,
    ) -> BoxStream<'static, Result<(EngineEvent, HashMap<String, String>)>> {
        let mut options = EventsOptionsBuilder::new().filters(filters);
        if let Some(since) = since {
            options = options.since(&since.to_string());
        }
        self.docker
            .events(Some(options.build()))
            .map(|r| {
                r.map(|message| {
                    let actor = message.actor.unwrap_or_default();
                    let attributes = actor.attributes.unwrap_or_default();
                    let event = EngineEvent {
                        at: message.time.unwrap_or_default(),
                        action: message.action.unwrap_or_default(),
                        container_id: actor.id.unwrap_or_default(),
                        exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
                    };
                    (event, attributes)
                })
                .map_err(BackendError::from_engine("events"))
            })
            .boxed()
    }

    /// A network's settings without its endpoints, or `None` when there is none of that name.
    /// Read from the network list, which leaves the containers out: an inspect carries every
    /// endpoint, so on a network of a thousand sandboxes each start would read them all. An
    /// id (no list entry of that exact name) is inspected.
    pub async fn network_brief(&self, name: &str) -> Result<Option<NetworkBrief>> {
        let listed = self
            .networks_matching(HashMap::from([("name", vec![name.to_string()])]))
            .await?;
        // The filter matches parts of names: only the exact one counts.
        if let Some(n) = listed.into_iter().find(|n| n.name.as_deref() == Some(name)) {
            return Ok(Some(NetworkBrief::from(n)));
        }
        Ok(self.network(name, None).await?.map(NetworkBrief::from))
    }

    /// The networks matching `filters` (the list's shape: settings, no endpoints).
    pub async fn networks_matching(
        &self,
        filters: HashMap<&str, Vec<String>>,
    ) -> Result<Vec<Network>> {
        let options = ListNetworksOptionsBuilder::new().filters(&filters).build();
        self.call(
            "list_networks",
            &[],
            self.docker.list_networks(Some(options)),
        )
        .await
        .map_err(BackendError::from_engine("list_networks"))
    }

    /// A network, or `None` when there is none of that name. A 500 is asked again, twice:
    /// Podman 4.3 fails a network's inspect when a container on it goes away meanwhile
    /// ("getting container from store …: container not known").
    pub async fn network(
        &self,
        name: &str,
        options: Option<InspectNetworkOptions>,
    ) -> Result<Option<NetworkInspect>> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .call(
                    "inspect_network",
                    &[404],
                    self.docker.inspect_network(name, options.clone()),
                )
                .await
            {
                Ok(n) => return Ok(Some(n)),
                Err(e) if status_of(&e) == Some(404) => return Ok(None),
                Err(e) if status_of(&e) == Some(500) && tries < 3 => continue,
                Err(e) => return Err(BackendError::engine("inspect_network", e)),
            }
        }
    }

    /// Creates a network; one someone else created in between counts as created.
    pub async fn create_network(&self, request: NetworkCreateRequest) -> Result<()> {
        let (name, driver) = (request.name.clone(), request.driver.clone());
        match self
            .call(
                "create_network",
                &[409],
                self.docker.create_network(request),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(network = %name, driver = ?driver, "created sandbox network");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            // Podman answers 500 when the name exists: its inspect tells.
            Err(e) => match self.network(&name, None).await {
                Ok(Some(_)) => Ok(()),
                _ => Err(BackendError::engine("create_network", e)),
            },
        }
    }

    /// Who holds a name, from the holder's id and labels.
    pub fn holder(&self, id: String, found: &HashMap<String, String>) -> NameHolder {
        let parsed = labels::parse(found);
        NameHolder {
            container_id: id,
            ours: labels::is_ours(found, &self.instance),
            session_id: parsed.session_id,
            spec_hash: parsed.spec_hash,
        }
    }
}

/// The spec's bind mounts, as the engine takes them (a container's, or a service's).
pub fn bind_mounts(spec: &crate::domain::spec::ContainerSpec) -> Vec<Mount> {
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
