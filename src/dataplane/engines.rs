//! Which engine runs a sandbox's container. With the docker backend, the one engine. In
//! swarm mode, the node that runs the service's task: the manager says which node and which
//! container, and `swarm.nodes` says how to reach that node's engine. A node left out of
//! `swarm.nodes` answers 501, one that does not answer 503: never a hang.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::DataPlaneError;
use crate::config::{RuntimeKind, Settings};
use crate::docker::sandbox_io::SandboxIo;
use crate::docker::EngineAddress;
use crate::metrics::Metrics;
use crate::swarm::SwarmRuntime;

#[derive(Clone)]
pub enum Engines {
    Local(SandboxIo),
    Swarm(Arc<SwarmEngines>),
}

pub struct SwarmEngines {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    /// The manager link, made on first use (and again after it failed).
    manager: Mutex<Option<SwarmRuntime>>,
    nodes: BTreeMap<String, SandboxIo>,
}

impl Engines {
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        match settings.runtime {
            RuntimeKind::Docker => Engines::Local(SandboxIo::new(&settings.docker)),
            RuntimeKind::Swarm => {
                let timeout = std::time::Duration::from_secs(settings.docker.timeout_seconds);
                let nodes = settings
                    .swarm
                    .nodes
                    .iter()
                    .map(|(host, e)| {
                        let io = SandboxIo::at(EngineAddress {
                            base_url: e.base_url.clone(),
                            tls: e.tls.clone(),
                            timeout,
                        });
                        (host.clone(), io)
                    })
                    .collect();
                Engines::Swarm(Arc::new(SwarmEngines {
                    settings,
                    metrics,
                    manager: Mutex::new(None),
                    nodes,
                }))
            }
        }
    }

    /// The engine and the container id there for a stored container id (a service id in
    /// swarm mode).
    pub async fn locate(&self, stored: &str) -> Result<(SandboxIo, String), DataPlaneError> {
        match self {
            Engines::Local(io) => Ok((io.clone(), stored.to_string())),
            Engines::Swarm(s) => s.locate(stored).await,
        }
    }
}

impl SwarmEngines {
    async fn locate(&self, service: &str) -> Result<(SandboxIo, String), DataPlaneError> {
        let manager = {
            let mut slot = self.manager.lock().await;
            match slot.as_ref() {
                Some(m) => m.clone(),
                None => {
                    let m = SwarmRuntime::connect(&self.settings, self.metrics.clone())
                        .await
                        .map_err(|e| DataPlaneError::EngineDown(e.to_string()))?;
                    *slot = Some(m.clone());
                    m
                }
            }
        };
        let found = match manager.locate(service).await {
            Ok(f) => f,
            Err(e) => {
                if e.unavailable() {
                    *self.manager.lock().await = None;
                    return Err(DataPlaneError::EngineDown(e.to_string()));
                }
                return Err(DataPlaneError::Engine(e.to_string()));
            }
        };
        let Some((node, container)) = found else {
            return Err(DataPlaneError::NotRunning(
                "not running on any node right now (its task is being placed or moved)".into(),
            ));
        };
        let io = self
            .nodes
            .get(&node)
            .ok_or_else(|| DataPlaneError::NodeNotConfigured(node.clone()))?;
        Ok((io.clone(), container))
    }
}
