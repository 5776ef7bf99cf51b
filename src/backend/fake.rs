//! An in-memory engine behind the same [`Backend`] seam, for fast unit tests of the
//! controller's moving parts (executor, runner, supervisor, takeover): containers are rows
//! in a map, events a broadcast channel, and faults are injected by the test: an engine
//! that is down, refused creates, a missing image, lost events, slow starts, crashes and
//! hand removals. Of the optional capabilities it offers warm starts when a test asks
//! ([`FakeBackend::offer_warm_starts`]): a member "waits" on its claim FIFO once started, so
//! the pool's claims run their real host side (slot mounts, env file, the `go` signal).
//!
//! Never a stand-in for the real engines in integration tests: those run against Docker,
//! Podman and a swarm.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::error::{BackendError, ErrorKind, Result};
use super::{
    labels, Backend, Connect, EngineEvent, MemberRequest, NameHolder, SharedBackend, StartRequest,
    Started, WarmStarts,
};
use crate::config::Settings;
use crate::domain::{ChatId, SessionId};
use crate::planner::Observed;

/// One container of the fake engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeContainer {
    pub id: String,
    pub name: String,
    /// Labelled for this instance (a foreign container is not).
    pub ours: bool,
    pub chat_id: Option<ChatId>,
    pub session_id: Option<SessionId>,
    pub spec_hash: Option<String>,
    pub image: String,
    pub running: bool,
    /// Frozen by a pause (then `running` is false).
    pub paused: bool,
    pub ip: Option<String>,
    /// Exit code and time, once it stopped.
    pub exit: Option<(i64, DateTime<Utc>)>,
    /// How often it was started.
    pub starts: u32,
    /// A warm pool member's slot.
    pub pool_slot: Option<String>,
    /// The network it was created on.
    pub network: Option<String>,
    /// A member's claim directory on the host (its FIFO `go` is waited on once started).
    pub claim_dir: Option<String>,
}

/// Faults a test turns on.
#[derive(Debug, Default)]
struct Faults {
    /// Every call fails as if the engine did not answer.
    down: bool,
    /// The next this many creates are refused (an engine error, not a taken name).
    refuse_creates: u32,
    /// The next this many starts fail (the container is left created).
    fail_starts: u32,
    /// Images the engine does not have.
    missing_images: HashSet<String>,
    /// Events are not delivered (the loop must converge by listing).
    lose_events: bool,
    /// Each start takes this long.
    start_delay: Duration,
}

#[derive(Debug, Default)]
struct World {
    containers: BTreeMap<String, FakeContainer>,
    next_id: u64,
    faults: Faults,
    /// Calls made, in order (`create`, `start`, `remove`, `list`, …).
    calls: Vec<&'static str>,
    connects: u32,
    /// Addresses handed out (each container keeps its first).
    next_ip: u64,
    /// Warm starts are offered.
    warm: bool,
    /// Started members' claim FIFOs, held open for reading as a member's wrapper does.
    waiting: HashMap<String, std::fs::File>,
    /// Members whose wrapper was told to go.
    signalled: HashSet<String>,
    /// Networks made through [`ShardedNetworks`] or [`FakeBackend::add_network`]: name →
    /// (the addresses of its subnet, the base it is a shard of).
    networks: BTreeMap<String, (Option<u32>, Option<String>)>,
}

/// The fake engine; clones share one world.
#[derive(Clone)]
pub struct FakeBackend {
    instance: String,
    world: Arc<Mutex<World>>,
    events: broadcast::Sender<EngineEvent>,
}

