//! Containers the engine has just reported dead.
//!
//! The engine emits `die` before its container list shows the container exited (it tears the
//! network down first, ≈ 100–250 ms here), so a pass woken by the event would still see the
//! container running and the replacement would wait for a later pass. Passes treat a container
//! reported dead in the last moments as exited. Only a shortcut: without the event the list
//! shows the same a moment later.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::planner::Observed;

/// Longer than the engine's clean-up after `die`, short enough that a container someone
/// restarts by hand is not mistaken for dead for long.
const WINDOW: Duration = Duration::from_secs(2);

/// One reported death: when, and the exit code the event carried.
#[derive(Debug, Clone, Copy)]
struct Death {
    at: Instant,
    wall: DateTime<Utc>,
    exit_code: Option<i64>,
}

/// How long after its grace a stop sandboxd makes (hibernation) may still report its `die`.
const STOP_MARGIN: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Inner {
    deaths: HashMap<String, Death>,
    /// Containers sandboxd is stopping itself, until when: their next `die` is no death.
    stopping: HashMap<String, Instant>,
}

#[derive(Default)]
pub(super) struct RecentDeaths(Mutex<Inner>);

impl RecentDeaths {
    pub(super) fn record(&self, container_id: String, now: Instant, exit_code: Option<i64>) {
        let mut inner = self.lock();
        inner.stopping.retain(|_, until| now < *until);
        if inner.stopping.remove(&container_id).is_some() {
            return; // a hibernation's stop, not the agent's exit
        }
        inner.deaths.insert(
            container_id,
            Death {
                at: now,
                wall: Utc::now(),
                exit_code,
            },
        );
    }

    /// sandboxd is about to stop `container_id` (hibernation) with `grace` before the
    /// SIGKILL: its `die` is not a death, and one reported before is forgotten (the container
    /// will be started again in place).
    pub(super) fn stopping(&self, container_id: &str, now: Instant, grace: Duration) {
        let mut inner = self.lock();
        inner.deaths.remove(container_id);
        inner
            .stopping
            .insert(container_id.to_string(), now + grace + STOP_MARGIN);
    }

    /// `container_id` runs again (resumed in place): no death reported before counts.
    pub(super) fn forget(&self, container_id: &str) {
        self.lock().deaths.remove(container_id);
    }

    /// The exit code and time of a death reported within the window.
    pub(super) fn exit(&self, container_id: &str, now: Instant) -> Option<(i64, DateTime<Utc>)> {
        let inner = self.lock();
        let d = inner.deaths.get(container_id)?;
        (now.duration_since(d.at) < WINDOW)
            .then_some(())
            .and(d.exit_code.map(|code| (code, d.wall)))
    }

    /// Marks containers reported dead within the window as not running; forgets older reports.
    pub(super) fn apply(&self, observed: &mut [Observed], now: Instant) {
        let mut inner = self.lock();
        inner
            .deaths
            .retain(|_, d| now.duration_since(d.at) < WINDOW);
        if inner.deaths.is_empty() {
            return;
        }
        for o in observed.iter_mut().filter(|o| o.running) {
            if inner.deaths.contains_key(&o.container_id) {
                o.running = false;
            }
        }
    }

    // Each change is one insert or retain: a panic elsewhere cannot leave it half-done.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: &str) -> Observed {
        Observed {
            container_id: id.into(),
            chat_id: None,
            session_id: None,
            spec_hash: None,
            running: true,
            paused: false,
            ip: None,
            legacy: false,
            pool_slot: None,
            network: None,
        }
    }

    #[test]
    fn a_reported_death_counts_within_the_window_only() {
        let deaths = RecentDeaths::default();
        let t0 = Instant::now();
        deaths.record("dead".into(), t0, Some(1));
        assert_eq!(deaths.exit("dead", t0).map(|(c, _)| c), Some(1));
        let mut seen = vec![running("dead"), running("alive")];
        deaths.apply(&mut seen, t0 + Duration::from_millis(100));
        assert!(!seen[0].running && seen[1].running);

        let mut later = vec![running("dead")];
        deaths.apply(&mut later, t0 + WINDOW);
        assert!(
            later[0].running,
            "an old report no longer overrides the list"
        );
        assert!(deaths.lock().deaths.is_empty(), "and is forgotten");
        assert_eq!(deaths.exit("dead", t0 + WINDOW), None);
    }

    #[test]
    fn the_die_of_a_stop_sandboxd_makes_is_no_death_but_the_next_one_is() {
        let deaths = RecentDeaths::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        deaths.stopping("c", t0, grace);
        deaths.record("c".into(), t0 + grace, Some(143));
        assert_eq!(deaths.exit("c", t0), None, "the hibernation's stop");
        deaths.record("c".into(), t0, Some(1));
        assert_eq!(deaths.exit("c", t0).map(|(c, _)| c), Some(1), "a real exit");
        // A death reported just before the stop is forgotten too, and so is one before a resume.
        deaths.stopping("c", t0, grace);
        assert_eq!(deaths.exit("c", t0), None);
        deaths.record("d".into(), t0, Some(1));
        deaths.forget("d");
        assert_eq!(deaths.exit("d", t0), None);
    }
}
