//! The level-triggered control loop, after kube-runtime's split:
//!
//! - [`scheduler`]: every trigger (an API write, a Docker event, an action that finished, an
//!   expiry or `next_attempt_at` deadline, a failed action's retry time, the resync tick, a
//!   (re)connect) is the same request, "reconcile this key (or all) at time T", de-duplicated
//!   with the earliest time winning.
//! - [`runner`]: at most one action per key, at most `controller.max_concurrent_actions` at
//!   once; hands back what a finished action still needs as a new request.
//! - [`supervisor`]: the engine connection (connect with backoff, events, reconnects).
//! - [`Controller::run`]: the wiring. When a request falls due, one pass re-reads the whole
//!   truth (every row, every labelled container), asks the pure planner what to do, and offers
//!   the actions to the runner. Missing a trigger delays convergence; it never breaks it.

pub mod backoff;
mod deaths;
mod egress;
mod executor;
mod images;
pub(crate) mod networks;
mod observed;
mod runner;
mod scheduler;
mod status;
mod supervisor;
mod takeover;

pub use egress::EgressKeeper;
pub use status::{ControllerStatus, Health};
pub use supervisor::Engine;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backend::SharedBackend;
use crate::context::Context;
use crate::metrics::{PhaseLabel, StateLabel};
use crate::planner::{self, Action, Key};
use backoff::BackoffPolicy;
use executor::Executor;
use observed::ObservedCache;
use runner::{Offer, Runner};
use scheduler::{Reason, Scheduler, Target};
use supervisor::Supervisor;

/// What the loop works with; built once in `app.rs`.
pub struct Controller {
    /// The store, settings, metrics and status the process shares.
    pub ctx: Arc<Context>,
    /// Makes the backend: the settings' engine, or the fake in unit tests.
    pub connector: Arc<dyn crate::backend::Connect>,
}

/// Housekeeping between passes: retention hourly, and a re-read of the table every resync
/// period (the in-memory rows are kept current by the store's own writes; this bounds any
/// divergence, such as a row edited by hand, to one period).
struct Upkeep {
    resync: Duration,
    next_prune: Instant,
    next_reload: Instant,
}

impl Upkeep {
    fn new(resync: Duration) -> Self {
        Self {
            resync,
            next_prune: Instant::now(),
            next_reload: Instant::now() + resync,
        }
    }

    async fn run(&mut self, c: &Controller) {
        let now = Instant::now();
        if now >= self.next_prune {
            c.prune().await;
            self.next_prune = now + Duration::from_secs(3600);
        }
        if now >= self.next_reload {
            if let Err(e) = c.ctx.store.reload_mirror().await {
                warn!(error = %e, "re-reading the sandboxes table failed");
            }
            crate::storage::reconcile::figures(&c.ctx.store, &c.ctx.storage, &c.ctx.metrics).await;
            self.next_reload = now + self.resync;
        }
    }
}

impl Controller {
    fn backoff(&self) -> BackoffPolicy {
        let c = &self.ctx.settings.controller;
        BackoffPolicy {
            initial: Duration::from_millis(c.backoff_initial_ms),
            max: Duration::from_secs(c.backoff_max_seconds),
        }
    }

