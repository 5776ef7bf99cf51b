//! Where a new container goes: sandbox networks fill up.
//!
//! A Linux bridge has 1,024 ports, so one Docker bridge network refuses its 1,024th
//! container, and a network's subnet may hold fewer addresses still (Podman's default /24:
//! 253). A profile's network (the *base*) takes containers up to `sandbox.network_capacity`
//! (or its subnet's room, the smaller); past that, new ones go on `<base>-1`, `<base>-2`, …,
//! each made with the base's settings (the backend's [`ShardedNetworks`]), labelled as this
//! instance's shard, and removed once nothing is on it. With `sandbox.network_sharding` off,
//! a start past the limit fails naming it.
//!
//! Counts come from the pass's containers ([`Networks::observe`], every state: a hibernated
//! container comes back on its network) plus what was placed since and not yet seen in one,
//! so concurrent starts and warm-pool refills never overfill a network. Placing is one at a
//! time (a network is made at most once), and a prune takes the same turn, so a network is
//! never removed under a start that chose it.
//!
//! Egress rules follow: a shard carries its base's policy (`EgressKeeper` asks
//! [`Networks::shards_of`]), applied before its first sandbox starts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::backend::{BackendError, ShardedNetworks, SharedBackend};
use crate::planner::Observed;

/// Placed containers the loop's copy never showed are forgotten after this (removed before
/// any list saw them); until then they count, which only ever errs towards the next network.
const UNSEEN_FOR: Duration = Duration::from_secs(600);

/// Shards per base network at most (`<base>-1` … `<base>-63`): 64 networks of 1,023.
const MAX_SHARDS: u32 = 63;

/// Why no network could take a new container.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(
        "network `{network}` is full: {count} containers of this instance on it, its limit is \
         {limit} ({why}); with sandbox.network_sharding: true further sandboxes go on \
         `{network}-1`, `{network}-2`, …"
    )]
    Full {
        network: String,
        count: u32,
        limit: u32,
        why: &'static str,
    },
    #[error(
        "networks `{base}` to `{base}-{MAX_SHARDS}` are all full ({limit} containers each at most)"
    )]
    AllFull { base: String, limit: u32 },
    #[error(transparent)]
    Engine(#[from] BackendError),
}

/// The networks this instance places containers on, and what is on them.
pub struct Networks {
    capacity: u32,
    sharding: bool,
    state: Mutex<State>,
    /// One placement (or prune) at a time.
    turn: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Container → its network, from the last pass.
    seen: HashMap<String, String>,
    /// Containers per network, from `seen`.
    counts: HashMap<String, u32>,
    /// Placed and not yet seen in a pass, by token.
    placed: HashMap<u64, Placed>,
    next_token: u64,
    /// The addresses a network's subnets give containers, once looked up (`None`: unbounded).
    room: HashMap<String, Option<u32>>,
    /// This instance's shard networks (name → base); `None` until listed from the engine.
    shards: Option<BTreeMap<String, String>>,
}

struct Placed {
    network: String,
    container: Option<String>,
    /// When it was placed, then when its container was made.
    at: Instant,
}

impl State {
    fn count(&self, network: &str) -> u32 {
        let placed = self
            .placed
            .values()
            .filter(|p| p.network == network)
            .count();
        self.counts.get(network).copied().unwrap_or(0) + placed as u32
    }
}

/// A network chosen for one container. Dropped before [`Placement::created`], the place is
/// given back; after it, the container counts until a pass sees it.
pub struct Placement<'a> {
    owner: &'a Networks,
    token: u64,
    pub network: String,
}

impl Placement<'_> {
    /// The container now exists on the network.
    pub fn created(&self, container_id: &str) {
        let mut state = self.owner.lock();
        if let Some(p) = state.placed.get_mut(&self.token) {
            p.container = Some(container_id.to_string());
            p.at = Instant::now();
        }
    }
}

impl Drop for Placement<'_> {
    fn drop(&mut self) {
        let mut state = self.owner.lock();
        if state
            .placed
            .get(&self.token)
            .is_some_and(|p| p.container.is_none())
        {
            state.placed.remove(&self.token);
        }
    }
}

/// The name of a base network's `index`th shard (0: the base itself).
pub fn shard_name(base: &str, index: u32) -> String {
    match index {
        0 => base.to_string(),
        n => format!("{base}-{n}"),
    }
}

