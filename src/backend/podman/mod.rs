//! Podman, through its Docker-compatible API (`podman system service`). The container body,
//! create/start/inspect/remove and the list are the docker backend's (`DockerRuntime`, with
//! Podman's body differences in [`BodyOptions`]); what Podman 4.3 answers differently is
//! handled here, and every difference is listed in `docs/podman.md`:
//! - every container gets explicit `nofile`/`nproc` limits (Podman's defaults exceed the
//!   host's hard limits, and a start then fails); they are the limits sandboxd itself runs
//!   with, which is what dockerd's containers inherit;
//! - a read-only root gets `/run` and `/var/tmp` as read-only tmpfs (Podman would add them
//!   writable);
//! - `HostConfig.Runtime` is ignored by Podman 4.3 (a gVisor profile would run under runc
//!   without a word): profiles with a runtime other than runc are refused by name;
//! - events: Podman filters on `died`/`remove` and ORs several label filters, so the stream
//!   filters on the instance label alone and checks the rest here;
//! - host egress rules hook `FORWARD` (netavark's accept rules sit above `DOCKER-USER`), and
//!   the bridge of a network is Podman's `network_interface` (libpod API), not `br-<id>`;
//! - the data plane's differences are `io.rs`'s.

pub mod io;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use super::docker::{BodyOptions, DockerRuntime};
use super::error::{BackendError, ErrorKind, Result};
use super::raw::RawApi;
use super::{
    labels, Backend, EngineEvent, HostRules, NameHolder, StartRequest, Started, WarmStarts,
};
use crate::config::{PodmanSettings, Settings};
use crate::domain::{ChatId, SessionId};
use crate::metrics::Metrics;
use crate::planner::Observed;

/// The libpod API version whose network inspect names the bridge (4.0 and later).
const LIBPOD: &str = "v4.0.0";

/// The only runtime Podman 4.3's compatible API honours.
const RUNC: &str = "runc";

/// Read-only tmpfs over the directories Podman makes writable on a read-only root.
const READ_ONLY_TMPFS: [&str; 2] = ["/run", "/var/tmp"];

#[derive(Clone)]
pub struct PodmanRuntime {
    docker: DockerRuntime,
    raw: Arc<RawApi>,
}

/// The limits every container gets: the configured ones (`podman.ulimit_*`), capped at this
/// process's own hard limits, so a start never asks for more than the host allows.
pub fn ulimits(p: &PodmanSettings) -> Vec<(String, i64)> {
    use rustix::process::{getrlimit, Resource};
    [
        ("nofile", Resource::Nofile, p.ulimit_nofile),
        ("nproc", Resource::Nproc, p.ulimit_nproc),
    ]
    .into_iter()
    .filter_map(|(name, resource, wanted)| {
        let cap = getrlimit(resource).maximum.unwrap_or(u64::MAX);
        Some((name.to_string(), i64::try_from(wanted.min(cap)).ok()?))
    })
    .collect()
}

/// Why a profile cannot run on Podman, if it cannot.
fn runtime_refusal(runtime: Option<&str>) -> Option<String> {
    let runtime = runtime.filter(|r| *r != RUNC)?;
    Some(format!(
        "runtime `{runtime}` is not available with runtime: podman (Podman 4.3 ignores a \
         container's runtime and would run it under runc); run gVisor profiles on the docker \
         backend"
    ))
}