    /// Runs until `shutdown` turns true; in-flight actions get a bounded grace period.
    ///
    /// Every trigger becomes a request to the scheduler; when one falls due, one pass plans
    /// over everything and the runner starts what is not already running.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let resync = Duration::from_secs(self.ctx.settings.sandbox.cleanup_interval_seconds);
        let policy = self.backoff();
        let deaths = Arc::new(deaths::RecentDeaths::default());
        let observed = Arc::new(ObservedCache::default());
        let images = Arc::new(images::AppearedImages::default());
        let engine_changed = Arc::new(Notify::new());
        let mut engine = Supervisor::spawn(
            self.supervisor_parts(&deaths, &engine_changed, &images),
            shutdown.clone(),
        );
        let s = &self.ctx.settings.sandbox;
        let networks = Arc::new(networks::Networks::new(
            s.network_capacity,
            s.network_sharding,
        ));
        let egress = Arc::new(egress::EgressKeeper::new(
            self.ctx.clone(),
            networks.clone(),
            resync,
            shutdown.clone(),
        ));
        let egress_task = tokio::spawn(egress.clone().run(engine.state.clone(), shutdown.clone()));
        let mut runner = Runner::new(self.ctx.settings.controller.max_concurrent_actions, policy);
        let pool = Arc::new(crate::pool::WarmPool::new(self.ctx.clone(), networks.clone()).await);
        let mode = match pool.mode() {
            crate::pool::Mode::On => "on".into(),
            crate::pool::Mode::Off(why) => format!("off: {why}"),
        };
        self.ctx.status.update(|h| h.warm_pool = mode);
        let pool_task = tokio::spawn(pool.clone().run(
            engine.state.clone(),
            runner.permits(),
            egress.clone(),
            shutdown.clone(),
        ));
        let mut scheduler = Scheduler::default();
        let mut upkeep = Upkeep::new(resync);
        let mut pass_failures = 0u32;
        // After failed passes, no pass before this, whatever asks: backoff, not a hot loop.
        let mut passes_not_before = Instant::now();
        scheduler.schedule(Target::All, Instant::now(), Reason::Connected);
        // The actions' executor, built once per connection (it holds the backend).
        let mut executor: Option<Arc<Executor>> = None;

        loop {
            let next = scheduler
                .next_due()
                .unwrap_or_else(|| Instant::now() + resync)
                .max(passes_not_before);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.ctx.wake.notified() => {
                    scheduler.schedule(Target::All, Instant::now(), Reason::Changed);
                }
                _ = engine_changed.notified() => {
                    scheduler.schedule(Target::All, Instant::now(), Reason::EngineChanged);
                }
                Ok(()) = engine.state.changed() => {
                    scheduler.schedule(Target::All, Instant::now(), Reason::Connected);
                }
                Some(done) = runner.next_finished() => {
                    if done.failed {
                        self.ctx.metrics.retries_total.inc();
                    }
                    if let Some((at, why)) = done.follow_up {
                        scheduler.schedule(Target::Key(done.key), at, why);
                    }
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            if *shutdown.borrow() {
                break;
            }
            upkeep.run(&self).await;
            let now = Instant::now();
            if now < passes_not_before {
                continue;
            }
            let Some(due) = scheduler.take_due(now) else {
                continue;
            };
            debug!(reasons = ?due.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>(), "reconcile due");
            let rt = match engine.current() {
                Engine::Up(rt) => rt,
                // Connected, the supervisor's change asks for a pass.
                Engine::Connecting => continue,
                Engine::Down(error) => {
                    // No engine: due sessions fail at once, so a waiting create answers 503.
                    self.fail_unattempted(&error, policy).await;
                    continue;
                }
            };
            let list = due.iter().any(|(_, why)| why.needs_list());
            match self
                .pass(&rt, &deaths, &observed, &images, (&pool, &networks), list)
                .await
            {
                Ok(plan) => {
                    pass_failures = 0;
                    self.passed();
                    // Rules follow the rows (a network's last sandbox gone: its rules go).
                    // Tighter rules are made before a start, so only removals ask.
                    if plan
                        .actions
                        .iter()
                        .any(|a| matches!(a, Action::Remove { .. }))
                    {
                        egress.poke.notify_one();
                    }
                    scheduler.schedule(Target::All, now + resync, Reason::Resync);
                    if let Some(t) = plan.next_wake {
                        let wait = (t - Utc::now()).to_std().unwrap_or_default();
                        scheduler.schedule(Target::All, now + wait, Reason::Deadline);
                    }
                    let planned: HashSet<Key> = plan.actions.iter().map(Action::key).collect();
                    runner.retain_holds(&planned);
                    let exec = match &executor {
                        Some(e) if Arc::ptr_eq(&e.runtime, &rt) => e.clone(),
                        _ => executor
                            .insert(Arc::new(self.executor(
                                &rt,
                                policy,
                                &deaths,
                                &observed,
                                &engine,
                                (&egress, &pool, &networks),
                            )))
                            .clone(),
                    };
                    for action in plan.actions {
                        let key = action.key();
                        if let Offer::Held(at) = runner.offer(action, exec.clone(), now) {
                            scheduler.schedule(Target::Key(key), at, Reason::Retry);
                        }
                    }
                }
                Err(e) => {
                    pass_failures += 1;
                    self.ctx.metrics.pass_errors_total.inc();
                    warn!(error = %e, attempt = pass_failures, "reconcile pass failed");
                    self.ctx
                        .status
                        .update(|h| h.last_error = Some(e.to_string()));
                    if matches!(e, PassError::Runtime(_)) {
                        engine.connection_failed();
                    }
                    passes_not_before = Instant::now() + policy.delay(pass_failures);
                    scheduler.schedule(Target::All, passes_not_before, Reason::PassFailed);
                }
            }
            self.ctx.metrics.queue_depth.set(runner.in_flight() as i64);
        }

        info!(in_flight = runner.in_flight(), "controller stopping");
        runner.drain(Duration::from_secs(10)).await;
        // The pool's member starts in flight finish first: nothing is made after the stop.
        let _ = tokio::time::timeout(Duration::from_secs(10), pool_task).await;
        // So does a rules write under way: once this returns, nothing writes rules any more.
        let _ = tokio::time::timeout(Duration::from_secs(10), egress_task).await;
    }

