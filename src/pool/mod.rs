//! Warm starts: containers of the default profile started ahead of need, so a create for a
//! new chat claims one instead of paying a Docker create + start on the request path.
//!
//! Docker cannot add mounts or env to a running container, so what is per chat is bound at
//! claim time (docs/architecture.md, "Warm starts"):
//! - each member sees its slot's `chat/` and `volume/` (host directories under
//!   `warm_pool.root`, a shared mount) at the chat and volume paths, with `rslave`
//!   propagation; a claim bind-mounts the chat directory and the request volume onto them;
//! - the member's entrypoint is a wrapper that waits on a FIFO, then sources the chat's env
//!   (`AGENT_ID` and the configured env) and execs the image's own entrypoint and command, so
//!   the agent starts only after the claim.
//!
//! A claim is durable in steps (`pool_members.state`): `idle` → `claiming` (taken atomically)
//! → mounts, env, go → `claimed`. A member found `claiming` after a restart was never bound
//! completely: it is removed and its chat starts cold. A claimed member is a session's
//! container from then on and never returns to the pool; removing it undoes its mounts.
//! The pool is desired state (`min_idle`, `max`) kept by [`WarmPool::run`], refilled only
//! with a free action slot to spare, so refills never starve cold starts.

pub mod class;
pub mod mounts;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::labels;
use crate::backend::{MemberRequest, SharedBackend, StartRequest};
use crate::config::Settings;
use crate::context::Context;
use crate::controller::networks::Networks;
use crate::controller::Engine;
use crate::domain::spec::{ContainerSpec, MountKind};
use crate::domain::{ChatId, SessionId};
use crate::metrics::{ResultLabel, StateLabel};
use crate::planner::Observed;
use crate::store::{Member, MemberState, SandboxRow};

use mounts::Slot;

/// Whether warm starts can happen, and if not, why (readiness and logs say it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    On,
    Off(String),
}

/// A member claimed for a chat.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub container_id: String,
    pub ip: String,
}