impl FakeBackend {
    pub fn new(instance: &str) -> Self {
        Self {
            instance: instance.to_string(),
            world: Arc::default(),
            events: broadcast::channel(1024).0,
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the call, and fails it when the engine is down.
    fn enter(&self, call: &'static str) -> Result<MutexGuard<'_, World>> {
        let mut w = self.world();
        w.calls.push(call);
        if w.faults.down {
            return Err(BackendError::new(
                ErrorKind::Unavailable,
                format!("fake engine unavailable: {call}"),
            ));
        }
        Ok(w)
    }

    fn emit(&self, action: &str, id: &str, exit_code: Option<i64>) {
        if self.world().faults.lose_events {
            return;
        }
        let _ = self.events.send(EngineEvent {
            at: Utc::now().timestamp(),
            action: action.into(),
            container_id: id.into(),
            exit_code,
        });
    }

    /// A network as an operator made it, holding `room` addresses (`None`: unbounded).
    pub fn add_network(&self, name: &str, room: Option<u32>) {
        self.world().networks.insert(name.to_string(), (room, None));
    }

    /// The networks there are (made by the test or by sandboxd), by name.
    pub fn network_names(&self) -> Vec<String> {
        self.world().networks.keys().cloned().collect()
    }

    /// Containers per network (containers without one left out).
    pub fn containers_per_network(&self) -> BTreeMap<String, usize> {
        let mut per = BTreeMap::new();
        for c in self.world().containers.values() {
            if let Some(n) = &c.network {
                *per.entry(n.clone()).or_default() += 1;
            }
        }
        per
    }

    // Faults.

    /// The engine stops (or starts again) answering.
    pub fn set_down(&self, down: bool) {
        self.world().faults.down = down;
    }

    pub fn refuse_creates(&self, n: u32) {
        self.world().faults.refuse_creates = n;
    }

    pub fn fail_starts(&self, n: u32) {
        self.world().faults.fail_starts = n;
    }

    pub fn set_image_missing(&self, image: &str, missing: bool) {
        let mut w = self.world();
        if missing {
            w.faults.missing_images.insert(image.to_string());
        } else {
            w.faults.missing_images.remove(image);
        }
    }

    pub fn lose_events(&self, lose: bool) {
        self.world().faults.lose_events = lose;
    }

    pub fn slow_starts(&self, delay: Duration) {
        self.world().faults.start_delay = delay;
    }

    /// Offers warm starts (the `WarmStarts` capability).
    pub fn offer_warm_starts(&self) {
        self.world().warm = true;
    }

    // What happens to containers outside sandboxd.

    /// The agent exits with `code` (a `die` event, unless events are lost).
    pub fn crash(&self, id: &str, code: i64) {
        let crashed = {
            let mut w = self.world();
            match w.containers.get_mut(id) {
                Some(c) if c.running => {
                    c.running = false;
                    c.exit = Some((code, Utc::now()));
                    true
                }
                _ => false,
            }
        };
        if crashed {
            self.emit("die", id, Some(code));
        }
    }

    /// Someone removes the container by hand.
    pub fn remove_by_hand(&self, id: &str) {
        if self.world().containers.remove(id).is_some() {
            self.emit("destroy", id, None);
        }
    }

    /// A container of someone else (or of this instance, when `ours`) under `name`.
    pub fn add_container(&self, c: FakeContainer) {
        self.world().containers.insert(c.id.clone(), c);
    }

    // What a test reads.

    pub fn containers(&self) -> Vec<FakeContainer> {
        self.world().containers.values().cloned().collect()
    }

    pub fn running(&self) -> Vec<FakeContainer> {
        self.containers()
            .into_iter()
            .filter(|c| c.running)
            .collect()
    }

    /// How often `call` was made.
    pub fn count(&self, call: &str) -> usize {
        self.world().calls.iter().filter(|c| **c == call).count()
    }

    /// How often the supervisor connected.
    pub fn connects(&self) -> u32 {
        self.world().connects
    }

    /// Whether the member `id` was told to go (a claim's last host-side step): reads what
    /// arrived on its FIFO.
    pub fn signalled(&self, id: &str) -> bool {
        use std::io::Read;
        let mut w = self.world();
        let mut got = [0u8; 16];
        let arrived = w
            .waiting
            .get_mut(id)
            .is_some_and(|fifo| fifo.read(&mut got).is_ok_and(|n| n > 0));
        if arrived {
            w.signalled.insert(id.to_string());
        }
        w.signalled.contains(id)
    }
}

/// Opens a member's FIFO for reading without blocking, as its wrapper would be waiting.
fn wait_on(claim_dir: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::path::Path::new(claim_dir).join("go");
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&fifo)
        .map_err(|e| {
            BackendError::new(
                ErrorKind::Other,
                format!("the member cannot wait on {}: {e}", fifo.display()),
            )
        })
}

#[async_trait::async_trait]
impl Backend for FakeBackend {
    fn describe(&self) -> &'static str {
        "the fake engine"
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        let w = self.enter("list")?;
        Ok(w.containers
            .values()
            .filter(|c| c.ours)
            .map(|c| Observed {
                container_id: c.id.clone(),
                chat_id: c.chat_id,
                session_id: c.session_id,
                spec_hash: c.spec_hash.clone(),
                running: c.running,
                paused: c.paused,
                ip: c.ip.clone(),
                legacy: false,
                pool_slot: c.pool_slot.clone(),
                network: c.network.clone(),
            })
            .collect())
    }

    fn container_name(&self, chat_id: ChatId, session_id: SessionId) -> String {
        labels::container_name(&self.instance, chat_id, session_id)
    }

    async fn create_container(&self, req: &StartRequest<'_>) -> Result<String> {
        let name = self.container_name(req.chat_id, req.session_id);
        let mut w = self.enter("create")?;
        if w.faults.refuse_creates > 0 {
            w.faults.refuse_creates -= 1;
            return Err(BackendError::new(
                ErrorKind::Other,
                "injected failure: create",
            ));
        }
        if w.faults.missing_images.contains(&req.spec.image) {
            return Err(BackendError::new(
                ErrorKind::ImageMissing,
                format!(
                    "image `{}` is not present locally and the pull policy is `never`",
                    req.spec.image
                ),
            ));
        }
        if w.containers.values().any(|c| c.name == name) {
            return Err(BackendError::new(
                ErrorKind::NameTaken,
                format!("the container name {name} is taken"),
            ));
        }
        w.next_id += 1;
        let id = format!("fake{:04}", w.next_id);
        w.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                name,
                ours: true,
                chat_id: Some(req.chat_id),
                session_id: Some(req.session_id),
                spec_hash: Some(req.spec_hash.to_string()),
                image: req.spec.image.clone(),
                network: Some(req.spec.network.clone()),
                ..FakeContainer::default()
            },
        );
        Ok(id)
    }

    async fn name_holder(&self, name: &str) -> Result<NameHolder> {
        let w = self.enter("inspect")?;
        let c = w
            .containers
            .values()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                BackendError::new(ErrorKind::NotFound, format!("no container {name}"))
            })?;
        Ok(NameHolder {
            container_id: c.id.clone(),
            ours: c.ours,
            session_id: c.session_id,
            spec_hash: c.spec_hash.clone(),
        })
    }

    async fn start_container(&self, id: &str, _network: &str, _port: u16) -> Result<Started> {
        let delay = self.enter("start")?.faults.start_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut w = self.enter("start_done")?;
        if w.faults.fail_starts > 0 {
            w.faults.fail_starts -= 1;
            return Err(BackendError::new(
                ErrorKind::Other,
                "injected failure: start",
            ));
        }
        w.next_ip += 1;
        let n = w.next_ip;
        let c = w
            .containers
            .get_mut(id)
            .ok_or_else(|| BackendError::new(ErrorKind::NotFound, format!("no container {id}")))?;
        if c.paused {
            return Err(BackendError::new(
                ErrorKind::Conflict,
                format!("container {id} is paused"),
            ));
        }
        let ip =
            c.ip.get_or_insert_with(|| format!("10.99.{}.{}", n / 250, n % 250 + 2))
                .clone();
        c.running = true;
        c.exit = None;
        c.starts += 1;
        let network = c.network.clone();
        if let Some(dir) = c.claim_dir.clone() {
            let fifo = wait_on(&dir)?;
            w.waiting.insert(id.to_string(), fifo);
        }
        Ok(Started {
            ip,
            host_port: None,
            network,
        })
    }

    async fn ensure_network_named(&self, _network: &str) -> Result<()> {
        self.enter("ensure_network").map(|_| ())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let removed = {
            let mut w = self.enter("remove")?;
            w.waiting.remove(id);
            w.containers.remove(id).is_some()
        };
        if removed {
            self.emit("destroy", id, None);
        }
        Ok(())
    }

    async fn exit_state(&self, id: &str) -> Result<Option<(i64, DateTime<Utc>)>> {
        let w = self.enter("inspect")?;
        Ok(w.containers.get(id).and_then(|c| c.exit))
    }

    async fn profile_problems(&self, _settings: &Settings) -> Result<Vec<String>> {
        self.enter("info").map(|_| Vec::new())
    }

    fn hibernation(&self) -> Option<&dyn super::Hibernation> {
        Some(self)
    }

    fn networks(&self) -> Option<&dyn super::ShardedNetworks> {
        Some(self)
    }

    fn warm(&self) -> Option<&dyn WarmStarts> {
        if self.world().warm {
            Some(self)
        } else {
            None
        }
    }

    fn events(&self, _since: Option<i64>) -> BoxStream<'static, Result<EngineEvent>> {
        let down = self.world().faults.down;
        if down {
            let e = BackendError::new(ErrorKind::Unavailable, "fake engine unavailable: events");
            return futures::stream::iter([Err(e)]).boxed();
        }
        tokio_stream_of(self.events.subscribe())
    }
}