    fn supervisor_parts(
        &self,
        deaths: &Arc<deaths::RecentDeaths>,
        engine_changed: &Arc<Notify>,
        images: &Arc<images::AppearedImages>,
    ) -> supervisor::Parts {
        supervisor::Parts {
            ctx: self.ctx.clone(),
            connector: self.connector.clone(),
            engine_changed: engine_changed.clone(),
            deaths: deaths.clone(),
            images: images.clone(),
            backoff: self.backoff(),
        }
    }

    fn executor(
        &self,
        rt: &SharedBackend,
        policy: BackoffPolicy,
        deaths: &Arc<deaths::RecentDeaths>,
        observed: &Arc<ObservedCache>,
        engine: &Supervisor,
        (egress, pool, networks): (
            &Arc<egress::EgressKeeper>,
            &Arc<crate::pool::WarmPool>,
            &Arc<networks::Networks>,
        ),
    ) -> Executor {
        Executor {
            ctx: self.ctx.clone(),
            runtime: rt.clone(),
            backoff: policy,
            deaths: deaths.clone(),
            observed: observed.clone(),
            connection_failed: engine.failure_signal(),
            egress: egress.clone(),
            pool: pool.clone(),
            networks: networks.clone(),
        }
    }

    /// A pass completed: readiness and the last-pass metric.
    fn passed(&self) {
        let now = Utc::now();
        self.ctx.status.update(|h| {
            h.last_error = None;
            h.last_pass = Some(now);
        });
        self.ctx
            .metrics
            .last_pass_timestamp
            .set(now.timestamp_millis() as f64 / 1000.0);
    }

