//! The engine connection, kept apart from the loop: connects (negotiating the API version and
//! making sure the sandbox network exists) with capped exponential backoff, runs the event
//! stream while connected, and reconnects when the loop reports a failed call. The loop only
//! reads the current state; it never waits on a connect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::backoff::BackoffPolicy;
use super::deaths::RecentDeaths;
use super::images::AppearedImages;
use super::{takeover, ControllerStatus};
use crate::backend::{Connect, SharedBackend};
use crate::config::Settings;
use crate::context::Context;
use crate::metrics::Metrics;
use crate::store::Store;

/// The connection as the loop sees it.
#[derive(Clone)]
pub enum Engine {
    /// A connect is under way (at start, or after a failed call): wait for it.
    Connecting,
    /// The last connect failed, with this error: sessions due now fail fast with it.
    Down(String),
    Up(SharedBackend),
}

/// What the supervisor needs; built by the controller.
pub struct Parts {
    pub ctx: Arc<Context>,
    /// Makes the backend (the settings' engine; the fake in unit tests).
    pub connector: Arc<dyn Connect>,
    /// Engine events (and the takeover) say "the engine changed" through it.
    pub engine_changed: Arc<Notify>,
    pub deaths: Arc<RecentDeaths>,
    /// Images the engine reports appearing (`images.rs`).
    pub images: Arc<AppearedImages>,
    pub backoff: BackoffPolicy,
}

/// The loop's handle: the current state, and a way to say the connection failed.
pub struct Supervisor {
    pub state: watch::Receiver<Engine>,
    failed: Arc<Notify>,
}

impl Supervisor {
    pub fn spawn(parts: Parts, shutdown: watch::Receiver<bool>) -> Self {
        let (tx, state) = watch::channel(Engine::Connecting);
        let failed = Arc::new(Notify::new());
        tokio::spawn(supervise(parts, tx, failed.clone(), shutdown));
        Self { state, failed }
    }

    pub fn current(&self) -> Engine {
        self.state.borrow().clone()
    }

    /// A call failed in a way that may mean a broken connection: reconnect (and renegotiate).
    pub fn connection_failed(&self) {
        self.failed.notify_one();
    }

    /// The same signal, for actions running on their own tasks.
    pub fn failure_signal(&self) -> Arc<Notify> {
        self.failed.clone()
    }
}