impl Networks {
    pub fn new(capacity: u32, sharding: bool) -> Self {
        Self {
            capacity: capacity.max(1),
            sharding,
            state: Mutex::default(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The containers of a pass, in any state: listed from the engine by a list that began
    /// at `listed_at` (then a container created before it and not in it is gone), or the
    /// loop's copy (`None`), which lacks the pool's newest members.
    pub fn observe(&self, observed: &[Observed], listed_at: Option<Instant>) {
        let mut state = self.lock();
        let seen: HashMap<String, String> = observed
            .iter()
            .filter_map(|o| Some((o.container_id.clone(), o.network.clone()?)))
            .collect();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for network in seen.values() {
            *counts.entry(network.clone()).or_default() += 1;
        }
        state.placed.retain(|_, p| match &p.container {
            Some(id) if seen.contains_key(id) => false,
            Some(_) if listed_at.is_some_and(|t| p.at < t) => false,
            Some(_) => p.at.elapsed() < UNSEEN_FOR,
            None => true,
        });
        state.seen = seen;
        state.counts = counts;
    }

    /// The network a container is on, as last seen or placed.
    pub fn network_of(&self, container_id: &str) -> Option<String> {
        let state = self.lock();
        state.seen.get(container_id).cloned().or_else(|| {
            state
                .placed
                .values()
                .find(|p| p.container.as_deref() == Some(container_id))
                .map(|p| p.network.clone())
        })
    }

    /// The shards of `base` this instance made (or found made), for its egress rules.
    pub fn shards_of(&self, base: &str) -> Vec<String> {
        let state = self.lock();
        state
            .shards
            .iter()
            .flatten()
            .filter(|(_, b)| b.as_str() == base)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Chooses the network for a new container of a profile whose network is `base`: the
    /// first of `base`, `base-1`, … with room, made when it does not exist yet.
    pub async fn place(&self, rt: &SharedBackend, base: &str) -> Result<Placement<'_>, PlaceError> {
        let Some(nets) = rt.networks() else {
            // The engine places (swarm's overlay networks): nothing to count here.
            return Ok(self.reserve(base));
        };
        let _turn = self.turn.lock().await;
        self.discover(nets).await?;
        for index in 0..=MAX_SHARDS {
            let name = shard_name(base, index);
            if index > 0 && !self.is_shard(&name) {
                if !self.sharding {
                    break;
                }
                nets.ensure_shard(base, &name).await?;
                info!(network = %name, base, "created a further sandbox network: the ones before it are full");
                self.lock()
                    .shards
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name.clone(), base.to_string());
            }
            let (limit, why) = self.limit_of(nets, &name).await?;
            let count = self.lock().count(&name);
            if count < limit {
                return Ok(self.reserve(&name));
            }
            if !self.sharding {
                return Err(PlaceError::Full {
                    network: name,
                    count,
                    limit,
                    why,
                });
            }
        }
        Err(PlaceError::AllFull {
            base: base.to_string(),
            limit: self.capacity,
        })
    }

    fn reserve(&self, network: &str) -> Placement<'_> {
        let mut state = self.lock();
        state.next_token += 1;
        let token = state.next_token;
        state.placed.insert(
            token,
            Placed {
                network: network.to_string(),
                container: None,
                at: Instant::now(),
            },
        );
        Placement {
            owner: self,
            token,
            network: network.to_string(),
        }
    }

    fn is_shard(&self, name: &str) -> bool {
        self.lock()
            .shards
            .as_ref()
            .is_some_and(|s| s.contains_key(name))
    }

    /// The shards made before (by an earlier run), listed once.
    async fn discover(&self, nets: &dyn ShardedNetworks) -> Result<(), BackendError> {
        if self.lock().shards.is_some() {
            return Ok(());
        }
        let found: BTreeMap<String, String> = nets.shards().await?.into_iter().collect();
        self.lock().shards = Some(found);
        Ok(())
    }

    /// How many containers `network` takes: the configured capacity, or its subnet's room
    /// when that is smaller.
    async fn limit_of(
        &self,
        nets: &dyn ShardedNetworks,
        network: &str,
    ) -> Result<(u32, &'static str), BackendError> {
        let known = self.lock().room.get(network).copied();
        let room = match known {
            Some(room) => room,
            None => {
                let room = nets.address_room(network).await?;
                // A network not made yet (the create makes it) is asked again next time.
                if let Some(room) = room {
                    self.lock().room.insert(network.to_string(), room);
                }
                room.flatten()
            }
        };
        Ok(match room {
            Some(r) if r < self.capacity => (r, "the addresses of its subnet"),
            _ => (self.capacity, "sandbox.network_capacity"),
        })
    }

    /// Removes this instance's shards that nothing is on (after a listed pass: the counts
    /// are the engine's). The engine is asked once more per empty shard: a container of
    /// another instance, or of none, keeps it.
    pub async fn prune(&self, rt: &SharedBackend) {
        let Some(nets) = rt.networks() else {
            return;
        };
        let _turn = self.turn.lock().await;
        if let Err(e) = self.discover(nets).await {
            warn!(error = %e, "sandbox networks: listing the shards failed");
            return;
        }
        let empty: Vec<String> = {
            let state = self.lock();
            state
                .shards
                .iter()
                .flatten()
                .map(|(name, _)| name)
                .filter(|name| state.count(name) == 0)
                .cloned()
                .collect()
        };
        for name in empty {
            match nets.remove_if_unused(&name).await {
                Ok(true) => {
                    info!(network = %name, "removed an empty sandbox network");
                    let mut state = self.lock();
                    if let Some(s) = state.shards.as_mut() {
                        s.remove(&name);
                    }
                    state.room.remove(&name);
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(network = %name, error = %e, "removing an empty sandbox network failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
