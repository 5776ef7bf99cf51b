//! The level-triggered control loop.
//!
//! Each pass re-reads the whole truth (every row, every labelled container), asks the pure
//! planner what to do, and dispatches the actions with bounded parallelism and at most one
//! action per chat. Triggers only decide *when* a pass runs: the resync tick, API writes,
//! Docker events, the next expiry or backoff deadline, and the completion of an action.
//! Missing a trigger delays convergence; it never breaks it.

pub mod backoff;
mod deaths;
mod executor;
mod takeover;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::docker::DockerRuntime;
use crate::domain::volume::VolumePolicy;
use crate::metrics::{Metrics, PhaseLabel, StateLabel};
use crate::planner::{self, Action, Key};
use crate::store::Store;
use backoff::BackoffPolicy;
use executor::Executor;

/// What the controller tells the rest of the process (readiness, status pages).
#[derive(Debug, Default)]
pub struct ControllerStatus {
    pub docker_connected: AtomicBool,
    /// Unix millis of the last completed pass; 0 before the first.
    pub last_pass_ms: AtomicI64,
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ControllerStatus {
    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    pub fn error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

/// What the loop works with; built once in `app.rs`.
pub struct Controller {
    pub store: Store,
    pub settings: Arc<Settings>,
    pub volumes: Arc<VolumePolicy>,
    /// Notified by API writes and Docker events.
    pub wake: Arc<Notify>,
    /// Shared with readiness.
    pub status: Arc<ControllerStatus>,
    pub metrics: Arc<Metrics>,
}

/// Per-key retry pacing for failures that are not recorded in a row (removals).
struct Retry {
    attempts: u32,
    not_before: Instant,
}

impl Controller {
    fn backoff(&self) -> BackoffPolicy {
        let c = &self.settings.controller;
        BackoffPolicy {
            initial: Duration::from_millis(c.backoff_initial_ms),
            max: Duration::from_secs(c.backoff_max_seconds),
        }
    }

    /// Runs until `shutdown` turns true; in-flight actions get a bounded grace period.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let resync = Duration::from_secs(self.settings.sandbox.cleanup_interval_seconds);
        let policy = self.backoff();
        let permits = Arc::new(Semaphore::new(
            self.settings.controller.max_concurrent_actions,
        ));
        let mut runtime: Option<DockerRuntime> = None;
        let mut connect_failures = 0u32;
        let mut pass_failures = 0u32;
        let mut events_task: Option<tokio::task::JoinHandle<()>> = None;
        let mut in_flight: HashMap<Key, Action> = HashMap::new();
        let mut retries: HashMap<Key, Retry> = HashMap::new();
        let mut tasks: JoinSet<(Key, bool)> = JoinSet::new();
        // Which key each task works on, so a panicked task still frees its chat.
        let mut task_keys: HashMap<tokio::task::Id, Key> = HashMap::new();
        // Keys for which a pass wanted something the action in flight does not settle: when
        // that action finishes, the key needs a fresh pass. A success with nothing waiting
        // needs none (its result is already recorded), which keeps a burst of starts from
        // turning into a burst of container lists.
        let mut deferred: HashSet<Key> = HashSet::new();
        let mut pass_due = true;
        let mut next_deadline = Instant::now();
        let mut next_prune = Instant::now();
        let deaths = Arc::new(deaths::RecentDeaths::default());
        let mut next_reload = Instant::now() + resync;

        loop {
            if *shutdown.borrow() {
                break;
            }
            if Instant::now() >= next_prune {
                self.prune().await;
                next_prune = Instant::now() + Duration::from_secs(3600);
            }
            if Instant::now() >= next_reload {
                // The store's in-memory rows are kept current by its own writes; this re-read
                // bounds any divergence (a row edited by hand) to one resync period.
                if let Err(e) = self.store.reload_mirror().await {
                    warn!(error = %e, "re-reading the sandboxes table failed");
                }
                next_reload = Instant::now() + resync;
            }
            // 1. An engine to talk to.
            if runtime.is_none() {
                match self.connect().await {
                    Ok(rt) => {
                        info!("connected to the Docker engine");
                        connect_failures = 0;
                        pass_due = true;
                        self.set_connected(true);
                        if let Some(t) = events_task.take() {
                            t.abort();
                        }
                        events_task = Some(tokio::spawn(watch_events(
                            rt.clone(),
                            self.wake.clone(),
                            self.metrics.clone(),
                            deaths.clone(),
                        )));
                        if self.settings.controller.take_over_old_service {
                            tokio::spawn(take_over_old_service(
                                rt.clone(),
                                self.store.clone(),
                                self.settings.clone(),
                                self.wake.clone(),
                            ));
                        }
                        runtime = Some(rt);
                    }
                    Err(e) => {
                        connect_failures += 1;
                        self.set_connected(false);
                        self.status.set_error(Some(e.clone()));
                        warn!(error = %e, attempt = connect_failures, "Docker engine unavailable");
                        self.fail_unattempted(&e, policy).await;
                        // Wait out the backoff, but answer new desired state at once: a create
                        // arriving now gets its 503 without waiting for the next reconnect.
                        let until = Instant::now() + policy.delay(connect_failures);
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep_until(until) => break,
                                _ = self.wake.notified() => self.fail_unattempted(&e, policy).await,
                                _ = shutdown.changed() => break,
                            }
                        }
                        continue;
                    }
                }
            }
            let Some(rt) = runtime.clone() else { continue };

            // 2. One pass: read everything, plan, dispatch what is not already in flight.
            let pass = if pass_due {
                next_deadline = Instant::now() + resync;
                Some(self.pass(&rt, &deaths).await)
            } else {
                None
            };
            match pass {
                None => {}
                Some(Ok(plan)) => {
                    pass_failures = 0;
                    self.status.set_error(None);
                    let now_ms = Utc::now().timestamp_millis();
                    self.status.last_pass_ms.store(now_ms, Ordering::Relaxed);
                    self.metrics.last_pass_timestamp.set(now_ms as f64 / 1000.0);
                    if let Some(t) = plan.next_wake {
                        let wait = (t - Utc::now()).to_std().unwrap_or_default();
                        next_deadline = next_deadline.min(Instant::now() + wait);
                    }
                    let now = Instant::now();
                    // Retry state of keys that need nothing any more (an orphan someone else
                    // removed, say) would otherwise stay forever.
                    let planned: HashSet<Key> = plan.actions.iter().map(Action::key).collect();
                    retries.retain(|k, _| planned.contains(k) || in_flight.contains_key(k));
                    for action in plan.actions {
                        let key = action.key();
                        if let Some(running) = in_flight.get(&key) {
                            if !running.settles(&action) {
                                deferred.insert(key);
                            }
                            continue;
                        }
                        if let Some(r) = retries.get(&key) {
                            if r.not_before > now {
                                next_deadline = next_deadline.min(r.not_before);
                                continue;
                            }
                        }
                        in_flight.insert(key.clone(), action.clone());
                        let exec = Executor {
                            store: self.store.clone(),
                            runtime: rt.clone(),
                            backoff: policy,
                            volumes: self.volumes.clone(),
                            metrics: self.metrics.clone(),
                        };
                        let permits = permits.clone();
                        let task_key = key.clone();
                        let handle = tasks.spawn(async move {
                            let _permit = permits.acquire_owned().await;
                            let ok = match exec.run(action).await {
                                Ok(()) => true,
                                Err(e) => {
                                    warn!(?key, error = %e, "action failed; retrying with backoff");
                                    false
                                }
                            };
                            (key, ok)
                        });
                        task_keys.insert(handle.id(), task_key);
                    }
                }
                Some(Err(e)) => {
                    pass_failures += 1;
                    self.metrics.pass_errors_total.inc();
                    warn!(error = %e, attempt = pass_failures, "reconcile pass failed");
                    self.status.set_error(Some(e.to_string()));
                    if matches!(e, PassError::Docker(_)) {
                        // Reconnect (and renegotiate) before the next pass.
                        runtime = None;
                        self.set_connected(false);
                    }
                    next_deadline = Instant::now() + policy.delay(pass_failures);
                }
            }

            self.metrics.queue_depth.set(in_flight.len() as i64);

            // 3. Sleep until something may have changed. Anything but a clean finish with
            // nothing waiting calls for a pass.
            pass_due = true;
            tokio::select! {
                _ = self.wake.notified(), if pass_failures == 0 => {}
                _ = tokio::time::sleep_until(next_deadline) => {}
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let mut finished = vec![done];
                    while let Some(more) = tasks.try_join_next_with_id() {
                        finished.push(more);
                    }
                    pass_due = false;
                    for result in finished {
                        let (id, ok) = match result {
                            Ok((id, (_, ok))) => (id, ok),
                            Err(e) => {
                                warn!(error = %e, "action task panicked");
                                (e.id(), false)
                            }
                        };
                        let Some(key) = task_keys.remove(&id) else { continue };
                        in_flight.remove(&key);
                        pass_due |= deferred.remove(&key) || !ok;
                        if ok {
                            retries.remove(&key);
                        } else {
                            self.metrics.retries_total.inc();
                            let r = retries.entry(key).or_insert(Retry { attempts: 0, not_before: Instant::now() });
                            r.attempts += 1;
                            r.not_before = Instant::now() + policy.delay(r.attempts);
                        }
                    }
                }
                _ = shutdown.changed() => {}
            }
        }

        info!(in_flight = tasks.len(), "controller stopping");
        if let Some(t) = events_task {
            t.abort();
        }
        let grace = Duration::from_secs(10);
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!("abandoning in-flight actions after {grace:?}; the next start reconciles them");
            tasks.abort_all();
        }
    }

    fn set_connected(&self, up: bool) {
        self.status.docker_connected.store(up, Ordering::Relaxed);
        self.metrics.docker_connected.set(i64::from(up));
    }

    async fn connect(&self) -> Result<DockerRuntime, String> {
        let s = &self.settings;
        let rt = DockerRuntime::connect(
            &s.docker,
            &s.controller.instance,
            &s.sandbox.network_name,
            self.metrics.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        rt.ensure_network().await.map_err(|e| e.to_string())?;
        Ok(rt)
    }

    #[tracing::instrument(name = "reconcile_pass", skip_all, fields(rows, containers, actions))]
    async fn pass(
        &self,
        rt: &DockerRuntime,
        deaths: &deaths::RecentDeaths,
    ) -> Result<planner::Plan, PassError> {
        let started = std::time::Instant::now();
        let rows = self.store.all().await?;
        let mut observed = rt.list_managed().await?;
        // Sessions adopted from the old service: their containers carry no sandboxd labels.
        let legacy: Vec<String> = rows
            .iter()
            .filter(|r| r.phase != crate::domain::Phase::Expired)
            .filter_map(|r| r.legacy_container_id.clone())
            .collect();
        observed.extend(rt.observe_legacy(&legacy).await?);
        deaths.apply(&mut observed, Instant::now());
        let desired: Vec<_> = rows.iter().map(|r| r.desired()).collect();
        let plan = planner::plan(&desired, &observed, Utc::now());
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
        let m = &self.metrics;
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
        let db = &self.settings.database;
        // Bounded to 1..=36500 by config validation.
        let days = |d: u64| chrono::Duration::days(i64::try_from(d).unwrap_or(36_500));
        let now = Utc::now();
        match self
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
    }

    /// With no engine, pending sessions that are due are failed at once (so a waiting create
    /// answers 503 instead of hanging); they are retried with backoff like any failure.
    async fn fail_unattempted(&self, error: &str, policy: BackoffPolicy) {
        let Ok(rows) = self.store.all().await else {
            return;
        };
        let now = Utc::now();
        for row in rows {
            let due = row.next_attempt_at.is_none_or(|t| t <= now);
            if row.phase == crate::domain::Phase::Pending && due && row.is_live(now) {
                let message = format!("docker engine unavailable: {error}");
                if let Err(e) = self
                    .store
                    .record_failure(
                        row.chat_id,
                        row.session_id,
                        "start",
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

/// Adopts the old service's containers (`takeover.rs`) beside the loop, so the first pass is
/// not delayed; wakes the loop when it changed anything.
async fn take_over_old_service(
    rt: DockerRuntime,
    store: Store,
    settings: Arc<Settings>,
    wake: Arc<Notify>,
) {
    match takeover::run(&rt, &store, &settings).await {
        Ok(done) if done != takeover::Takeover::default() => {
            info!(
                adopted = done.adopted,
                removed = done.removed,
                "took over the old service's containers"
            );
            wake.notify_one();
        }
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "taking over the old service's containers failed; retried at the next connect")
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
}

/// Turns Docker events for this instance into wake-ups; reconnects with a delay when the
/// stream ends. Purely an accelerator.
///
/// The engine emits `die` a moment before its container list shows the container as exited, so
/// a pass run right on the event can still see it running: `die`/`oom` are noted in `deaths`,
/// which passes apply to what they list. Each event also schedules two follow-up wakes (50 ms
/// and 250 ms later) for whatever else the list is late with; coalesced by the `Notify`, they
/// cost at most two cheap passes per burst of events.
async fn watch_events(
    rt: DockerRuntime,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    deaths: Arc<deaths::RecentDeaths>,
) {
    let followups = Arc::new(AtomicBool::new(false));
    let mut since = None;
    // Reconnects back off while the engine is away (no hot loop), and reset once events flow.
    let reconnect = BackoffPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
    };
    let mut failures = 0u32;
    loop {
        // The request times out with the client's timeout; `since` replays the gap.
        let mut events = Box::pin(rt.events(since));
        metrics.events_connected.set(1);
        let opened = Instant::now();
        let mut received = false;
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => {
                    received = true;
                    since = Some(event.at.max(since.unwrap_or(0)));
                    if matches!(event.action.as_str(), "die" | "oom") {
                        deaths.record(event.container_id, Instant::now());
                    }
                    wake.notify_one();
                    if !followups.swap(true, Ordering::AcqRel) {
                        let (wake, pending) = (wake.clone(), followups.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            wake.notify_one();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            pending.store(false, Ordering::Release);
                            wake.notify_one();
                        });
                    }
                }
                Err(e) => {
                    debug!(error = %e, "docker event stream error");
                    break;
                }
            }
        }
        metrics.events_connected.set(0);
        since = Some(since.unwrap_or_else(|| Utc::now().timestamp()));
        // A stream that delivered or lived a while ended normally (the request timeout).
        let healthy = received || opened.elapsed() > Duration::from_secs(5);
        failures = if healthy {
            1
        } else {
            failures.saturating_add(1)
        };
        tokio::time::sleep(reconnect.delay(failures)).await;
    }
}
