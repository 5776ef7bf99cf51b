//! `GET /api/v1/sandboxes/{chat_id}/files/watch`: file events under a path of a sandbox's
//! mounts as Server-Sent Events ([`crate::dataplane::filewatch`]). `ready` comes first, once
//! the watch is armed (what changes after it is seen); then one event per change, named by
//! its type; `resync` last if events were lost.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::dataplane::data_plane_error;
use super::error::ChatPath;
use super::input::{self, QueryParams, Source};
use super::views::{ErrorBody, ValidationErrorBody};
use super::{ApiError, AppState};
use crate::dataplane::filewatch::WatchItem;

/// Watch a path of the sandbox's mounts for changes.
#[utoipa::path(get, operation_id = "watch_files", path = "/api/v1/sandboxes/{chat_id}/files/watch", tag = "data plane",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("path" = Option<String>, Query, description = "a directory or file, relative to the chat mount or absolute on a mount (default: the chat mount)"),
        ("recursive" = Option<bool>, Query, description = "also everything below (default false)")),
    responses(
        (status = 200, description = "Server-Sent Events: `ready` `{path, recursive}` once armed, then `create`, `modify`, `delete`, `rename` \
            (`{type, path, is_dir?, side?, cookie?}`, container paths), and `resync` last when events were lost (the client fell \
            `data_plane.watch_buffer_events` behind, or the kernel's queue overflowed)",
            body = crate::dataplane::filewatch::FileEvent, content_type = "text/event-stream"),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 403, description = "a symlink leads off the sandbox's mounts", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such path", body = ErrorBody),
        (status = 409, description = "the sandbox is not live (deleted or expired)", body = ErrorBody),
        (status = 422, description = "invalid path (`..`, NUL, not on a mount)", body = ValidationErrorBody),
        (status = 429, description = "over `data_plane.max_file_watches(_per_sandbox)`, or the host's inotify limit", body = ErrorBody)))]
pub async fn watch(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    let raw = params.get("path").unwrap_or(".").to_string();
    let mut p = input::Problems::default();
    let recursive = params.flag("recursive", &mut p);
    p.finish()?;
    let mut watch = state
        .data_plane
        .watch_files(chat_id, &raw, recursive)
        .await
        .map_err(|e| data_plane_error(e, Source::Query, "path", &raw))?;
    let ready = json!({"path": watch.path, "recursive": recursive});
    let stopped = state.watch.stopped();
    let events = async_stream::stream! {
        yield Event::default().event("ready").data(ready.to_string());
        let mut stopped = std::pin::pin!(stopped);
        loop {
            // sandboxd stops: the stream ends, so a graceful stop does not wait for it.
            let item = tokio::select! {
                item = watch.next() => item,
                _ = &mut stopped => None,
            };
            let Some(item) = item else { break };
            match item {
                WatchItem::Event(e) => {
                    yield Event::default()
                        .event(e.kind)
                        .json_data(&e)
                        .unwrap_or_else(|_| Event::default().comment("unencodable event"));
                }
                WatchItem::Resync(why) => {
                    yield Event::default().event("resync").data(json!({"detail": why}).to_string());
                    break;
                }
            }
        }
    };
    let events = futures::StreamExt::map(events, Ok::<_, Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
