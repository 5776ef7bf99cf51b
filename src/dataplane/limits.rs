//! Concurrency limits of the data plane: calls in flight overall and per sandbox. A call over
//! either limit is refused at once (429 with `Retry-After`), never queued: a queue would hold
//! the caller's connection and hide the overload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;

use crate::domain::ChatId;

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    Overall(usize),
    Sandbox(usize),
}

impl Busy {
    /// The 429's detail: which setting (`data_plane.<overall>` or `<per_sandbox>`) refused.
    pub fn detail(self, overall: &str, per_sandbox: &str) -> String {
        match self {
            Busy::Overall(n) => format!("data_plane.{overall} is {n}"),
            Busy::Sandbox(n) => format!("data_plane.{per_sandbox} is {n}"),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_chat: HashMap<ChatId, usize>,
}

/// The counters; cheap to clone.
#[derive(Clone)]
pub struct Slots {
    overall: usize,
    per_sandbox: usize,
    counts: Arc<Mutex<Counts>>,
    /// Mirrors the overall count (`sandboxd_data_plane_in_flight`).
    gauge: Gauge<i64>,
    /// Told the chat when one of its calls ends (the idle clock restarts there).
    on_release: Option<ReleaseHook>,
}

/// What runs when a call's slot is freed.
pub type ReleaseHook = Arc<dyn Fn(ChatId) + Send + Sync>;

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("overall", &self.overall)
            .field("per_sandbox", &self.per_sandbox)
            .finish()
    }
}

/// Held while a call runs; frees its slot when dropped (however the call ends).
pub struct Slot {
    chat_id: ChatId,
    counts: Arc<Mutex<Counts>>,
    gauge: Gauge<i64>,
    on_release: Option<ReleaseHook>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("chat_id", &self.chat_id)
            .finish()
    }
}

impl Slots {
    pub fn new(overall: usize, per_sandbox: usize, gauge: Gauge<i64>) -> Self {
        Self {
            overall,
            per_sandbox,
            counts: Arc::default(),
            gauge,
            on_release: None,
        }
    }

    /// Runs `hook` with the chat whenever one of its calls ends.
    pub fn on_release(mut self, hook: ReleaseHook) -> Self {
        self.on_release = Some(hook);
        self
    }

    /// The chat's calls in flight: a sandbox serving one is not idle.
    pub fn in_flight_for(&self, chat_id: ChatId) -> usize {
        self.counts
            .lock()
            .map(|c| c.per_chat.get(&chat_id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn try_take(&self, chat_id: ChatId) -> Result<Slot, Busy> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.overall {
            return Err(Busy::Overall(self.overall));
        }
        let mine = c.per_chat.entry(chat_id).or_insert(0);
        if *mine >= self.per_sandbox {
            return Err(Busy::Sandbox(self.per_sandbox));
        }
        *mine += 1;
        c.total += 1;
        self.gauge.inc();
        Ok(Slot {
            chat_id,
            counts: self.counts.clone(),
            gauge: self.gauge.clone(),
            on_release: self.on_release.clone(),
        })
    }

    /// Calls in flight (for metrics and tests).
    pub fn in_flight(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        self.gauge.dec();
        if let Some(n) = c.per_chat.get_mut(&self.chat_id) {
            *n -= 1;
            if *n == 0 {
                c.per_chat.remove(&self.chat_id);
            }
        }
        drop(c);
        if let Some(hook) = &self.on_release {
            hook(self.chat_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_per_sandbox_and_overall_and_free_on_drop() {
        let gauge = Gauge::default();
        let slots = Slots::new(3, 2, gauge.clone());
        let (a, b) = (ChatId(uuid::Uuid::new_v4()), ChatId(uuid::Uuid::new_v4()));
        let a1 = slots.try_take(a).unwrap();
        let _a2 = slots.try_take(a).unwrap();
        assert_eq!(slots.try_take(a).unwrap_err(), Busy::Sandbox(2));
        let _b1 = slots.try_take(b).unwrap();
        assert_eq!(slots.try_take(b).unwrap_err(), Busy::Overall(3));
        drop(a1);
        assert_eq!(slots.in_flight(), 2);
        let _b2 = slots.try_take(b).unwrap();
        assert_eq!(slots.in_flight(), 3);
        assert_eq!(gauge.get(), 3);
    }
}
