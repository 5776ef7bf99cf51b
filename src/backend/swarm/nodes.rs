//! The data plane in swarm mode: the node that runs a service's task. The manager says
//! which node and which container, and `swarm.nodes` says how to reach that node's engine.
//! A node left out of `swarm.nodes` is `Unsupported` (the HTTP edge answers 501), one that
//! does not answer is `Unavailable` (503): never a hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::SwarmRuntime;
use crate::backend::docker::io::EngineIo;
use crate::backend::engine::EngineAddress;
use crate::backend::error::{BackendError, ErrorKind, Result};
use crate::backend::io::{Locate, SandboxIo};
use crate::config::Settings;
use crate::metrics::Metrics;

pub struct SwarmNodes {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    /// The manager link, made on first use (and again after it failed).
    manager: Mutex<Option<SwarmRuntime>>,
    nodes: BTreeMap<String, Arc<dyn SandboxIo>>,
}

impl SwarmNodes {
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Self {
        let timeout = Duration::from_secs(settings.docker.timeout_seconds);
        let nodes = settings
            .swarm
            .nodes
            .iter()
            .map(|(host, e)| {
                let io: Arc<dyn SandboxIo> = Arc::new(EngineIo::at(EngineAddress {
                    base_url: e.base_url.clone(),
                    tls: e.tls.clone(),
                    timeout,
                }));
                (host.clone(), io)
            })
            .collect();
        Self {
            settings,
            metrics,
            manager: Mutex::new(None),
            nodes,
        }
    }

    async fn manager(&self) -> Result<SwarmRuntime> {
        let mut slot = self.manager.lock().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let m = SwarmRuntime::connect_manager(&self.settings, self.metrics.clone()).await?;
        *slot = Some(m.clone());
        Ok(m)
    }
}

#[async_trait::async_trait]
impl Locate for SwarmNodes {
    async fn locate(&self, service: &str) -> Result<(Arc<dyn SandboxIo>, String)> {
        let manager = self.manager().await?;
        let found = match manager.locate(service).await {
            Ok(f) => f,
            Err(e) => {
                if e.unavailable() {
                    *self.manager.lock().await = None;
                }
                return Err(e);
            }
        };
        let Some((node, container)) = found else {
            return Err(BackendError::new(
                ErrorKind::Conflict,
                "not running on any node right now (its task is being placed or moved)",
            ));
        };
        let io = self.nodes.get(&node).ok_or_else(|| {
            BackendError::new(
                ErrorKind::Unsupported,
                format!(
                    "the sandbox runs on swarm node {node}, whose engine is not configured \
                     (swarm.nodes.{node})"
                ),
            )
        })?;
        Ok((io.clone(), container))
    }
}
