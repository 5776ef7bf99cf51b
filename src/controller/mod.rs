//! The level-triggered control loop.
//!
//! Each pass re-reads the whole truth (every row, every labelled container), asks the pure
//! planner what to do, and dispatches the actions with bounded parallelism and at most one
//! action per chat. Triggers only decide *when* a pass runs: the resync tick, API writes,
//! Docker events, the next expiry or backoff deadline, and the completion of an action.
//! Missing a trigger delays convergence; it never breaks it.

pub mod backoff;
mod executor;

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
use crate::planner::{self, Key};
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

pub struct Controller {
    store: Store,
    settings: Arc<Settings>,
    volumes: Arc<VolumePolicy>,
    wake: Arc<Notify>,
    status: Arc<ControllerStatus>,
}

/// Per-key retry pacing for failures that are not recorded in a row (removals).
struct Retry {
    attempts: u32,
    not_before: Instant,
}

impl Controller {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        volumes: Arc<VolumePolicy>,
        wake: Arc<Notify>,
        status: Arc<ControllerStatus>,
    ) -> Self {
        Self {
            store,
            settings,
            volumes,
            wake,
            status,
        }
    }

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
        let mut in_flight: HashSet<Key> = HashSet::new();
        let mut retries: HashMap<Key, Retry> = HashMap::new();
        let mut tasks: JoinSet<(Key, bool)> = JoinSet::new();

        loop {
            if *shutdown.borrow() {
                break;
            }
            // 1. An engine to talk to.
            if runtime.is_none() {
                match self.connect().await {
                    Ok(rt) => {
                        info!("connected to the Docker engine");
                        connect_failures = 0;
                        self.status.docker_connected.store(true, Ordering::Relaxed);
                        if let Some(t) = events_task.take() {
                            t.abort();
                        }
                        events_task =
                            Some(tokio::spawn(watch_events(rt.clone(), self.wake.clone())));
                        runtime = Some(rt);
                    }
                    Err(e) => {
                        connect_failures += 1;
                        self.status.docker_connected.store(false, Ordering::Relaxed);
                        self.status.set_error(Some(e.clone()));
                        warn!(error = %e, attempt = connect_failures, "Docker engine unavailable");
                        self.fail_unattempted(&e, policy).await;
                        let delay = policy.delay(connect_failures);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                }
            }
            let Some(rt) = runtime.clone() else { continue };

            // 2. One pass: read everything, plan, dispatch what is not already in flight.
            let mut next_deadline = Instant::now() + resync;
            match self.pass(&rt).await {
                Ok(plan) => {
                    pass_failures = 0;
                    self.status.set_error(None);
                    self.status
                        .last_pass_ms
                        .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
                    if let Some(t) = plan.next_wake {
                        let wait = (t - Utc::now()).to_std().unwrap_or_default();
                        next_deadline = next_deadline.min(Instant::now() + wait);
                    }
                    let now = Instant::now();
                    for action in plan.actions {
                        let key = action.key();
                        if in_flight.contains(&key) {
                            continue;
                        }
                        if let Some(r) = retries.get(&key) {
                            if r.not_before > now {
                                next_deadline = next_deadline.min(r.not_before);
                                continue;
                            }
                        }
                        in_flight.insert(key.clone());
                        let exec = Executor {
                            store: self.store.clone(),
                            runtime: rt.clone(),
                            backoff: policy,
                            volumes: self.volumes.clone(),
                        };
                        let permits = permits.clone();
                        tasks.spawn(async move {
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
                    }
                }
                Err(e) => {
                    pass_failures += 1;
                    warn!(error = %e, attempt = pass_failures, "reconcile pass failed");
                    self.status.set_error(Some(e.to_string()));
                    if matches!(e, PassError::Docker(_)) {
                        // Reconnect (and renegotiate) before the next pass.
                        runtime = None;
                        self.status.docker_connected.store(false, Ordering::Relaxed);
                    }
                    next_deadline = Instant::now() + policy.delay(pass_failures);
                }
            }

            // 3. Sleep until something may have changed.
            tokio::select! {
                _ = self.wake.notified(), if pass_failures == 0 => {}
                _ = tokio::time::sleep_until(next_deadline) => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let mut finished = vec![done];
                    while let Some(more) = tasks.try_join_next() {
                        finished.push(more);
                    }
                    for result in finished {
                        let Ok((key, ok)) = result else { continue };
                        in_flight.remove(&key);
                        if ok {
                            retries.remove(&key);
                        } else {
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

    async fn connect(&self) -> Result<DockerRuntime, String> {
        let s = &self.settings;
        let rt = DockerRuntime::connect(&s.docker, &s.controller.instance, &s.sandbox.network_name)
            .await
            .map_err(|e| e.to_string())?;
        rt.ensure_network().await.map_err(|e| e.to_string())?;
        Ok(rt)
    }

    async fn pass(&self, rt: &DockerRuntime) -> Result<planner::Plan, PassError> {
        let started = std::time::Instant::now();
        let rows = self.store.all().await?;
        let observed = rt.list_managed().await?;
        let desired: Vec<_> = rows.iter().map(|r| r.desired()).collect();
        let plan = planner::plan(&desired, &observed, Utc::now());
        debug!(
            rows = rows.len(),
            containers = observed.len(),
            actions = plan.actions.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "reconcile pass"
        );
        Ok(plan)
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

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
}

/// Turns Docker events for this instance into wake-ups; reconnects with a delay when the
/// stream ends. Purely an accelerator.
async fn watch_events(rt: DockerRuntime, wake: Arc<Notify>) {
    loop {
        let mut events = Box::pin(rt.events());
        while let Some(item) = events.next().await {
            match item {
                Ok(()) => wake.notify_one(),
                Err(e) => {
                    debug!(error = %e, "docker event stream error");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