/// What a start got from the pool.
#[derive(Debug)]
pub enum ClaimOutcome {
    Warm(Claimed),
    /// Start cold, for this reason (a metric label: `pool_off`, `pool_empty`, …).
    Cold(&'static str),
}

pub struct WarmPool {
    /// The store, settings, metrics and status (where the pool's mode is shown).
    ctx: Arc<Context>,
    root: PathBuf,
    mode: Mutex<Mode>,
    /// The class members are started with (the default profile's spec, per-chat parts blank).
    class: ContainerSpec,
    class_hash: String,
    /// Slots a claim or a member start is working on now (the reconciler leaves them alone).
    busy: Mutex<HashSet<String>>,
    /// Claimed members' containers → (chat, session), for the pass (`join`).
    claimed: Mutex<HashMap<String, (ChatId, SessionId)>>,
    /// Members found `claiming` or `starting` when this process began: left by the last
    /// one mid-way, so never bound completely. Every other such row is this process's own,
    /// in flight.
    leftover: Mutex<HashSet<String>>,
    /// Member starts in flight (each holds an action slot): counted by the refill, waited
    /// for at stop.
    starts: TaskTracker,
    /// Asks the reconciler to look now (after a claim, a removal).
    pub poke: Notify,
    /// Which network a new member goes on (members count towards a network's limit).
    networks: Arc<Networks>,
}

impl WarmPool {
    /// The pool for these settings (paths already absolute). Off, with the reason, when
    /// `min_idle` is 0, the backend is not a single Docker engine, the default profile needs
    /// another runtime than runc, or this process cannot share mounts.
    pub async fn new(ctx: Arc<Context>, networks: Arc<Networks>) -> Self {
        let settings = &ctx.settings;
        let s = &settings.sandbox;
        let placeholder = ChatId(uuid::Uuid::nil());
        let spec = crate::config::spec::resolve(s, placeholder, "", Path::new(""), None);
        let class = class::class_of(&spec);
        let class_hash = class.hash();
        let root = settings.warm_pool.root.clone();
        let mode = Self::decide(settings, &class, &root);
        match &mode {
            Mode::On => info!(
                min_idle = settings.warm_pool.min_idle,
                max = settings.warm_pool.max,
                "warm pool on"
            ),
            Mode::Off(why) => info!("warm pool off: {why}"),
        }
        // Claimed members are sessions' containers: known before the first pass plans, so a
        // restart adopts them instead of starting their chats again.
        let members = ctx.store.pool_members().await.unwrap_or_else(|e| {
            warn!(error = %e, "warm pool: cannot read members");
            Vec::new()
        });
        let claimed = members
            .iter()
            .filter(|m| m.state == MemberState::Claimed)
            .filter_map(|m| Some((m.container_id.clone()?, (m.chat_id?, m.session_id?))))
            .collect();
        let leftover = members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Claiming | MemberState::Starting))
            .map(|m| m.slot.clone())
            .collect();
        Self {
            ctx,
            networks,
            root,
            mode: Mutex::new(mode),
            class,
            class_hash,
            busy: Mutex::default(),
            claimed: Mutex::new(claimed),
            leftover: Mutex::new(leftover),
            starts: TaskTracker::new(),
            poke: Notify::new(),
        }
    }

    fn decide(settings: &Settings, class: &ContainerSpec, root: &Path) -> Mode {
        if settings.warm_pool.min_idle == 0 {
            return Mode::Off("warm_pool.min_idle is 0".into());
        }
        if class.runtime().is_some_and(|r| r != "runc") {
            return Mode::Off(format!(
                "the default profile runs under {}; mount propagation into a member needs runc",
                class.runtime().unwrap_or_default()
            ));
        }
        if let Some(problem) = class::env_problem(&class.env) {
            return Mode::Off(problem);
        }
        if let Err(e) = std::fs::create_dir_all(root) {
            return Mode::Off(format!("warm_pool.root {}: {e}", root.display()));
        }
        match mounts::can_share_mounts(root) {
            Ok(()) => Mode::On,
            Err(e) => Mode::Off(format!(
                "this process cannot make shared mounts under {} ({e}); run sandboxd as root \
                 (in a container: privileged, with the root mounted rshared)",
                root.display()
            )),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn on(&self) -> bool {
        self.mode() == Mode::On
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ChatId, SessionId)>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the pass what claimed members are: the chat, session and (from the chat's row)
    /// spec of each; every other member is the pool's and is left out of the plan.
    pub fn join(&self, observed: &mut Vec<Observed>, rows: &[SandboxRow]) {
        if !observed.iter().any(|o| o.pool_slot.is_some()) {
            return;
        }
        let claimed = self.claimed();
        // Indexed once per pass: a busy pool may have as many claimed members as rows.
        let specs: HashMap<(ChatId, SessionId), &str> = rows
            .iter()
            .map(|r| ((r.chat_id, r.session_id), r.spec_hash.as_str()))
            .collect();
        observed.retain_mut(|o| {
            if o.pool_slot.is_none() {
                return true;
            }
            let Some((chat, session)) = claimed.get(&o.container_id).copied() else {
                return false;
            };
            o.chat_id = Some(chat);
            o.session_id = Some(session);
            o.spec_hash = specs.get(&(chat, session)).map(|h| h.to_string());
            true
        });
    }

    /// Takes an idle member for the session and binds it (mounts, env, go), or says why the
    /// start goes cold. Never half-bound: a failed step undoes the claim and removes the
    /// member.
    pub async fn claim(&self, rt: &SharedBackend, req: &StartRequest<'_>) -> ClaimOutcome {
        let outcome = self.try_claim(rt, req).await;
        let label = match &outcome {
            ClaimOutcome::Warm(_) => "warm",
            ClaimOutcome::Cold(why) => why,
        };
        self.ctx
            .metrics
            .starts_total
            .get_or_create(&ResultLabel { result: label })
            .inc();
        // The pool changed (or ran dry): the reconciler refills. Other cold starts leave it.
        if matches!(
            outcome,
            ClaimOutcome::Warm(_) | ClaimOutcome::Cold("pool_empty" | "claim_failed")
        ) {
            self.poke.notify_one();
        }
        outcome
    }

    async fn try_claim(&self, rt: &SharedBackend, req: &StartRequest<'_>) -> ClaimOutcome {
        if !self.on() || rt.warm().is_none() {
            return ClaimOutcome::Cold("pool_off");
        }
        if class::class_hash(req.spec) != self.class_hash {
            return ClaimOutcome::Cold("class_mismatch");
        }
        let (Some(chat_dir), Some(volume)) = (
            source_of(req.spec, MountKind::Chat),
            source_of(req.spec, MountKind::Volume),
        ) else {
            return ClaimOutcome::Cold("class_mismatch");
        };
        let member = match self
            .ctx
            .store
            .pool_take(&self.class_hash, req.chat_id, req.session_id, Utc::now())
            .await
        {
            Ok(Some(m)) => m,
            Ok(None) => return ClaimOutcome::Cold("pool_empty"),
            Err(e) => {
                warn!(error = %e, "warm pool: cannot take a member");
                return ClaimOutcome::Cold("pool_error");
            }
        };
        self.busy().insert(member.slot.clone());
        let result = self.bind(&member, &chat_dir, &volume, req).await;
        let outcome = match result {
            Ok(claimed) => {
                self.claimed()
                    .insert(claimed.container_id.clone(), (req.chat_id, req.session_id));
                ClaimOutcome::Warm(claimed)
            }
            Err(why) => {
                warn!(slot = %member.slot, chat_id = %req.chat_id, error = %why, "warm claim failed; the member goes and the chat starts cold");
                self.discard(rt, &member).await;
                ClaimOutcome::Cold("claim_failed")
            }
        };
        self.busy().remove(&member.slot);
        outcome
    }

    /// The claim's steps after the member was taken.
    async fn bind(
        &self,
        member: &Member,
        chat_dir: &Path,
        volume: &Path,
        req: &StartRequest<'_>,
    ) -> Result<Claimed, String> {
        let (Some(container_id), Some(ip)) = (&member.container_id, &member.endpoint_ip) else {
            return Err("the member has no container".into());
        };
        let slot = Slot::new(&self.root, &member.slot);
        slot.bind(chat_dir, volume).map_err(|e| e.to_string())?;
        let env = slot.claim().join("env");
        std::fs::write(&env, class::env_script(&req.spec.env))
            .map_err(|e| format!("writing {}: {e}", env.display()))?;
        go(&slot.claim().join("go"))?;
        self.ctx
            .store
            .pool_claimed(&member.slot, Utc::now())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Claimed {
            container_id: container_id.clone(),
            ip: ip.clone(),
        })
    }

    /// Removes a member's container, undoes its mounts and forgets it.
    async fn discard(&self, rt: &SharedBackend, member: &Member) {
        if let Some(id) = &member.container_id {
            if let Err(e) = rt.remove(id).await {
                warn!(container_id = %id, error = %e, "warm pool: cannot remove a member; the next look tries again");
                return;
            }
            self.claimed().remove(id);
        }
        self.forget(&member.slot).await;
    }

    async fn forget(&self, slot: &str) {
        if let Err(e) = Slot::new(&self.root, slot).remove() {
            warn!(slot, error = %e, "warm pool: cannot undo a slot's mounts; the next look tries again");
            return;
        }
        if let Err(e) = self.ctx.store.pool_delete(slot).await {
            warn!(slot, error = %e, "warm pool: cannot forget a member");
        }
    }

    /// A container the executor removed: if it was a claimed member, its mounts go too.
    pub async fn removed(&self, container_id: &str) {
        let was_claimed = self.claimed().remove(container_id).is_some();
        if !was_claimed {
            return;
        }
        match self.ctx.store.pool_members().await {
            Ok(members) => {
                for m in members
                    .iter()
                    .filter(|m| m.container_id.as_deref() == Some(container_id))
                {
                    self.forget(&m.slot).await;
                }
            }
            Err(e) => warn!(error = %e, "warm pool: cannot read members"),
        }
        self.poke.notify_one();
    }

    /// Keeps the pool: a look every resync period and when poked. `permits` are the
    /// controller's action slots: a refill takes one only while another stays free.
    pub async fn run(
        self: Arc<Self>,
        engine: watch::Receiver<Engine>,
        permits: Arc<Semaphore>,
        egress: Arc<crate::controller::EgressKeeper>,
        mut stop: watch::Receiver<bool>,
    ) {
        let resync = Duration::from_secs(self.ctx.settings.sandbox.cleanup_interval_seconds);
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = self.poke.notified() => {}
                    _ = tokio::time::sleep(resync) => {}
                }
            }
            if *stop.borrow() {
                break;
            }
            let up = match &*engine.borrow() {
                Engine::Up(rt) => Some(rt.clone()),
                _ => None,
            };
            let Some(rt) = up else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if rt.warm().is_none() && self.on() {
                let why = format!("{} offers no warm starts", rt.describe());
                info!("warm pool off: {why}");
                self.ctx
                    .status
                    .update(|h| h.warm_pool = format!("off: {why}"));
                *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = Mode::Off(why);
            }
            if let Err(e) = self.look(&rt, first).await {
                warn!(error = %e, "warm pool: look failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            first = false;
            if self.on() {
                self.refill(&rt, &permits, &egress).await;
            }
        }
        // Member starts in flight finish (each is a create and a start): none is left
        // half-made by a stop, and none is made after it.
        self.starts.close();
        self.starts.wait().await;
    }

    /// Brings the members in line with their containers: half-bound claims and dead or
    /// outdated members go, orphan member containers go, claimed ones are remembered.
    async fn look(&self, rt: &SharedBackend, first: bool) -> Result<(), String> {
        let members = self
            .ctx
            .store
            .pool_members()
            .await
            .map_err(|e| e.to_string())?;
        if !first && !self.on() && members.is_empty() {
            // Off, and nothing of an earlier run's pool left (the first look removed it).
            return Ok(());
        }
        let containers: HashMap<String, Observed> = rt
            .list_members()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|o| o.pool_slot.clone().map(|s| (s, o)))
            .collect();
        let busy = self.busy().clone();
        let leftover = self.leftover.lock().map(|l| l.clone()).unwrap_or_default();
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for m in &members {
            let running = containers.get(&m.slot).is_some_and(|c| c.running);
            let stale = match m.state {
                _ if busy.contains(&m.slot) => false,
                // Left mid-way by the last process: never bound completely (a claim's chat
                // starts cold) or never idle.
                MemberState::Claiming | MemberState::Starting => leftover.contains(&m.slot),
                MemberState::Idle => !running || m.class_hash != self.class_hash,
                MemberState::Claimed => !containers.contains_key(&m.slot),
            };
            if stale {
                info!(slot = %m.slot, state = m.state.as_str(), "warm pool: removing a member");
                self.discard(rt, m).await;
                if let Ok(mut l) = self.leftover.lock() {
                    l.remove(&m.slot);
                }
                continue;
            }
            if m.state == MemberState::Claimed {
                if let (Some(id), Some(chat), Some(session)) =
                    (&m.container_id, m.chat_id, m.session_id)
                {
                    self.claimed().insert(id.clone(), (chat, session));
                }
            }
            *counts.entry(m.state.as_str()).or_default() += 1;
        }
        for state in ["starting", "idle", "claimed"] {
            self.ctx
                .metrics
                .pool_members
                .get_or_create(&StateLabel { state })
                .set(counts.get(state).copied().unwrap_or(0));
        }
        let known: HashSet<&str> = members.iter().map(|m| m.slot.as_str()).collect();
        for (slot, c) in &containers {
            if !known.contains(slot.as_str()) && !busy.contains(slot) {
                info!(slot, container_id = %c.container_id, "warm pool: removing a member no row knows");
                if rt.remove(&c.container_id).await.is_ok() {
                    if let Err(e) = Slot::new(&self.root, slot).remove() {
                        warn!(slot, error = %e, "warm pool: cannot undo a slot's mounts");
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts members until `min_idle` are idle or starting (at most `max`), each with an
    /// action slot to spare. The starts run on their own and poke the pool when done, so a
    /// claim during a refill is answered by the next one at once.
    async fn refill(
        self: &Arc<Self>,
        rt: &SharedBackend,
        permits: &Arc<Semaphore>,
        egress: &Arc<crate::controller::EgressKeeper>,
    ) {
        // Starts in flight are counted before the rows are read: a start that turns its row
        // idle between the two reads is then counted twice (one start too few, made up by the
        // poke its end sends), never in neither (one member past `max`).
        let in_flight = self.starts.len();
        let members = match self.ctx.store.pool_members().await {
            Ok(m) => m,
            Err(e) => return warn!(error = %e, "warm pool: cannot read members"),
        };
        let idle = members
            .iter()
            .filter(|m| m.state == MemberState::Idle)
            .count();
        let waiting = idle + in_flight;
        let want = self
            .ctx
            .settings
            .warm_pool
            .min_idle
            .min(self.ctx.settings.warm_pool.max)
            .saturating_sub(waiting);
        if want == 0 {
            return;
        }
        for _ in 0..want {
            if permits.available_permits() < 2 {
                break;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let slot = uuid::Uuid::new_v4().simple().to_string();
            self.busy().insert(slot.clone());
            let (rt, egress, pool) = (rt.clone(), egress.clone(), self.clone());
            self.starts.spawn(async move {
                let _permit = permit;
                let result = pool.start_member(&slot, &rt, &egress).await;
                if result.is_err() {
                    // Whatever it got to (a row, a slot, a container) goes.
                    let member = pool
                        .ctx
                        .store
                        .pool_members()
                        .await
                        .ok()
                        .and_then(|ms| ms.into_iter().find(|m| m.slot == slot));
                    match member {
                        Some(m) => pool.discard(&rt, &m).await,
                        None => {
                            let _ = Slot::new(&pool.root, &slot).remove();
                        }
                    }
                }
                pool.busy().remove(&slot);
                // More may be wanted (slots were short, or members were claimed meanwhile).
                match result {
                    Ok(()) => pool.poke.notify_one(),
                    Err(e) => {
                        warn!(slot, error = %e, "warm pool: a member failed to start");
                        // Not at once again: a failing start (a missing image) waits a
                        // moment, outside the starts a stop waits for.
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            pool.poke.notify_one();
                        });
                    }
                }
            });
        }
    }
}

/// The chat directory or the volume of a spec.
fn source_of(spec: &ContainerSpec, kind: MountKind) -> Option<PathBuf> {
    spec.mounts
        .iter()
        .find(|m| m.kind == kind)
        .map(|m| PathBuf::from(&m.source))
}

/// Tells the member to go: one line on its FIFO. Opened without blocking, so a member whose
/// wrapper is gone (no reader) is an error at once, not a hang.
fn go(fifo: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(fifo)
        .map_err(|e| format!("the member is not waiting ({}): {e}", fifo.display()))?;
    f.write_all(b"go\n")
        .map_err(|e| format!("signalling {}: {e}", fifo.display()))
}

impl WarmPool {
    /// Starts one member: its row (`starting`), its slot, its container (the class spec,
    /// the slot's directories at the chat and volume paths, the wrapper), then `idle`.
    async fn start_member(
        &self,
        slot_id: &str,
        rt: &SharedBackend,
        egress: &Arc<crate::controller::EgressKeeper>,
    ) -> Result<(), String> {
        let slot = Slot::new(&self.root, slot_id);
        self.ctx
            .store
            .pool_insert(slot_id, &self.class_hash, Utc::now())
            .await
            .map_err(|e| e.to_string())?;
        slot.prepare().map_err(|e| e.to_string())?;
        let mut spec = self.class.clone();
        for m in &mut spec.mounts {
            match m.kind {
                MountKind::Chat => m.source = slot.chat().display().to_string(),
                MountKind::Volume => m.source = slot.volume().display().to_string(),
                _ => {}
            }
        }
        // A network with room, as for a cold start (members count towards it too).
        let placement = self
            .networks
            .place(rt, &spec.network)
            .await
            .map_err(|e| e.to_string())?;
        spec.network = placement.network.clone();
        egress
            .ensure_for_start(rt, &spec)
            .await
            .map_err(|e| e.to_string())?;
        let warm = rt
            .warm()
            .ok_or_else(|| format!("{} offers no warm starts", rt.describe()))?;
        let (entrypoint, cmd) = warm
            .image_command(&spec.image)
            .await
            .map_err(|e| e.to_string())?;
        let (entrypoint, cmd) = class::wrapped_command(&entrypoint, &cmd)
            .ok_or_else(|| format!("image {} has no entrypoint or command", spec.image))?;
        let name = format!("sandboxd-{}-pool-{slot_id}", warm.instance());
        let member = MemberRequest {
            name: &name,
            spec: &spec,
            labels: HashMap::from([
                (labels::MANAGED.to_string(), "true".to_string()),
                (labels::INSTANCE.to_string(), warm.instance().to_string()),
                (labels::POOL_SLOT.to_string(), slot_id.to_string()),
                (labels::POOL_CLASS.to_string(), self.class_hash.clone()),
            ]),
            entrypoint,
            cmd,
            propagated: vec![
                slot.chat().display().to_string(),
                slot.volume().display().to_string(),
            ],
            claim_dir: (
                slot.claim().display().to_string(),
                class::CLAIM_DIR.to_string(),
            ),
        };
        let id = warm
            .create_member(&member)
            .await
            .map_err(|e| e.to_string())?;
        placement.created(&id);
        self.ctx
            .store
            .pool_created(slot_id, &id, Utc::now())
            .await
            .map_err(|e| e.to_string())?;
        let started = rt
            .start_container(&id, &spec.network, spec.agent_port)
            .await
            .map_err(|e| e.to_string())?;
        self.ctx
            .store
            .pool_idle(slot_id, &started.ip, Utc::now())
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