impl PodmanRuntime {
    /// This instance's containers carrying every label key in `keys`, read as plain JSON
    /// (docs/podman.md: Podman reports states bollard's model does not know).
    async fn list_labelled(&self, keys: &[&str]) -> Result<Vec<Observed>> {
        let mut wanted = labels::instance_filter(&self.docker.engine().instance);
        wanted.extend(keys.iter().map(|k| k.to_string()));
        let filters = serde_json::json!({ "label": wanted });
        let listed: Vec<Summary> = self.summaries(&filters).await?;
        let network = self.docker.network().to_string();
        Ok(listed
            .into_iter()
            .map(|c| {
                let parsed = labels::parse(&c.labels.unwrap_or_default());
                let networks = c.network_settings.and_then(|n| n.networks).map(|n| {
                    n.into_iter()
                        .map(|(name, e)| {
                            let endpoint = bollard::models::EndpointSettings {
                                ip_address: e.ip_address,
                                ..Default::default()
                            };
                            (name, endpoint)
                        })
                        .collect()
                });
                let (on, ip) = super::docker::own_address(networks, None, &network);
                Observed {
                    container_id: c.id,
                    chat_id: parsed.chat_id,
                    session_id: parsed.session_id,
                    spec_hash: parsed.spec_hash,
                    running: c.state == "running",
                    paused: c.state == "paused",
                    ip,
                    legacy: false,
                    pool_slot: parsed.pool_slot,
                    network: on,
                }
            })
            .collect())
    }

    /// Containers in any state matching `filters` (the compat list's filter object).
    async fn summaries(&self, filters: &serde_json::Value) -> Result<Vec<Summary>> {
        let query =
            serde_urlencoded::to_string([("all", "true"), ("filters", &filters.to_string())])
                .map_err(|e| BackendError::new(ErrorKind::Other, format!("list filter: {e}")))?;
        let body = self
            .raw
            .get("list", &format!("/v1.41/containers/json?{query}"))
            .await?;
        serde_json::from_slice(&body).map_err(|e| {
            BackendError::new(
                ErrorKind::Other,
                format!("podman container list is not what the API says: {e}"),
            )
        })
    }

    /// Connects to the Podman service at `docker.base_url` and makes sure the sandbox network
    /// exists.
    pub async fn connect(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self> {
        let body = BodyOptions {
            ulimits: ulimits(&settings.podman),
            read_only_tmpfs: READ_ONLY_TMPFS.iter().map(|p| p.to_string()).collect(),
        };
        let docker =
            DockerRuntime::connect_with(settings, metrics, body, "the Podman service").await?;
        let timeout = Duration::from_secs(settings.docker.timeout_seconds);
        let raw = RawApi::new(&settings.docker.base_url, timeout)?
            .metered(docker.engine().metrics.clone());
        let rt = Self {
            docker,
            raw: Arc::new(raw),
        };
        rt.ensure_network_named(&settings.sandbox.network_name)
            .await?;
        Ok(rt)
    }

    /// The docker backend under it, with Podman's body differences (the bench's raw
    /// baseline sends its exact container body).
    pub fn inner(&self) -> &DockerRuntime {
        &self.docker
    }
}

#[async_trait::async_trait]
impl Backend for PodmanRuntime {
    fn describe(&self) -> &'static str {
        self.docker.describe()
    }

    /// Read as plain JSON: Podman reports states bollard's model does not know
    /// (`stopped`), and one such container would fail the whole list.
    async fn list(&self) -> Result<Vec<Observed>> {
        self.list_labelled(&[]).await
    }

    async fn list_members(&self) -> Result<Vec<Observed>> {
        self.list_labelled(&[labels::POOL_SLOT]).await
    }

    fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        self.docker.container_name(chat_id, session_id)
    }

    async fn create_container(&self, req: &StartRequest<'_>) -> Result<String> {
        if let Some(why) = runtime_refusal(req.spec.runtime()) {
            return Err(BackendError::new(ErrorKind::Refused, why));
        }
        self.docker.create_container(req).await
    }

    async fn name_holder(&self, name: &str) -> Result<NameHolder> {
        self.docker.name_holder(name).await
    }

    async fn start_container(&self, id: &str, network: &str, port: u16) -> Result<Started> {
        self.docker.start_container(id, network, port).await
    }

    /// Asked through libpod's `exists` (no container listing: see `Engine::network`).
    async fn ensure_network_named(&self, network: &str) -> Result<()> {
        match self
            .raw
            .get(
                "network_exists",
                &format!("/{LIBPOD}/libpod/networks/{network}/exists"),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.docker
                    .engine()
                    .create_network(bollard::models::NetworkCreateRequest {
                        name: network.to_string(),
                        driver: Some("bridge".into()),
                        ..Default::default()
                    })
                    .await
            }
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.docker.remove(id).await
    }

    async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>> {
        self.docker.exit_state(id).await
    }

    /// Podman lists every runtime of its configuration, installed or not, and honours none
    /// but its default: only runc profiles can run.
    async fn profile_problems(&self, settings: &Settings) -> Result<Vec<String>> {
        Ok(settings
            .sandbox
            .profiles
            .iter()
            .filter_map(|(name, profile)| {
                runtime_refusal(Some(&profile.runtime)).map(|why| format!("profile {name}: {why}"))
            })
            .collect())
    }

    async fn published_port(&self, id: &str, port: u16) -> Result<Option<u16>> {
        self.docker.published_port(id, port).await
    }

    /// Deaths and removals of this instance's containers. Podman filters on its own status
    /// names (`died`, `remove`) and ORs label filters, so only the instance label is sent
    /// and `managed` is checked here.
    fn events(&self, since: Option<i64>) -> BoxStream<'static, Result<EngineEvent>> {
        let instance = self.docker.engine().instance.clone();
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("label", vec![format!("{}={instance}", labels::INSTANCE)]),
            (
                "event",
                ["died", "remove", "pause", "unpause", "rename"]
                    .map(String::from)
                    .to_vec(),
            ),
        ]);
        self.docker
            .engine()
            .events(&filters, since)
            // Several label filters are ORed on Podman: the instance is checked here.
            .try_filter(move |(_, attributes)| {
                futures::future::ready(labels::is_ours(attributes, &instance))
            })
            .map_ok(|(event, _)| event)
            .boxed()
    }

    fn host_rules(&self) -> Option<&dyn HostRules> {
        Some(self)
    }

    /// The docker backend's: the member body is the session body (Podman's differences
    /// included), and Podman honours `rslave` bind propagation.
    fn warm(&self) -> Option<&dyn WarmStarts> {
        self.docker.warm()
    }

    fn networks(&self) -> Option<&dyn super::ShardedNetworks> {
        Some(self)
    }

    /// The docker backend's: Podman's compat API pauses (cgroup freezer), unpauses and stops
    /// as dockerd does.
    fn hibernation(&self) -> Option<&dyn super::Hibernation> {
        self.docker.hibernation()
    }

    /// The docker backend's: Podman's compat build API takes the same context tar, and the
    /// build runs inside the create, as on dockerd.
    fn builds(&self) -> Option<&dyn super::ImageBuilds> {
        self.docker.builds()
    }
}

/// A container as Podman's list shows it (the fields read).
#[derive(Debug, Deserialize)]
struct Summary {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
    #[serde(rename = "State", default)]
    state: String,
    #[serde(rename = "NetworkSettings", default)]
    network_settings: Option<SummaryNetworks>,
}

#[derive(Debug, Deserialize)]
struct SummaryNetworks {
    #[serde(rename = "Networks", default)]
    networks: Option<HashMap<String, SummaryEndpoint>>,
}

#[derive(Debug, Deserialize)]
struct SummaryEndpoint {
    #[serde(rename = "IPAddress", default)]
    ip_address: Option<String>,
}

/// Podman's network inspect (libpod), the one field read.
#[derive(Debug, Deserialize)]
struct LibpodNetwork {
    #[serde(default)]
    network_interface: String,
    #[serde(default)]
    driver: String,
}

/// The docker backend's shards through Podman's compatible network API, but whether one is
/// still used is read from the plain-JSON list (a stopped container there would fail
/// bollard's list).
#[async_trait::async_trait]
impl super::ShardedNetworks for PodmanRuntime {
    async fn ensure_shard(&self, base: &str, name: &str) -> Result<()> {
        super::ShardedNetworks::ensure_shard(&self.docker, base, name).await
    }

