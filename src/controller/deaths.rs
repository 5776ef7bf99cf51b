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

#[derive(Default)]
pub(super) struct RecentDeaths(Mutex<HashMap<String, Death>>);

impl RecentDeaths {
    pub(super) fn record(&self, container_id: String, now: Instant, exit_code: Option<i64>) {
        let death = Death {
            at: now,
            wall: Utc::now(),
            exit_code,
        };
        self.lock().insert(container_id, death);
    }

    /// The exit code and time of a death reported within the window.
    pub(super) fn exit(&self, container_id: &str, now: Instant) -> Option<(i64, DateTime<Utc>)> {
        let deaths = self.lock();
        let d = deaths.get(container_id)?;
        (now.duration_since(d.at) < WINDOW)
            .then_some(())
            .and(d.exit_code.map(|code| (code, d.wall)))
    }

    /// Marks containers reported dead within the window as not running; forgets older reports.
    pub(super) fn apply(&self, observed: &mut [Observed], now: Instant) {
        let mut deaths = self.lock();
        deaths.retain(|_, d| now.duration_since(d.at) < WINDOW);
        if deaths.is_empty() {
            return;
        }
        for o in observed.iter_mut().filter(|o| o.running) {
            if deaths.contains_key(&o.container_id) {
                o.running = false;
            }
        }
    }

    // Each change is one insert or retain: a panic elsewhere cannot leave it half-done.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Death>> {
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
            ip: None,
            legacy: false,
            pool_slot: None,
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
        assert!(deaths.lock().is_empty(), "and is forgotten");
        assert_eq!(deaths.exit("dead", t0 + WINDOW), None);
    }
}
