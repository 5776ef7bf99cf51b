//! Runs planned actions, after kube-runtime's runner: never two actions for one key at once,
//! at most `controller.max_concurrent_actions` at a time, and a key whose action failed (and
//! whose failure no row records: removals) held back by a growing delay.
//!
//! What each finished action still needs is handed back as a follow-up request for the
//! scheduler: a failed start is due again at its row's `next_attempt_at`, a failed removal when
//! its hold ends, and a key for which a pass wanted more meanwhile at once. A clean finish with
//! nothing waiting needs nothing: its result is already recorded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::warn;

use super::backoff::BackoffPolicy;
use super::executor::{ActionError, Executor, Outcome};
use super::scheduler::Reason;
use crate::planner::{Action, Key};

/// Pacing of a key whose last action failed without a row to record it.
struct Hold {
    attempts: u32,
    not_before: Instant,
}

/// What became of an offered action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Started,
    /// Its key has an action in flight; a pass follows that action if this one wants more.
    Busy,
    /// Its key failed recently; offer it again at this time.
    Held(Instant),
}

/// A finished action and, if it needs one, when its key should be looked at again.
pub struct Finished {
    pub key: Key,
    pub follow_up: Option<(Instant, Reason)>,
    pub failed: bool,
}

type TaskResult = Result<Outcome, ActionError>;

pub struct Runner {
    permits: Arc<Semaphore>,
    backoff: BackoffPolicy,
    tasks: JoinSet<TaskResult>,
    /// Which key each task works on, so a panicked task still frees its key.
    task_keys: HashMap<tokio::task::Id, Key>,
    in_flight: HashMap<Key, Action>,
    /// Keys for which a pass wanted something the action in flight does not settle.
    deferred: HashSet<Key>,
    holds: HashMap<Key, Hold>,
}

impl Runner {
    pub fn new(max_concurrent: usize, backoff: BackoffPolicy) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            backoff,
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            in_flight: HashMap::new(),
            deferred: HashSet::new(),
            holds: HashMap::new(),
        }
    }

    /// The action slots (`controller.max_concurrent_actions`); the warm pool refills only
    /// with one to spare.
    pub fn permits(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }

    /// Starts `action` unless its key is busy or held.
    pub fn offer(&mut self, action: Action, exec: Arc<Executor>, now: Instant) -> Offer {
        let key = action.key();
        if let Some(running) = self.in_flight.get(&key) {
            if !running.settles(&action) {
                self.deferred.insert(key);
            }
            return Offer::Busy;
        }
        if let Some(hold) = self.holds.get(&key).filter(|h| h.not_before > now) {
            return Offer::Held(hold.not_before);
        }
        self.in_flight.insert(key.clone(), action.clone());
        let permits = self.permits.clone();
        let handle = self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            exec.run(action).await
        });
        self.task_keys.insert(handle.id(), key);
        Offer::Started
    }

    /// Forgets the holds of keys that need nothing any more (an orphan someone else removed,
    /// say), which would otherwise stay forever.
    pub fn retain_holds(&mut self, planned: &HashSet<Key>) {
        let in_flight = &self.in_flight;
        self.holds
            .retain(|k, _| planned.contains(k) || in_flight.contains_key(k));
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next finished action; `None` at once when nothing runs.
    pub async fn next_finished(&mut self) -> Option<Finished> {
        let joined = self.tasks.join_next_with_id().await?;
        let (id, result) = match joined {
            Ok((id, result)) => (id, Some(result)),
            Err(e) => {
                warn!(error = %e, "action task panicked");
                (e.id(), None)
            }
        };
        let key = self.task_keys.remove(&id)?;
        self.in_flight.remove(&key);
        let now = Instant::now();
        let mut follow_up = self
            .deferred
            .remove(&key)
            .then_some((now, Reason::ActionDone));
        let mut failed = false;
        match result {
            Some(Ok(outcome)) => {
                self.holds.remove(&key);
                if let Outcome::StartFailed { retry_at: Some(at) } = outcome {
                    failed = true;
                    let wait = (at - Utc::now()).to_std().unwrap_or_default();
                    follow_up = earliest(follow_up, (now + wait, Reason::Retry));
                }
            }
            other => {
                if let Some(Err(e)) = &other {
                    warn!(?key, error = %e, "action failed; retrying with backoff");
                }
                failed = true;
                let hold = self.holds.entry(key.clone()).or_insert(Hold {
                    attempts: 0,
                    not_before: now,
                });
                hold.attempts += 1;
                hold.not_before = now + self.backoff.delay(hold.attempts);
                follow_up = earliest(follow_up, (hold.not_before, Reason::Retry));
            }
        }
        Some(Finished {
            key,
            follow_up,
            failed,
        })
    }

    /// Lets running actions finish within `grace`, then abandons them (the next start
    /// reconciles whatever they left).
    pub async fn drain(mut self, grace: std::time::Duration) {
        let finish = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, finish).await.is_err() {
            warn!("abandoning in-flight actions after {grace:?}; the next start reconciles them");
            self.tasks.abort_all();
        }
    }
}

fn earliest(a: Option<(Instant, Reason)>, b: (Instant, Reason)) -> Option<(Instant, Reason)> {
    Some(match a {
        Some(a) if a.0 <= b.0 => a,
        _ => b,
    })
}