    #[tracing::instrument(name = "reconcile_pass", skip_all, fields(rows, containers, actions))]
    /// One pass: every row, every container (listed when `list` or when the copy is not
    /// valid, else from `cache`), the plan.
    async fn pass(
        &self,
        rt: &SharedBackend,
        deaths: &deaths::RecentDeaths,
        cache: &ObservedCache,
        images: &images::AppearedImages,
        (pool, networks): (&crate::pool::WarmPool, &networks::Networks),
        list: bool,
    ) -> Result<planner::Plan, PassError> {
        let started = std::time::Instant::now();
        let rows = self.ctx.store.all().await?;
        let cached = if list { None } else { cache.snapshot() };
        let listed_now = cached.is_none();
        let list_began = std::time::Instant::now();
        let mut observed = match cached {
            Some(observed) => observed,
            None => {
                cache.listing();
                let mut listed = rt.list().await?;
                // Sessions adopted from the old service: their containers carry no sandboxd
                // labels, so they are watched by id.
                let legacy: Vec<String> = rows
                    .iter()
                    .filter(|r| r.phase != crate::domain::Phase::Expired)
                    .filter_map(|r| r.legacy_container_id.clone())
                    .collect();
                if let Some(takeover) = rt.legacy() {
                    listed.extend(takeover.observe_legacy(&legacy).await?);
                }
                cache.replace(&listed);
                listed
            }
        };
        // Every container, members too, before deaths and the pool's view change them.
        networks.observe(&observed, listed_now.then_some(list_began));
        if listed_now {
            // The engine's own count: networks nothing is on go.
            networks.prune(rt).await;
        }
        deaths.apply(&mut observed, Instant::now());
        // Pool members are the pool's; claimed ones are their chats' (from the store).
        pool.join(&mut observed, &rows);
        let policy = self.ctx.settings.sandbox.hibernation();
        let now = Utc::now();
        let desired: Vec<_> = rows
            .iter()
            .map(|r| {
                let mut d = r.desired(&policy, now);
                // Its missing image has appeared: no need to wait out the backoff.
                if images.unblocks(r) {
                    d.next_attempt_at = None;
                }
                d
            })
            .collect();
        let plan = planner::plan(&desired, &observed, now);
        self.record_world(&rows, &observed, started.elapsed());
        let span = tracing::Span::current();
        span.record("rows", rows.len());
        span.record("containers", observed.len());
        span.record("actions", plan.actions.len());
        debug!(
            rows = rows.len(),
            containers = observed.len(),
            actions = plan.actions.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "reconcile pass"
        );
        Ok(plan)
    }

    fn record_world(
        &self,
        rows: &[crate::store::SandboxRow],
        observed: &[planner::Observed],
        took: Duration,
    ) {
        let m = &self.ctx.metrics;
        m.pass_seconds.observe(took.as_secs_f64());
        for phase in crate::domain::Phase::ALL {
            let n = rows.iter().filter(|r| r.phase == phase).count();
            m.desired
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .set(n as i64);
        }
        let running = observed.iter().filter(|c| c.running).count();
        m.observed
            .get_or_create(&StateLabel { state: "running" })
            .set(running as i64);
        m.observed
            .get_or_create(&StateLabel {
                state: "not_running",
            })
            .set((observed.len() - running) as i64);
        m.active.set(
            rows.iter()
                .filter(|r| r.phase == crate::domain::Phase::Running)
                .count() as i64,
        );
    }

    /// Enforces the retention settings (events, expired rows).
    async fn prune(&self) {
        let db = &self.ctx.settings.database;
        // Bounded to 1..=36500 by config validation.
        let days = |d: u64| chrono::Duration::days(i64::try_from(d).unwrap_or(36_500));
        let now = Utc::now();
        match self
            .ctx
            .store
            .prune(
                now - days(db.event_retention_days),
                now - days(db.expired_retention_days),
            )
            .await
        {
            Ok((events, rows)) if events + rows > 0 => {
                info!(
                    events,
                    rows, "retention: deleted old events and expired rows"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "retention pass failed"),
        }
        match self.ctx.store.event_count().await {
            Ok(n) => {
                self.ctx.metrics.event_log_rows.set(n);
            }
            Err(e) => warn!(error = %e, "cannot count the event log"),
        }
    }

    /// With no engine, pending sessions that are due are failed at once (so a waiting create
    /// answers 503 instead of hanging); they are retried with backoff like any failure.
    async fn fail_unattempted(&self, error: &str, policy: BackoffPolicy) {
        let Ok(rows) = self.ctx.store.all().await else {
            return;
        };
        let now = Utc::now();
        for row in rows {
            let due = row.next_attempt_at.is_none_or(|t| t <= now);
            if row.phase == crate::domain::Phase::Pending && due && row.is_live(now) {
                let message = format!("docker engine unavailable: {error}");
                if let Err(e) = self
                    .ctx
                    .store
                    .record_failure(
                        row.chat_id,
                        row.session_id,
                        crate::store::EventAction::Start,
                        &message,
                        |n| policy.delay(n),
                        now,
                    )
                    .await
                {
                    warn!(error = %e, "cannot record failure");
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Runtime(#[from] crate::backend::BackendError),
}

#[cfg(test)]
mod tests;
