//! The watch feed: one tailer reads new event-log lines as they commit and fans them out on a
//! bounded broadcast ring; each watch client backfills from the log first (after its
//! `Last-Event-ID`), then follows the ring. Subscribing before the backfill query, and skipping
//! ids already sent, makes the hand-over gap-free and duplicate-free (ids are assigned in
//! commit order: every write holds the store's write gate).
//!
//! Memory is bounded: the ring holds `data_plane.watch_buffer_events` lines shared by all
//! clients. A client that falls further behind (a slow reader: TCP back-pressure stops its
//! stream from being polled) is ended with a `resync` event naming the last id it got; it can
//! reconnect with that id and lose nothing the log still holds.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::domain::ChatId;
use crate::store::{EventAction, Store, StoredEvent};

/// Lines read from the log per query.
const PAGE: u32 = 500;
/// The tailer also looks on its own this often (a wake-up is never needed for correctness).
const POLL: Duration = Duration::from_secs(2);

/// A change, as the stream sends it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Change {
    pub id: i64,
    pub at: String,
    pub chat_id: String,
    pub session_id: Option<String>,
    pub container_id: Option<String>,
    pub action: String,
    pub outcome: String,
    /// The chat's phase right after the change; `deleted` once its row is gone.
    pub phase: Option<String>,
    pub error: Option<String>,
    /// Where the sandbox was recorded running (`{ip, port[, host_port]}`), on a start or
    /// adopt: a moved sandbox's new address.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub endpoint: Option<serde_json::Value>,
}

impl Change {
    fn of(e: &StoredEvent) -> Self {
        let phase = match (&e.phase, e.chat_id.as_str()) {
            (Some(p), _) => Some(p.clone()),
            (None, "-") => None,
            (None, _) => Some("deleted".to_string()),
        };
        Self {
            id: e.id,
            at: e.at.clone(),
            chat_id: e.chat_id.clone(),
            session_id: e.session_id.clone(),
            container_id: e.container_id.clone(),
            action: e.action.clone(),
            outcome: e.outcome.clone(),
            phase,
            error: e.error.clone(),
            endpoint: e
                .detail
                .as_deref()
                .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                .and_then(|mut d| d.get_mut("endpoint").map(serde_json::Value::take)),
        }
    }
}

/// What a watch stream yields.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Change(Arc<Change>),
    /// The client fell behind the ring (or the log could not be read): it must reconnect
    /// with `Last-Event-ID: last_id`. The stream ends after it.
    Resync {
        last_id: i64,
        reason: String,
    },
}

/// The shared tail of the event log.
#[derive(Clone)]
pub struct WatchFeed {
    store: Store,
    ring: broadcast::Sender<Arc<Change>>,
    /// The newest id the tailer has sent (clients without a cursor start here).
    sent: Arc<AtomicI64>,
    /// Turns true at shutdown: open streams end (a graceful stop does not wait for them).
    stop: watch::Receiver<bool>,
}

impl WatchFeed {
    /// Starts the tailer (it stops when `shutdown` turns true).
    pub async fn start(
        store: Store,
        capacity: usize,
        mut shutdown: watch::Receiver<bool>,
    ) -> crate::store::Result<Self> {
        let start = store.last_event_id().await?;
        let feed = Self {
            store,
            ring: broadcast::channel(capacity.max(1)).0,
            sent: Arc::new(AtomicI64::new(start)),
            stop: shutdown.clone(),
        };
        let tailer = feed.clone();
        tokio::spawn(async move {
            loop {
                let more = tailer.tail_once().await;
                if more {
                    continue;
                }
                tokio::select! {
                    _ = tailer.store.events_appended() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.changed() => return,
                }
                if *shutdown.borrow() {
                    return;
                }
            }
        });
        Ok(feed)
    }

    /// Resolves at shutdown: every long-lived stream (this one, a process's followed output,
    /// a file watch) ends there, so a graceful stop never waits for its clients.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// The newest id sent to subscribers.
    pub fn sent_id(&self) -> i64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Sends one page of new lines; true when there may be more.
    async fn tail_once(&self) -> bool {
        let after = self.sent.load(Ordering::Acquire);
        match self.store.events_after(after, PAGE).await {
            Ok(lines) => {
                for line in &lines {
                    // Advanced first: a client subscribing now starts after this id and
                    // receives it from the ring (skipping nothing, duplicating nothing).
                    self.sent.store(line.id, Ordering::Release);
                    // No receiver is fine: nobody is watching.
                    let _ = self.ring.send(Arc::new(Change::of(line)));
                }
                lines.len() == PAGE as usize
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch feed: cannot read the event log");
                false
            }
        }
    }

    /// A client's stream: every change after `last_id` (or from now), for one chat or all.
    pub fn subscribe(
        &self,
        last_id: Option<i64>,
        chat: Option<ChatId>,
    ) -> impl Stream<Item = WatchItem> + Send + 'static {
        let mut ring = self.ring.subscribe();
        let store = self.store.clone();
        let chat = chat.map(|c| c.to_string());
        let from_now = self.sent.load(Ordering::Acquire);
        let mut stop = self.stop.clone();
        let wanted = move |c: &Change| {
            !EventAction::is_audit(&c.action) && chat.as_ref().is_none_or(|id| *id == c.chat_id)
        };
        async_stream::stream! {
            let mut cursor = match last_id {
                Some(id) => id,
                None => from_now,
            };
            if *stop.borrow() {
                return;
            }
            // A cursor past the newest line (a restored or replaced database): start over.
            if last_id.is_some_and(|id| id > from_now) {
                yield WatchItem::Resync {
                    last_id: from_now,
                    reason: "Last-Event-ID is past the newest event; reconnect with the id given".into(),
                };
                return;
            }
            // Backfill from the log.
            if last_id.is_some() {
                loop {
                    let page = match store.events_after(cursor, PAGE).await {
                        Ok(p) => p,
                        Err(e) => {
                            yield WatchItem::Resync { last_id: cursor, reason: format!("cannot read the event log: {e}") };
                            return;
                        }
                    };
                    let full = page.len() == PAGE as usize;
                    for line in &page {
                        cursor = line.id;
                        let change = Change::of(line);
                        if wanted(&change) {
                            yield WatchItem::Change(Arc::new(change));
                        }
                    }
                    if !full {
                        break;
                    }
                }
            }
            // Follow the ring.
            loop {
                let next = tokio::select! {
                    next = ring.recv() => next,
                    _ = stop.changed() => return,
                };
                match next {
                    Ok(change) if change.id <= cursor => continue,
                    Ok(change) => {
                        cursor = change.id;
                        if wanted(&change) {
                            yield WatchItem::Change(change);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        yield WatchItem::Resync {
                            last_id: cursor,
                            reason: format!("the client fell {n} changes behind; reconnect with Last-Event-ID"),
                        };
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}