async fn supervise(
    p: Parts,
    tx: watch::Sender<Engine>,
    failed: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut takeover = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match p.connector.connect().await.map_err(|e| e.to_string()) {
            Ok(rt) => {
                info!("connected to {}", rt.describe());
                failures = 0;
                set_connected(&p, true);
                p.ctx.status.update(|h| h.last_error = None);
                check_profiles(&p, &rt).await;
                let events = tokio::spawn(watch_events(
                    rt.clone(),
                    p.engine_changed.clone(),
                    p.ctx.metrics.clone(),
                    p.deaths.clone(),
                ));
                let images = tokio::spawn(watch_images(
                    rt.clone(),
                    p.engine_changed.clone(),
                    p.images.clone(),
                ));
                if p.ctx.settings.controller.take_over_old_service {
                    if rt.legacy().is_none() {
                        // Nothing of the old service's can be on this backend (swarm).
                        p.ctx.status.update(|h| h.takeover_done = true);
                    }
                    let parts = (
                        p.ctx.store.clone(),
                        p.ctx.settings.clone(),
                        p.engine_changed.clone(),
                    );
                    takeover = rt.legacy().is_some().then(|| {
                        let (store, settings, wake) = parts;
                        tokio::spawn(take_over_old_service(
                            rt.clone(),
                            store,
                            settings,
                            wake,
                            p.ctx.status.clone(),
                        ))
                    });
                }
                tx.send_replace(Engine::Up(rt));
                tokio::select! {
                    _ = failed.notified() => {}
                    _ = shutdown.changed() => {}
                }
                events.abort();
                images.abort();
                if let Some(t) = takeover.take() {
                    t.abort();
                }
                set_connected(&p, false);
                tx.send_replace(Engine::Connecting);
            }
            Err(e) => {
                failures += 1;
                set_connected(&p, false);
                p.ctx.status.update(|h| h.last_error = Some(e.clone()));
                warn!(error = %e, attempt = failures, "Docker engine unavailable");
                tx.send_replace(Engine::Down(e));
                tokio::select! {
                    _ = tokio::time::sleep(p.backoff.delay(failures)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

/// Names every configured profile whose runtime the engine does not offer (readiness shows
/// them; their sandboxes fail to start with the engine's error, never fall back to runc).
async fn check_profiles(p: &Parts, rt: &SharedBackend) {
    let missing = match rt.profile_problems(&p.ctx.settings).await {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "cannot read what the engine offers the profiles");
            return;
        }
    };
    for m in &missing {
        warn!("{m}");
    }
    p.ctx.status.update(|h| h.profile_errors = missing);
}

fn set_connected(p: &Parts, up: bool) {
    p.ctx.status.update(|h| h.engine_connected = up);
    p.ctx.metrics.docker_connected.set(i64::from(up));
}

/// Adopts the old service's containers (`takeover.rs`) beside the loop, so the first pass is
/// not delayed; wakes the loop when it changed anything, and marks the takeover done after
/// its first complete look (writes wait for that). Containers that failed are tried again
/// every 30 s until none is left (the connection may stay up for days).
async fn take_over_old_service(
    rt: SharedBackend,
    store: Store,
    settings: Arc<Settings>,
    wake: Arc<Notify>,
    status: Arc<ControllerStatus>,
) {
    loop {
        let failed = match takeover::run(rt.as_ref(), &store, &settings).await {
            Ok(done) => {
                if done.adopted + done.removed > 0 {
                    info!(
                        adopted = done.adopted,
                        removed = done.removed,
                        failed = done.failed,
                        "took over the old service's containers"
                    );
                    wake.notify_one();
                }
                status.update(|h| h.takeover_done = true);
                done.failed > 0
            }
            Err(e) => {
                warn!(error = %e, "listing the old service's containers failed; trying again in 30 s");
                true
            }
        };
        if !failed {
            return;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

/// Notes images as they appear and wakes the loop (`images.rs`); reconnects with a delay
/// when the stream ends.
async fn watch_images(rt: SharedBackend, wake: Arc<Notify>, images: Arc<AppearedImages>) {
    // Backends without image events (swarm: images are each node's) have nothing to watch.
    let Some(watch) = rt.images() else { return };
    let mut reconnects = Reconnects::default();
    loop {
        let mut stream = watch.image_events();
        let opened = Instant::now();
        let mut received = false;
        while let Some(Ok(name)) = stream.next().await {
            received = true;
            images.record(name, Utc::now());
            wake.notify_one();
        }
        tokio::time::sleep(reconnects.after(received, opened)).await;
    }
}

/// Pacing of an event stream's reconnects: they back off while the engine is away (no hot
/// loop), and start over once a stream delivered or lived a while (it ended normally, at the
/// request timeout).
struct Reconnects {
    policy: BackoffPolicy,
    failures: u32,
}

impl Default for Reconnects {
    fn default() -> Self {
        Self {
            policy: BackoffPolicy {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
            failures: 0,
        }
    }
}

impl Reconnects {
    /// The wait before reconnecting a stream opened at `opened`.
    fn after(&mut self, received: bool, opened: Instant) -> Duration {
        let healthy = received || opened.elapsed() > Duration::from_secs(5);
        self.failures = if healthy {
            1
        } else {
            self.failures.saturating_add(1)
        };
        self.policy.delay(self.failures)
    }
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
    rt: SharedBackend,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    deaths: Arc<RecentDeaths>,
) {
    let followups = Arc::new(AtomicBool::new(false));
    let mut since = None;
    let mut reconnects = Reconnects::default();
    loop {
        // The request times out with the client's timeout; `since` replays the gap.
        let mut events = rt.events(since);
        metrics.events_connected.set(1);
        let opened = Instant::now();
        let mut received = false;
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => {
                    received = true;
                    since = Some(event.at.max(since.unwrap_or(0)));
                    if matches!(event.action.as_str(), "die" | "oom") {
                        deaths.record(event.container_id, Instant::now(), event.exit_code);
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
        tokio::time::sleep(reconnects.after(received, opened)).await;
    }
}
