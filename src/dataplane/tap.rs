//! What the pump of a background process or a terminal keeps of its exec: the pid (the
//! wrapper's first line of output, `ring::PID_WRAPPER`) and the output by offset, in a ring.
//! One type for both, so the pid handshake and the ring's locking are written once.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::ring::{OutputRing, PidLine, Read, Stream};

pub struct Tap {
    pid: OnceLock<Option<u32>>,
    pid_seen: Notify,
    pid_line: Mutex<PidLine>,
    output: Mutex<OutputRing>,
}

impl Tap {
    /// A tap keeping at most `capacity` bytes of output.
    pub fn new(capacity: usize) -> Self {
        Self {
            pid: OnceLock::new(),
            pid_seen: Notify::new(),
            pid_line: Mutex::default(),
            output: Mutex::new(OutputRing::new(capacity)),
        }
    }

    /// The pid in the sandbox, once its line came (`None` before, or if it never did).
    pub fn pid(&self) -> Option<u32> {
        self.pid.get().copied().flatten()
    }

    /// Takes the pid line off the start of the output: the pid when this chunk completed
    /// its line, and the output that follows.
    pub fn feed_pid_line(&self, data: Bytes) -> (Option<u32>, Bytes) {
        let (pid, rest) = self
            .pid_line
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .feed(data);
        match pid {
            Some(pid) => {
                self.settle_pid(pid);
                (pid, rest)
            }
            None => (None, rest),
        }
    }

    /// The output ended: a pid that has not come never will.
    pub fn finish(&self) {
        self.settle_pid(None);
    }

    fn settle_pid(&self, pid: Option<u32>) {
        let _ = self.pid.set(pid);
        self.pid_seen.notify_waiters();
    }

    /// Waits up to `within` for the pid line, unless `ended` says the exec is over.
    pub async fn wait_pid(&self, within: Duration, ended: impl Fn() -> bool) {
        // Registered before the check: a pid that comes in between still wakes it.
        let seen = self.pid_seen.notified();
        if self.pid.get().is_none() && !ended() {
            let _ = tokio::time::timeout(within, seen).await;
        }
    }

    /// Appends output; the new end offset when anything was added.
    pub fn push(&self, stream: Stream, data: Bytes) -> Option<u64> {
        if data.is_empty() {
            return None;
        }
        let mut ring = self.output.lock().unwrap_or_else(|p| p.into_inner());
        ring.push(stream, data);
        Some(ring.end())
    }

    /// The output from `since` on.
    pub fn read_from(&self, since: u64) -> Read {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_from(since)
    }

    /// Bytes written so far, and bytes dropped from the front.
    pub fn extent(&self) -> (u64, u64) {
        let ring = self.output.lock().unwrap_or_else(|p| p.into_inner());
        (ring.end(), ring.dropped())
    }
}