    async fn address_room(&self, network: &str) -> Result<Option<Option<u32>>> {
        super::ShardedNetworks::address_room(&self.docker, network).await
    }

    async fn shards(&self) -> Result<Vec<(String, String)>> {
        super::ShardedNetworks::shards(&self.docker).await
    }

    async fn remove_if_unused(&self, name: &str) -> Result<bool> {
        let on = self
            .summaries(&serde_json::json!({ "network": [name] }))
            .await?;
        if !on.is_empty() {
            return Ok(false);
        }
        self.docker.remove_network(name).await.map(|()| true)
    }
}

#[async_trait::async_trait]
impl HostRules for PodmanRuntime {
    async fn bridge_of(&self, network: &str) -> Result<String> {
        let body = self
            .raw
            .get(
                "inspect_network",
                &format!("/{LIBPOD}/libpod/networks/{network}/json"),
            )
            .await?;
        let n: LibpodNetwork = serde_json::from_slice(&body).map_err(|e| {
            BackendError::new(
                ErrorKind::Other,
                format!("podman network inspect of `{network}` is not what the API says: {e}"),
            )
        })?;
        if n.driver != "bridge" || n.network_interface.is_empty() {
            return Err(BackendError::new(
                ErrorKind::Refused,
                format!(
                    "network `{network}` uses driver `{}`: egress rules need a bridge network",
                    n.driver
                ),
            ));
        }
        Ok(n.network_interface)
    }

    /// netavark puts its own accept rules at the top of `FORWARD`, above `DOCKER-USER`.
    fn forward_hook(&self) -> &'static str {
        "FORWARD"
    }

    /// netavark inserts its jumps at the top of `FORWARD` on a network's first start (after
    /// its last container stopped, a reboot or a flush).
    fn reorders_on_start(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runc_profiles_run_on_podman() {
        assert_eq!(runtime_refusal(None), None);
        assert_eq!(runtime_refusal(Some("runc")), None);
        let why = runtime_refusal(Some("runsc")).expect("refused");
        assert!(why.contains("runsc") && why.contains("runc"), "{why}");
    }

    #[test]
    fn the_limits_are_the_configured_ones_capped_at_the_hosts() {
        let small = PodmanSettings {
            ulimit_nofile: 100,
            ulimit_nproc: 50,
        };
        assert_eq!(
            ulimits(&small),
            [("nofile".to_string(), 100), ("nproc".to_string(), 50)]
        );
        let huge = PodmanSettings {
            ulimit_nofile: u64::MAX / 2,
            ulimit_nproc: u64::MAX / 2,
        };
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX / 2);
        assert_eq!(ulimits(&huge)[0].1 as u64, hard.min(u64::MAX / 2));
    }

    #[test]
    fn a_listed_container_reads_whatever_its_state() {
        let listed: Vec<Summary> = serde_json::from_str(
            r#"[{"Id":"c1","State":"stopped","Labels":{"sandboxd.instance":"i"},
                 "NetworkSettings":{"Networks":{"sbx":{"IPAddress":"10.89.0.3"}}}},
                {"Id":"c2","State":"running"}]"#,
        )
        .expect("parses");
        assert_eq!(listed[0].state, "stopped");
        assert_eq!(listed[1].labels, None);
    }

    #[test]
    fn a_libpod_network_reads_with_its_bridge() {
        let n: LibpodNetwork = serde_json::from_str(
            r#"{"name":"sbx","id":"2899","driver":"bridge","network_interface":"podman1",
                "subnets":[{"subnet":"10.89.0.0/24","gateway":"10.89.0.1"}]}"#,
        )
        .expect("parses");
        assert_eq!(n.network_interface, "podman1");
        assert_eq!(n.driver, "bridge");
    }
}
