//! `?watch=true` on the sandbox list and on one sandbox: a Server-Sent Events stream of
//! changes from the event log (`dataplane::watch`). Each event's `id` is the log line's id;
//! a client that reconnects with `Last-Event-ID` (or `?last_event_id=`) gets every change it
//! missed. A client that falls too far behind gets a final `resync` event and the stream ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::input::{self, QueryParams, Source};
use super::{ApiError, AppState};
use crate::dataplane::watch::WatchItem;
use crate::domain::ChatId;

/// Whether `?watch=` asks for a stream (`true`/`1`/`yes`). `?last_event_id=` is checked too,
/// also without `watch` (a malformed parameter is refused wherever it appears).
pub fn wanted(params: &QueryParams) -> Result<bool, ApiError> {
    if let Some(raw) = params.get("last_event_id") {
        event_id(raw, "last_event_id")?;
    }
    match params.get("watch") {
        None => Ok(false),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" | "" => Ok(false),
            _ => Err(input::reject(
                "bool_parsing",
                Source::Query,
                "watch",
                "Input should be a valid boolean, unable to interpret input".into(),
                json!(v),
            )),
        },
    }
}

/// A non-negative event id, or the 422 naming `field`.
fn event_id(raw: &str, field: &str) -> Result<i64, ApiError> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            input::reject(
                "int_parsing",
                Source::Query,
                field,
                "Input should be a non-negative event id".into(),
                json!(raw),
            )
        })
}

/// The SSE response for one chat or all.
pub fn stream(
    state: &AppState,
    headers: &HeaderMap,
    params: &QueryParams,
    chat: Option<ChatId>,
) -> Result<Response, ApiError> {
    let raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| (s.to_string(), "Last-Event-ID"))
        .or_else(|| {
            params
                .get("last_event_id")
                .map(|s| (s.to_string(), "last_event_id"))
        });
    let last_id = match raw {
        None => None,
        Some((s, field)) => Some(event_id(&s, field)?),
    };
    let items = state.watch.subscribe(last_id, chat).map(|item| {
        let event = match item {
            WatchItem::Change(c) => Event::default()
                .id(c.id.to_string())
                .event("change")
                .json_data(&*c)
                .unwrap_or_else(|_| Event::default().comment("unencodable change")),
            WatchItem::Resync { last_id, reason } => Event::default()
                .event("resync")
                .data(json!({ "last_event_id": last_id, "detail": reason }).to_string()),
        };
        Ok::<_, Infallible>(event)
    });
    Ok(Sse::new(items)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
