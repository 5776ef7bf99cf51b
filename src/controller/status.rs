//! What the controller tells the rest of the process (readiness, status pages), as one value:
//! each part (supervisor, loop, egress keeper, pool, takeover) updates its own field of
//! [`Health`]; readiness reads one consistent snapshot.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// The controller's health at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The engine answered at the last (re)connect and has not failed since.
    pub engine_connected: bool,
    /// When the last reconcile pass completed.
    pub last_pass: Option<DateTime<Utc>>,
    /// Why the last connect or pass failed (cleared by the next that worked).
    pub last_error: Option<String>,
    /// The old service's containers were taken over (or there is nothing to take over):
    /// writes for a chat wait for it (bounded), so a create in the first moments after
    /// start-up is given the old container instead of racing it.
    pub takeover_done: bool,
    /// The last egress reconcile's failure.
    pub egress_error: Option<String>,
    /// Profiles whose runtime the engine does not offer.
    pub profile_errors: Vec<String>,
    /// `on`, or `off: <why>`.
    pub warm_pool: String,
}

/// The one shared [`Health`] value.
#[derive(Debug)]
pub struct ControllerStatus {
    health: watch::Sender<Health>,
}

impl ControllerStatus {
    pub fn new(take_over_old_service: bool) -> Self {
        Self {
            health: watch::channel(Health {
                takeover_done: !take_over_old_service,
                warm_pool: "off: not started".into(),
                ..Health::default()
            })
            .0,
        }
    }

    /// A copy of the whole value, as it is now.
    pub fn snapshot(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Changes one part; waiters are told only when something changed.
    pub fn update(&self, change: impl FnOnce(&mut Health)) {
        self.health.send_if_modified(|h| {
            let before = h.clone();
            change(h);
            *h != before
        });
    }

    /// Waits (at most `limit`) until the old service's containers were taken over.
    pub async fn takeover_settled(&self, limit: Duration) {
        let mut health = self.health.subscribe();
        let _ = tokio::time::timeout(limit, health.wait_for(|h| h.takeover_done)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_for_the_takeover_is_woken_by_the_update_that_completes_it() {
        let status = std::sync::Arc::new(ControllerStatus::new(true));
        assert!(!status.snapshot().takeover_done);
        let waiter = {
            let status = status.clone();
            tokio::spawn(async move { status.takeover_settled(Duration::from_secs(30)).await })
        };
        status.update(|h| h.engine_connected = true);
        status.update(|h| h.takeover_done = true);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken, not timed out")
            .expect("joined");
        let now = status.snapshot();
        assert!(now.engine_connected && now.takeover_done);
    }

    #[test]
    fn without_a_takeover_writes_never_wait() {
        assert!(ControllerStatus::new(false).snapshot().takeover_done);
    }
}
