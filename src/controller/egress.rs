//! Keeps the host's egress rules equal to what the live sandboxes' frozen policies ask for
//! (`crate::egress` renders and compares; this decides when). Three moments:
//!
//! - **before a start**: the executor asks for the rules of the new sandbox's network; they
//!   are applied before its container exists (a sandbox never runs unprotected). Cheap when
//!   they were applied and verified within the resync period: no `iptables` call.
//! - **after a pass** (poked by the loop): when the wanted set changed (a network's last
//!   sandbox went), the rules follow.
//! - **every resync period**: the host's copy is read back and repaired if someone changed it
//!   (`sandboxd_egress_repairs_total`).
//!
//! The rules live in the kernel: a restart of sandboxd leaves them in place, and the first
//! reconcile finds them right (or rewrites them in one atomic transaction: no gap).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::supervisor::Engine;
use crate::backend::{HostRules, SharedBackend};
use crate::context::Context;
use crate::domain::spec::ContainerSpec;
use crate::domain::Phase;
use crate::egress::iptables::{self, FirewallError};
use crate::egress::{self as rules, Desired, Ruleset};

/// Why the rules of a start could not be made sure of.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The engine did not answer a network lookup: the executor treats it like any engine
    /// failure (the supervisor reconnects).
    #[error(transparent)]
    Engine(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

#[derive(Default)]
struct Kept {
    /// Network → its bridge interface (looked up again at every verify).
    bridges: HashMap<String, String>,
    /// What the host was last made to have (and found to have), and the policies behind it.
    applied: Option<Ruleset>,
    applied_policies: Desired,
    verified_at: Option<Instant>,
    /// Spec hash → the (network, policy) its spec needs rules for, parsed once.
    specs: HashMap<String, Option<(String, rules::EgressPolicy)>>,
    /// Since when the rows have asked for looser rules than those applied (a network's last
    /// sandbox gone, a PUT to an opener profile). Loosening waits one resync period: the
    /// replaced container may still run meanwhile, and tighter is always safe.
    loosen_pending_since: Option<Instant>,
}

impl Kept {
    /// Whether `bridge`'s rules, verified within `resync`, are at least as strict as `policy`:
    /// then a sandbox needing `policy` may run without touching the host.
    fn trusted(&self, bridge: &str, policy: &rules::EgressPolicy, resync: Duration) -> bool {
        let fresh = self.verified_at.is_some_and(|at| at.elapsed() < resync);
        let covered = self
            .applied_policies
            .get(bridge)
            .is_some_and(|have| &have.strictest(policy) == have);
        fresh && covered
    }
}

pub struct EgressKeeper {
    instance: String,
    /// A shard of a network carries that network's rules (`networks.rs`).
    networks: Arc<super::networks::Networks>,
    /// The store (the rows' specs), metrics, and status (where the last failure is shown).
    ctx: Arc<Context>,
    resync: Duration,
    kept: Mutex<Kept>,
    /// Asks for a reconcile without a read-back (after a pass).
    pub poke: Notify,
    stop: watch::Receiver<bool>,
}

impl EgressKeeper {
    pub fn new(
        ctx: Arc<Context>,
        networks: Arc<super::networks::Networks>,
        resync: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            instance: ctx.settings.controller.instance.clone(),
            networks,
            ctx,
            resync,
            kept: Mutex::default(),
            poke: Notify::new(),
            stop,
        }
    }

    /// Shutting down (or the owner gone): no more writes to the host's rules, so a stopped
    /// sandboxd never changes them after its last word.
    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Runs until shutdown: a verify every resync period, a sync when poked.
    pub async fn run(
        self: Arc<Self>,
        engine: watch::Receiver<Engine>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut next_verify = Instant::now();
        loop {
            let verify = tokio::select! {
                _ = stop.changed() => return,
                _ = self.poke.notified() => false,
                _ = tokio::time::sleep_until(next_verify) => true,
            };
            if verify {
                next_verify = Instant::now() + self.resync;
            }
            let rt = match &*engine.borrow() {
                // In swarm mode sandboxes run on other hosts: no rules here (swarm/placement.rs).
                Engine::Up(rt) => rt.clone(),
                _ => continue,
            };
            let Some(host) = rt.host_rules() else {
                continue;
            };
            let error = match self.reconcile(host, None, verify).await {
                Ok(()) => None,
                Err(e) => {
                    warn!(error = %e, "egress rules: reconcile failed");
                    Some(e.to_string())
                }
            };
            self.ctx.status.update(|h| h.egress_error = error);
        }
    }

    /// After a start on an engine that may have put its rules above sandboxd's jump: when
    /// the jump is no longer first in its forward hook (one chain listed per family), reads
    /// the host back and moves it first again. A failure is the next resync's to mend (and
    /// readiness names it), never a failed start: the sandbox runs already.
    pub async fn after_start(&self, rt: &SharedBackend) {
        let Some(host) = rt.host_rules().filter(|h| h.reorders_on_start()) else {
            return;
        };
        if self.kept.lock().await.applied_policies.is_empty() {
            // No rules applied, so no jump to be put below anything.
            return;
        }
        if self.jumps_are_first(host.forward_hook()).await {
            return;
        }
        if let Err(e) = self.reconcile(host, None, true).await {
            warn!(error = %e, "egress rules: re-check after a start failed");
        }
    }

    /// Whether the instance's jump is first in each family's forward hook (`false` when it
    /// could not be read: the full check decides).
    async fn jumps_are_first(&self, forward: &'static str) -> bool {
        let mut families = vec![rules::Family::V4];
        if iptables::host_has_ipv6() {
            families.push(rules::Family::V6);
        }
        for family in families {
            let [hook, _] = family.hooks(forward);
            if !matches!(
                iptables::jump_is_first(&self.instance, family, hook).await,
                Ok(true)
            ) {
                return false;
            }
        }
        true
    }

    /// Before an existing container runs again (a resume in place): the rules its network
    /// needs are on the host. Its bridge can be taken from what was last looked up: a stopped
    /// container cannot start on a network removed and made again since (its endpoint names
    /// the old network, and the start fails), so a known bridge is still its bridge. Without
    /// one, or when the rules were not verified within the resync period, as a start.
    pub async fn ensure_for_resume(
        &self,
        rt: &SharedBackend,
        spec: &ContainerSpec,
    ) -> Result<(), EgressError> {
        let (Some(policy), Some(_)) = (spec.egress_rules(), rt.host_rules()) else {
            return Ok(());
        };
        {
            let kept = self.kept.lock().await;
            let known = kept.bridges.get(&spec.network);
            if known.is_some_and(|bridge| kept.trusted(bridge, policy, self.resync)) {
                return Ok(());
            }
        }
        self.ensure_for_start(rt, spec).await
    }

    /// Makes sure the rules a sandbox with `spec` needs are on the host, before it starts.
    pub async fn ensure_for_start(
        &self,
        rt: &SharedBackend,
        spec: &ContainerSpec,
    ) -> Result<(), EgressError> {
        // Backends without host rules (swarm: sandboxes run on other hosts) keep none here.
        let (Some(policy), Some(host)) = (spec.egress_rules(), rt.host_rules()) else {
            return Ok(());
        };
        // The network must exist (and its bridge be known) before rules can name it; its
        // bridge is looked up afresh, since a network removed and made again has a new one.
        let bridge = match host.bridge_of(&spec.network).await {
            Ok(b) => b,
            // The engine did not answer: an engine failure (the supervisor reconnects).
            Err(e) if e.unavailable() => return Err(e.into()),
            // Missing (never made, or removed): made now, then looked up.
            Err(_) => {
                rt.ensure_network_named(&spec.network).await?;
                host.bridge_of(&spec.network).await?
            }
        };
        {
            // The usual case: the network's rules are in place and at least as strict.
            let mut kept = self.kept.lock().await;
            kept.bridges.insert(spec.network.clone(), bridge.clone());
            if kept.trusted(&bridge, policy, self.resync) {
                return Ok(());
            }
        }
        Ok(self.reconcile(host, Some(spec), false).await?)
    }

    /// Computes the wanted rules (the live rows, plus `extra`), and brings the host there.
    /// Without `verify`, a set equal to the last one applied within the resync period is
    /// trusted; with it, the host is read back.
    async fn reconcile(
        &self,
        host: &dyn HostRules,
        extra: Option<&ContainerSpec>,
        verify: bool,
    ) -> Result<(), FirewallError> {
        let mut kept = self.kept.lock().await;
        if verify {
            kept.bridges.clear();
        }
        let wanted_by_network = self.wanted(&mut kept.specs, extra).await?;
        let mut pairs = Vec::new();
        let mut missing = std::collections::HashSet::new();
        for (network, policy) in &wanted_by_network {
            if missing.contains(network) {
                continue;
            }
            let bridge = match kept.bridges.get(network) {
                Some(b) => b.clone(),
                None => match host.bridge_of(network).await {
                    Ok(b) => {
                        kept.bridges.insert(network.clone(), b.clone());
                        b
                    }
                    // The sandbox about to start needs it; a missing network of other rows
                    // has no container on it: skip it rather than fail every other network.
                    Err(e) if extra.is_some_and(|x| &x.network == network) => {
                        return Err(FirewallError(format!("network `{network}`: {e}")));
                    }
                    Err(e) => {
                        warn!(network, error = %e, "egress rules: network not found; skipped");
                        missing.insert(network.clone());
                        continue;
                    }
                },
            };
            pairs.push((bridge, policy));
        }
        // Per bridge, strictest (two names of one network, a name and an id, merge too).
        let mut desired = rules::desired(pairs.iter().map(|(b, p)| (b.as_str(), *p)));
        // Looser than what is applied: held for one resync period (see `loosen_pending_since`).
        let loosens = kept.applied_policies.iter().any(|(bridge, have)| {
            desired
                .get(bridge)
                .is_none_or(|want| &want.strictest(have) != want)
        });
        if !loosens {
            kept.loosen_pending_since = None;
        } else {
            let since = *kept.loosen_pending_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.resync {
                for (bridge, have) in &kept.applied_policies {
                    let held = match desired.get(bridge) {
                        Some(want) => want.strictest(have),
                        None => have.clone(),
                    };
                    desired.insert(bridge.clone(), held);
                }
            }
        }
        let wanted = rules::render(&self.instance, &desired, &rules::host_resolvers());
        let fresh = kept
            .verified_at
            .is_some_and(|at| at.elapsed() < self.resync);
        if !verify && fresh && kept.applied.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let mut changed = false;
        let mut repaired = false;
        let v6 = iptables::host_has_ipv6();
        let sets = [
            (rules::Family::V4, wanted.clone(), true),
            (
                rules::Family::V6,
                rules::render_v6(&self.instance, &desired),
                v6,
            ),
        ];
        for (family, set, enabled) in sets {
            if !enabled {
                continue;
            }
            let found = iptables::read(&self.instance, family).await?;
            let hooks = family.hooks(host.forward_hook());
            let changes = rules::diff(&set, &found, desired.is_empty(), hooks);
            if !changes.is_empty() {
                if self.stopping() {
                    return Err(FirewallError("sandboxd is stopping".into()));
                }
                // Rules we had applied and verified were changed behind our back: a repair.
                repaired |= kept.applied.as_ref() == Some(&wanted);
                iptables::apply(&self.instance, &set, &changes, family).await?;
                changed = true;
            }
        }
        if repaired {
            self.ctx.metrics.egress_repairs_total.inc();
            warn!("egress rules were changed on the host; repaired");
        } else if changed {
            info!(networks = desired.len(), "egress rules applied");
        }
        kept.applied = Some(wanted);
        kept.applied_policies = desired;
        kept.verified_at = Some(Instant::now());
        Ok(())
    }

    /// The (network, policy) of every row whose container may run (not expired) and needs
    /// rules, plus the sandbox about to start. Specs are parsed once per spec hash (`specs`
    /// keeps the last call's, so a pass after every create does not parse every row again).
    async fn wanted(
        &self,
        specs: &mut HashMap<String, Option<(String, rules::EgressPolicy)>>,
        extra: Option<&ContainerSpec>,
    ) -> Result<Vec<(String, rules::EgressPolicy)>, FirewallError> {
        let rows = self
            .ctx
            .store
            .all()
            .await
            .map_err(|e| FirewallError(format!("reading the sandboxes: {e}")))?;
        let needs = |s: &ContainerSpec| s.egress_rules().map(|p| (s.network.clone(), p.clone()));
        let mut seen = HashMap::with_capacity(rows.len());
        // Distinct (network, policy) pairs: a handful, however many rows share them.
        let mut out: Vec<(String, rules::EgressPolicy)> = Vec::new();
        fn add(out: &mut Vec<(String, rules::EgressPolicy)>, pair: (String, rules::EgressPolicy)) {
            if !out.contains(&pair) {
                out.push(pair);
            }
        }
        for r in rows.iter().filter(|r| r.phase != Phase::Expired) {
            let entry = match specs.remove(&r.spec_hash) {
                Some(e) => e,
                None => ContainerSpec::from_json(&r.spec_json)
                    .ok()
                    .and_then(|s| needs(&s)),
            };
            if let Some(pair) = entry.clone() {
                add(&mut out, pair);
            }
            seen.insert(r.spec_hash.clone(), entry);
        }
        *specs = seen;
        if let Some(pair) = extra.and_then(needs) {
            add(&mut out, pair);
        }
        // Each network's shards, with its policy (their sandboxes' specs name the base).
        let shards: Vec<(String, rules::EgressPolicy)> = out
            .iter()
            .flat_map(|(network, policy)| {
                self.networks
                    .shards_of(network)
                    .into_iter()
                    .map(move |shard| (shard, policy.clone()))
            })
            .collect();
        for pair in shards {
            add(&mut out, pair);
        }
        Ok(out)
    }
}
