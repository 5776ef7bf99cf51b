//! The watch stream (`?watch=true`, Server-Sent Events from the event log): order, resuming
//! with `Last-Event-ID` without gaps or duplicates, and slow clients cut off with `resync`.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;
use sandboxd::dataplane::watch::{WatchFeed, WatchItem};
use sandboxd::store::{EventAction, EventOutcome, NewEvent};

/// One SSE event: `id`, `event`, `data` (JSON).
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: Option<i64>,
    pub event: String,
    pub data: Value,
}

/// Reads SSE events off a response body (test-side parsing of `text/event-stream`).
pub struct SseReader {
    response: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub async fn open(app: &TestApp, path: &str, last_id: Option<i64>) -> Self {
        let mut req = app
            .client
            .get(app.url(path))
            .header("Accept", "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let response = req.send().await.expect("watch request");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Self {
            response,
            buf: String::new(),
        }
    }

    /// The next event (comments and keep-alives skipped), `None` when the stream ends.
    pub async fn next(&mut self, within: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Sse {
                    id: None,
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                ev.data = serde_json::from_str(&data).expect("JSON data");
                return Some(ev);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an event in time")
                .expect("stream read");
            self.buf
                .push_str(std::str::from_utf8(&chunk?).expect("UTF-8"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_a_chat_go_pending_running_deleted_and_a_reconnect_misses_nothing() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let mut one =
        SseReader::open(&app, &format!("/api/v1/sandboxes/{chat}?watch=true"), None).await;
    let mut all = SseReader::open(&app, "/api/v1/sandboxes?watch=true", None).await;

    let (status, _) = app.create(&chat, "a", &app.volume("w")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.delete(&chat).await;
    assert_eq!(status, StatusCode::OK);

    // In order, ids increasing, every change about this chat.
    let mut phases = Vec::new();
    let mut last = 0;
    while phases.last().map(String::as_str) != Some("deleted") {
        let ev = one
            .next(Duration::from_secs(20))
            .await
            .expect("stream open");
        assert_eq!(ev.event, "change");
        let id = ev.id.expect("an id");
        assert!(id > last, "ids go up: {id} after {last}");
        assert_eq!(ev.data["id"], id);
        last = id;
        assert_eq!(ev.data["chat_id"], chat.as_str());
        phases.push(ev.data["phase"].as_str().unwrap().to_string());
    }
    let order: Vec<&str> = ["pending", "running", "deleted"]
        .into_iter()
        .filter(|p| phases.iter().any(|x| x == p))
        .collect();
    assert_eq!(order, ["pending", "running", "deleted"], "{phases:?}");
    let first = |p: &str| phases.iter().position(|x| x == p).unwrap();
    assert!(first("pending") < first("running") && first("running") < first("deleted"));

    // The all-chats watcher read one change, then went away.
    let seen = all.next(Duration::from_secs(10)).await.unwrap();
    let resume_from = seen.id.unwrap();
    drop(all);
    // While it is away: another chat comes and goes, and an exec is audited (not a change).
    let other = new_chat();
    app.create(&other, "a", &app.volume("w2")).await;
    let (status, _) = app
        .post_json(
            &format!("/api/v1/sandboxes/{other}/exec"),
            &serde_json::json!({"command": "true"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    app.delete(&other).await;

    // Reconnected with Last-Event-ID: exactly the changes after it, then live ones.
    let mut again = SseReader::open(&app, "/api/v1/sandboxes?watch=true", Some(resume_from)).await;
    let expected: BTreeSet<i64> = {
        let store = sandboxd::store::Store::open_read_only(&app.settings.database.path)
            .await
            .unwrap();
        store
            .events_after(resume_from, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| !EventAction::is_audit(&e.action))
            .map(|e| e.id)
            .collect()
    };
    assert!(expected.len() >= 6, "{expected:?}");
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let ev = again.next(Duration::from_secs(10)).await.unwrap();
        got.push(ev.id.unwrap());
    }
    let unique: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no duplicates: {got:?}");
    assert_eq!(unique, expected, "no gaps");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    // The hand-over to live changes keeps going.
    let live = new_chat();
    app.create(&live, "a", &app.volume("w3")).await;
    let ev = again.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ev.data["chat_id"], live.as_str());
    assert!(ev.id.unwrap() > *got.last().unwrap());

    // A bad Last-Event-ID is named.
    let r = app
        .client
        .get(app.url("/api/v1/sandboxes?watch=true"))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// A log line about no chat: a change every watcher of all chats sees.
fn log_line(note: &str) -> NewEvent<'_> {
    NewEvent {
        chat_id: "-",
        session_id: None,
        container_id: None,
        action: EventAction::RemoveOrphan,
        outcome: EventOutcome::Ok,
        error: Some(note),
        actor: None,
        detail: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_is_cut_off_with_resync_and_resumes_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let store = sandboxd::store::Store::open(&dir.path().join("w.db"), Duration::from_secs(5), 4)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let feed = WatchFeed::start(store.clone(), 8, stop).await.unwrap();
    // Subscribed, but not reading (a slow client: its stream is not polled).
    let slow = feed.subscribe(None, None);
    let start = store.last_event_id().await.unwrap();
    for i in 0..50 {
        let note = format!("event {i}");
        let event = log_line(&note);
        store.event(&event, chrono::Utc::now()).await.unwrap();
    }
    let newest = store.last_event_id().await.unwrap();
    wait_until(Duration::from_secs(10), "the feed sends all 50", || async {
        (feed.sent_id() == newest).then_some(())
    })
    .await;
    // 50 changes passed through an 8-line ring: the client gets one `resync`, then the end.
    let items: Vec<WatchItem> = slow.collect().await;
    assert_eq!(items.len(), 1, "{items:?}");
    let WatchItem::Resync { last_id, reason } = &items[0] else {
        panic!("expected resync, got {items:?}");
    };
    assert_eq!(*last_id, start);
    assert!(reason.contains("Last-Event-ID"));
    // Resuming from the id it names loses nothing.
    let resumed: Vec<i64> = feed
        .subscribe(Some(*last_id), None)
        .take(50)
        .map(|item| match item {
            WatchItem::Change(c) => c.id,
            other => panic!("{other:?}"),
        })
        .collect()
        .await;
    assert_eq!(resumed, ((start + 1)..=newest).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_client_that_stops_reading_gets_resync_and_the_stream_ends() {
    let app = TestApp::spawn_with(|s| s.data_plane.watch_buffer_events = 16).await;
    let mut slow = SseReader::open(&app, "/api/v1/sandboxes?watch=true", None).await;
    // While the client reads nothing, far more changes than the ring and the socket buffers
    // hold: lines of the log written through a second handle on the same database (the
    // server's tailer finds them on its own within its poll period).
    let writer =
        sandboxd::store::Store::open(&app.settings.database.path, Duration::from_secs(5), 2)
            .await
            .unwrap();
    let filler = "x".repeat(900);
    for _ in 0..3000 {
        let event = log_line(&filler);
        writer.event(&event, chrono::Utc::now()).await.unwrap();
    }
    // Now read: what the buffers held, then one `resync`, then the end of the stream.
    let mut changes = 0;
    let last = loop {
        match slow.next(Duration::from_secs(30)).await {
            Some(ev) if ev.event == "change" => changes += 1,
            Some(ev) => break Some(ev),
            None => break None,
        }
    };
    let resync = last.expect("a final event, not a silent end");
    assert_eq!(resync.event, "resync", "{resync:?}");
    assert!(
        resync.data["last_event_id"].as_i64().is_some(),
        "{resync:?}"
    );
    assert!(
        changes < 3000,
        "the client was cut off, not fed everything ({changes})"
    );
    assert!(
        slow.next(Duration::from_secs(10)).await.is_none(),
        "the stream ends after resync"
    );
}
