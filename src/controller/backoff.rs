//! Retry delays: exponential with jitter, capped, reset on success.
//!
//! The delay sequence comes from `backon` (the maintained successor named by RUSTSEC-2025-0012
//! for the unmaintained `backoff` crate). sandboxd does not retry inside a call; it stores
//! `attempts` and `next_attempt_at` and lets the level-triggered loop come back, so a restart
//! keeps the schedule and an operator can see it.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (1 = after the first failure): doubles each
    /// time, plus up to 100% jitter, never above `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let n = usize::try_from(attempt.max(1))
            .unwrap_or(usize::MAX)
            .min(64);
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(n - 1)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let p = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        let first = p.delay(1);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let fourth = p.delay(4);
        assert!(fourth >= Duration::from_millis(800) && fourth <= Duration::from_millis(1600));
        for attempt in [10, 40, u32::MAX] {
            assert!(p.delay(attempt) <= Duration::from_secs(5));
            assert!(p.delay(attempt) >= Duration::from_millis(2500));
        }
    }
}