#[async_trait::async_trait]
impl super::Hibernation for FakeBackend {
    async fn pause(&self, id: &str) -> Result<()> {
        let mut w = self.enter("pause")?;
        let c = w
            .containers
            .get_mut(id)
            .ok_or_else(|| BackendError::new(ErrorKind::NotFound, format!("no container {id}")))?;
        if !c.running {
            return Err(BackendError::new(
                ErrorKind::Conflict,
                format!("container {id} is not running"),
            ));
        }
        c.running = false;
        c.paused = true;
        Ok(())
    }

    async fn unpause(&self, id: &str) -> Result<()> {
        let mut w = self.enter("unpause")?;
        let c = w
            .containers
            .get_mut(id)
            .ok_or_else(|| BackendError::new(ErrorKind::NotFound, format!("no container {id}")))?;
        if !c.paused {
            return Err(BackendError::new(
                ErrorKind::Conflict,
                format!("container {id} is not paused"),
            ));
        }
        c.paused = false;
        c.running = true;
        Ok(())
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<()> {
        let stopped = {
            let mut w = self.enter("stop")?;
            let c = w.containers.get_mut(id).ok_or_else(|| {
                BackendError::new(ErrorKind::NotFound, format!("no container {id}"))
            })?;
            let was = c.running || c.paused;
            c.running = false;
            c.paused = false;
            // A stopped container leaves its network: the next start may get another address.
            c.ip = None;
            if was {
                c.exit = Some((143, Utc::now()));
            }
            was
        };
        if stopped {
            self.emit("die", id, Some(143));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl WarmStarts for FakeBackend {
    fn instance(&self) -> &str {
        &self.instance
    }

    async fn image_command(&self, image: &str) -> Result<(Vec<String>, Vec<String>)> {
        let w = self.enter("inspect_image")?;
        if w.faults.missing_images.contains(image) {
            return Err(BackendError::new(
                ErrorKind::ImageMissing,
                format!("no image `{image}`"),
            ));
        }
        Ok((vec!["/agent".into()], Vec::new()))
    }

    async fn create_member(&self, req: &MemberRequest<'_>) -> Result<String> {
        let mut w = self.enter("create_member")?;
        if w.containers.values().any(|c| c.name == req.name) {
            return Err(BackendError::new(
                ErrorKind::NameTaken,
                format!("the container name {} is taken", req.name),
            ));
        }
        w.next_id += 1;
        let id = format!("fake{:04}", w.next_id);
        w.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                name: req.name.to_string(),
                ours: true,
                image: req.spec.image.clone(),
                network: Some(req.spec.network.clone()),
                pool_slot: req.labels.get(labels::POOL_SLOT).cloned(),
                claim_dir: Some(req.claim_dir.0.clone()),
                ..FakeContainer::default()
            },
        );
        Ok(id)
    }
}

#[async_trait::async_trait]
impl super::ShardedNetworks for FakeBackend {
    async fn ensure_shard(&self, base: &str, name: &str) -> Result<()> {
        let mut w = self.enter("ensure_shard")?;
        let room = w.networks.get(base).and_then(|(room, _)| *room);
        w.networks
            .entry(name.to_string())
            .or_insert((room, Some(base.to_string())));
        Ok(())
    }

    async fn address_room(&self, network: &str) -> Result<Option<Option<u32>>> {
        let w = self.enter("inspect_network")?;
        Ok(w.networks.get(network).map(|(room, _)| *room))
    }

    async fn shards(&self) -> Result<Vec<(String, String)>> {
        let w = self.enter("list_networks")?;
        Ok(w.networks
            .iter()
            .filter_map(|(name, (_, base))| Some((name.clone(), base.clone()?)))
            .collect())
    }

    async fn remove_if_unused(&self, name: &str) -> Result<bool> {
        let mut w = self.enter("remove_network")?;
        let used = w
            .containers
            .values()
            .any(|c| c.network.as_deref() == Some(name));
        if !used {
            w.networks.remove(name);
        }
        Ok(!used)
    }
}

/// A broadcast receiver as a stream that ends when the channel closes or lags.
fn tokio_stream_of(
    rx: broadcast::Receiver<EngineEvent>,
) -> BoxStream<'static, Result<EngineEvent>> {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(e) => Some((Ok(e), rx)),
            Err(_) => None,
        }
    })
    .boxed()
}

#[async_trait::async_trait]
impl Connect for FakeBackend {
    async fn connect(&self) -> Result<SharedBackend> {
        let mut w = self.world();
        w.connects += 1;
        if w.faults.down {
            return Err(BackendError::new(
                ErrorKind::Unavailable,
                "cannot connect to the fake engine",
            ));
        }
        Ok(Arc::new(self.clone()))
    }
}
