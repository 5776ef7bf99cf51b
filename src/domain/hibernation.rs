//! Hibernation as desired state: what a sandbox should be (`running`, `paused`,
//! `hibernated`), and how the idle policy turns a declared state into the effective one.
//! Pure: the planner's caller applies it to every row with the pass's clock.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// The state a client (or the expiry policy) declared for a sandbox; ordered from most to
/// least awake, so the idle policy can only move a sandbox further along.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Processes run (the default).
    Running,
    /// Processes frozen in place: memory kept, CPU zero, resumed in milliseconds.
    Paused,
    /// The container stopped, its writable layer and mounts kept: memory freed; a resume
    /// starts the same container (same id, name, mounts, env) again.
    Hibernated,
}

impl SandboxState {
    pub const ALL: [SandboxState; 3] = [
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Hibernated,
    ];

    /// The phase a sandbox settles in once it is in this state.
    pub fn phase(self) -> crate::domain::Phase {
        match self {
            SandboxState::Running => crate::domain::Phase::Running,
            SandboxState::Paused => crate::domain::Phase::Paused,
            SandboxState::Hibernated => crate::domain::Phase::Hibernated,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Hibernated => "hibernated",
        }
    }
}

impl FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown state `{s}`"))
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sandbox.idle_pause_seconds` and `sandbox.idle_hibernate_seconds`: idle means no
/// create/reuse, exec, file call, renew or resume for that long. `None` is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdlePolicy {
    pub pause_after: Option<Duration>,
    pub hibernate_after: Option<Duration>,
}

impl IdlePolicy {
    /// Whether idleness pauses or hibernates anything (else the idle clock is only shown).
    pub fn acts(&self) -> bool {
        self.pause_after.is_some() || self.hibernate_after.is_some()
    }
}

/// `sandbox.on_expiry`: what a session's TTL ends in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    /// The container is removed and the row kept as `expired` (the old service's behaviour).
    #[default]
    Delete,
    /// The sandbox is declared `hibernated` for `sandbox.hibernated_retention_seconds`, and
    /// removed after that; a call in between resumes it as it was.
    Hibernate,
}

/// The whole hibernation policy, as the planner's caller applies it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub idle: IdlePolicy,
    pub on_expiry: OnExpiry,
}

/// What the sandbox should be now: the declared state, or further along when it has been
/// idle long enough; and when that answer changes on its own (a timer for the scheduler).
pub fn effective_state(
    declared: SandboxState,
    last_active: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: IdlePolicy,
) -> (SandboxState, Option<DateTime<Utc>>) {
    let mut state = declared;
    let mut next: Option<DateTime<Utc>> = None;
    for (after, to) in [
        (policy.pause_after, SandboxState::Paused),
        (policy.hibernate_after, SandboxState::Hibernated),
    ] {
        let Some(after) = after else { continue };
        if to <= declared {
            continue;
        }
        let at = last_active + after;
        if now >= at {
            state = state.max(to);
        } else if next.is_none_or(|n| at < n) {
            next = Some(at);
        }
    }
    // A deadline for a state already reached (pause after hibernate) changes nothing.
    let next = next.filter(|_| state != SandboxState::Hibernated);
    (state, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn policy(pause: Option<i64>, hibernate: Option<i64>) -> IdlePolicy {
        IdlePolicy {
            pause_after: pause.map(Duration::seconds),
            hibernate_after: hibernate.map(Duration::seconds),
        }
    }

    #[test]
    fn states_round_trip_and_are_ordered_by_depth() {
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
        }
        assert!("asleep".parse::<SandboxState>().is_err());
        assert!(SandboxState::Running < SandboxState::Paused);
        assert!(SandboxState::Paused < SandboxState::Hibernated);
    }

    #[test]
    fn without_a_policy_the_declared_state_holds_forever() {
        for s in SandboxState::ALL {
            assert_eq!(
                effective_state(s, t(0), t(1_000_000), IdlePolicy::default()),
                (s, None)
            );
        }
    }

    #[test]
    fn idleness_pauses_then_hibernates_and_each_step_is_a_timer() {
        let p = policy(Some(60), Some(600));
        let run = SandboxState::Running;
        assert_eq!(effective_state(run, t(0), t(59), p), (run, Some(t(60))));
        assert_eq!(
            effective_state(run, t(0), t(60), p),
            (SandboxState::Paused, Some(t(600)))
        );
        assert_eq!(
            effective_state(run, t(0), t(600), p),
            (SandboxState::Hibernated, None)
        );
        // Activity moves every timer.
        assert_eq!(effective_state(run, t(550), t(600), p), (run, Some(t(610))));
    }

    #[test]
    fn a_declared_state_is_never_woken_by_the_policy() {
        let p = policy(Some(60), Some(600));
        assert_eq!(
            effective_state(SandboxState::Paused, t(0), t(10), p),
            (SandboxState::Paused, Some(t(600)))
        );
        assert_eq!(
            effective_state(SandboxState::Hibernated, t(0), t(10), p),
            (SandboxState::Hibernated, None)
        );
    }

    #[test]
    fn either_step_works_alone() {
        let only_hibernate = policy(None, Some(30));
        assert_eq!(
            effective_state(SandboxState::Running, t(0), t(29), only_hibernate),
            (SandboxState::Running, Some(t(30)))
        );
        let only_pause = policy(Some(30), None);
        assert_eq!(
            effective_state(SandboxState::Running, t(0), t(31), only_pause),
            (SandboxState::Paused, None)
        );
        // A pause step longer than the hibernate step: hibernate comes first and wins.
        let odd = policy(Some(100), Some(50));
        assert_eq!(
            effective_state(SandboxState::Running, t(0), t(60), odd),
            (SandboxState::Hibernated, None)
        );
    }
}
