//! When to reconcile, after kube-runtime's scheduler: every trigger is the same request,
//! "reconcile this target at time T", where the target is one key or everything. Requests are
//! de-duplicated per target and the earliest time wins, so a burst of triggers costs one pass.
//!
//! The planner decides over the whole table at once (it is cheap: 10k sandboxes in ≈ 3 ms),
//! so a due key is served by a pass over everything; keys are kept apart so that logs and
//! metrics say why a pass ran, and so that a retry at `next_attempt_at` is never lost among
//! later, longer deadlines.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::planner::Key;

/// What a request asks to reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    All,
    Key(Key),
}

/// Why a reconcile was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Start-up, or the engine connection came (back).
    Connected,
    /// The periodic resync (`sandbox.cleanup_interval_seconds`).
    Resync,
    /// A desired-state write (sandboxd's own change: the engine is as last seen).
    Changed,
    /// An engine event, or the old service's containers taken over: the engine changed.
    EngineChanged,
    /// The plan's next deadline: an expiry or a `next_attempt_at`.
    Deadline,
    /// An action finished and left something to look at again (it failed, or a pass wanted
    /// more for its key meanwhile).
    ActionDone,
    /// A failed action's retry time (start failures: the row's `next_attempt_at`).
    Retry,
    /// The previous pass failed.
    PassFailed,
}

impl Reason {
    /// Whether the engine may have changed in ways sandboxd did not make: the pass lists
    /// every container instead of planning from its copy (`observed.rs`).
    pub fn needs_list(self) -> bool {
        matches!(
            self,
            Reason::Connected | Reason::Resync | Reason::EngineChanged | Reason::PassFailed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connected => "connected",
            Reason::Resync => "resync",
            Reason::Changed => "changed",
            Reason::EngineChanged => "engine_changed",
            Reason::Deadline => "deadline",
            Reason::ActionDone => "action_done",
            Reason::Retry => "retry",
            Reason::PassFailed => "pass_failed",
        }
    }
}

/// Pending requests: at most one per target, the earliest.
#[derive(Debug, Default)]
pub struct Scheduler {
    due: HashMap<Target, (Instant, Reason)>,
}

impl Scheduler {
    /// Asks for `target` to be reconciled at `at`; an earlier request for it wins.
    pub fn schedule(&mut self, target: Target, at: Instant, reason: Reason) {
        let entry = self.due.entry(target).or_insert((at, reason));
        if at < entry.0 {
            *entry = (at, reason);
        }
    }

    /// When the next request falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().map(|(at, _)| *at).min()
    }

    /// Removes every request due by `now`; `None` when nothing is due. The reasons come back
    /// for the log, earliest first.
    pub fn take_due(&mut self, now: Instant) -> Option<Vec<(Target, Reason)>> {
        let mut due: Vec<(Instant, Target, Reason)> = Vec::new();
        self.due.retain(|target, (at, reason)| {
            if *at <= now {
                due.push((*at, target.clone(), *reason));
                false
            } else {
                true
            }
        });
        if due.is_empty() {
            return None;
        }
        due.sort_by_key(|(at, _, _)| *at);
        Some(due.into_iter().map(|(_, t, r)| (t, r)).collect())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.due.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(n: u8) -> Target {
        Target::Key(Key::Container(format!("c{n}")))
    }

    #[test]
    fn requests_for_one_target_collapse_and_the_earliest_wins() {
        let t = Instant::now();
        let mut s = Scheduler::default();
        s.schedule(Target::All, t + Duration::from_secs(60), Reason::Resync);
        s.schedule(Target::All, t + Duration::from_secs(1), Reason::Deadline);
        s.schedule(Target::All, t + Duration::from_secs(30), Reason::Changed);
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_due(), Some(t + Duration::from_secs(1)));
        assert_eq!(s.take_due(t), None);
        assert_eq!(
            s.take_due(t + Duration::from_secs(1)),
            Some(vec![(Target::All, Reason::Deadline)])
        );
        assert!(s.is_empty());
    }

    #[test]
    fn a_key_retry_is_not_lost_behind_a_later_resync() {
        let t = Instant::now();
        let mut s = Scheduler::default();
        s.schedule(Target::All, t + Duration::from_secs(60), Reason::Resync);
        s.schedule(key(1), t + Duration::from_millis(500), Reason::Retry);
        assert_eq!(s.next_due(), Some(t + Duration::from_millis(500)));
        let due = s.take_due(t + Duration::from_millis(500)).unwrap();
        assert_eq!(due, vec![(key(1), Reason::Retry)]);
        assert_eq!(s.next_due(), Some(t + Duration::from_secs(60)));
    }

    #[test]
    fn due_requests_come_back_earliest_first() {
        let t = Instant::now();
        let mut s = Scheduler::default();
        s.schedule(key(2), t + Duration::from_millis(2), Reason::Retry);
        s.schedule(key(1), t + Duration::from_millis(1), Reason::ActionDone);
        s.schedule(Target::All, t + Duration::from_millis(3), Reason::Changed);
        let due = s.take_due(t + Duration::from_millis(5)).unwrap();
        assert_eq!(
            due,
            vec![
                (key(1), Reason::ActionDone),
                (key(2), Reason::Retry),
                (Target::All, Reason::Changed)
            ]
        );
    }
}
