//! Background-process routes: start, list, read one, output from an offset (NDJSON or SSE),
//! stdin, signal, kill. They call [`crate::dataplane::processes`].

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::dataplane::{caller, parse_command, Peer, COMMAND_FIELDS};
use super::input::{self, Problems, QueryParams, Source};
use super::views::{ErrorBody, ValidationErrorBody};
use super::{ApiError, AppState};
use crate::dataplane::output::{encode, Encoding};
use crate::dataplane::processes::{parse_signal, Handle, ProcessInfo, ProcessRequest, SIGNALS};
use crate::dataplane::ring::Frame;
use crate::domain::{format_time, ChatId};

/// A background process's start. `command` is an argv list, or a string run by `sh -c`.
// Documents the input for OpenAPI; the handler reads it field by field.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessBody {
    /// `["python", "-m", "http.server"]` or `"npm run dev"` (run by `sh -c`).
    #[schema(value_type = Object)]
    command: Value,
    env: Option<std::collections::BTreeMap<String, String>>,
    /// Relative to the chat mount, or absolute on one of the sandbox's mounts.
    workdir: Option<String>,
    /// Text written to its stdin first; stdin stays open for `POST …/stdin`.
    stdin: Option<String>,
    /// Binary first stdin, base64 (instead of `stdin`).
    stdin_base64: Option<String>,
}

/// A background process.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessView {
    process_id: String,
    /// In the sandbox's PID namespace (`null` if it never ran).
    pid: Option<u32>,
    /// The argv as asked (a string command is `["sh", "-c", text]`).
    #[schema(value_type = Object)]
    command: Value,
    workdir: String,
    /// `running`, `exited`, `killed` (through the API) or `lost` (its container went away).
    state: String,
    exit_code: Option<i64>,
    started_at: String,
    ended_at: Option<String>,
    /// Output so far, stdout and stderr together (bytes): the offset a reader at the end is at.
    output_bytes: u64,
    /// Output the ring no longer holds (from offset 0).
    dropped_bytes: u64,
    /// Whether sandboxd holds its output: not for a process started before sandboxd restarted.
    output_kept: bool,
    stdin_open: bool,
}

impl From<ProcessInfo> for ProcessView {
    fn from(i: ProcessInfo) -> Self {
        let r = i.record;
        Self {
            command: serde_json::from_str(&r.command).unwrap_or(Value::String(r.command)),
            process_id: r.process_id,
            pid: r.pid,
            workdir: r.workdir,
            state: r.state.as_str().into(),
            exit_code: r.exit_code,
            started_at: format_time(r.started_at),
            ended_at: r.ended_at.map(format_time),
            output_bytes: i.output_bytes,
            dropped_bytes: i.dropped_bytes,
            output_kept: i.output_kept,
            stdin_open: i.stdin_open,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    processes: Vec<ProcessView>,
}

/// Input for `…/stdin`.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinBody {
    data: Option<String>,
    /// Binary input, base64 (instead of `data`).
    data_base64: Option<String>,
    /// Close stdin after the data (the process reads end-of-file).
    eof: Option<bool>,
}

/// Input for `…/signal`.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A name (`TERM`, `SIGINT`, …: HUP INT QUIT KILL USR1 USR2 TERM CONT STOP TSTP ALRM
    /// WINCH) or a number 1-64.
    signal: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Signalled {
    process: ProcessView,
    /// The signal as sent.
    signal: String,
    /// Processes of its tree that got it.
    delivered: u32,
}

/// The process id in a path (a UUID; anything else names no process).
fn process_path(raw_chat: &str, raw_id: &str) -> Result<(ChatId, String), ApiError> {
    let chat_id = input::path_chat_id(raw_chat)?;
    let id = uuid::Uuid::parse_str(raw_id)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::DataPlane(crate::dataplane::DataPlaneError::ProcessNotFound))?;
    Ok((chat_id, id))
}

/// Start a background process in the running sandbox.
#[utoipa::path(post, operation_id = "start_process", path = "/api/v1/sandboxes/{chat_id}/processes", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    request_body = ProcessBody,
    responses(
        (status = 201, description = "started; it runs until it exits or is killed, whoever reads its output", body = ProcessView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox", body = ErrorBody),
        (status = 409, description = "the sandbox is not running (the detail names its phase)", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 429, description = "over `data_plane.max_processes(_per_sandbox)` or the call limits; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer, or a sleeping sandbox could not be resumed", body = ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    Path(raw_chat): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let obj = input::json_object(&headers, &body)?;
    let mut p = Problems::default();
    let command = parse_command(&state, &obj, &mut p);
    let mut f = input::Fields::new(&obj);
    f.forbid_others(COMMAND_FIELDS);
    let mut all = f.problems;
    all.extend(p);
    all.finish()?;
    let workdir = command.workdir.clone().unwrap_or_default();
    let who = caller(&state, &headers, peer);
    let req = ProcessRequest {
        argv: command.argv,
        env: command.env,
        workdir: command.workdir,
        stdin: command.stdin,
    };
    let info = state
        .data_plane
        .start_process(chat_id, req, &who)
        .await
        .map_err(|e| super::dataplane::data_plane_error(e, Source::Body, "workdir", &workdir))?;
    Ok((StatusCode::CREATED, Json(ProcessView::from(info))).into_response())
}

/// The background processes of the sandbox's current session, oldest first.
#[utoipa::path(get, operation_id = "list_processes", path = "/api/v1/sandboxes/{chat_id}/processes", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "running ones and the last ended ones (`data_plane.processes_kept_ended`)", body = ProcessList),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox", body = ErrorBody),
        (status = 422, description = "the chat id is not a UUID", body = ValidationErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Path(raw_chat): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let all = state.data_plane.processes(chat_id).await?;
    Ok(Json(ProcessList {
        processes: all.into_iter().map(ProcessView::from).collect(),
    }))
}

/// One background process.
#[utoipa::path(get, operation_id = "get_process", path = "/api/v1/sandboxes/{chat_id}/processes/{process_id}", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("process_id" = String, Path, format = "uuid")),
    responses(
        (status = 200, description = "the process", body = ProcessView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process in its session", body = ErrorBody),
        (status = 422, description = "the chat id is not a UUID", body = ValidationErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path((raw_chat, raw_id)): Path<(String, String)>,
) -> Result<Json<ProcessView>, ApiError> {
    let (chat_id, id) = process_path(&raw_chat, &raw_id)?;
    Ok(Json(state.data_plane.process(chat_id, &id).await?.into()))
}

/// Kill a background process and every process it started (SIGKILL).
#[utoipa::path(delete, operation_id = "kill_process", path = "/api/v1/sandboxes/{chat_id}/processes/{process_id}", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("process_id" = String, Path, format = "uuid")),
    responses(
        (status = 200, description = "killed (`state: killed`), or already ended (as it was)", body = ProcessView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process", body = ErrorBody),
        (status = 409, description = "the sandbox is not running", body = ErrorBody),
        (status = 422, description = "the chat id is not a UUID", body = ValidationErrorBody),
        (status = 429, description = "too many data-plane calls; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer", body = ErrorBody)))]
pub async fn kill(
    State(state): State<AppState>,
    Path((raw_chat, raw_id)): Path<(String, String)>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Json<ProcessView>, ApiError> {
    let (chat_id, id) = process_path(&raw_chat, &raw_id)?;
    let who = caller(&state, &headers, peer);
    Ok(Json(
        state
            .data_plane
            .kill_process(chat_id, &id, &who)
            .await?
            .into(),
    ))
}

/// Send a signal to a background process and every process it started.
#[utoipa::path(post, operation_id = "signal_process", path = "/api/v1/sandboxes/{chat_id}/processes/{process_id}/signal", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("process_id" = String, Path, format = "uuid")),
    request_body = SignalBody,
    responses(
        (status = 200, description = "sent", body = Signalled),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process", body = ErrorBody),
        (status = 409, description = "the process has ended, or the sandbox is not running", body = ErrorBody),
        (status = 422, description = "not a signal sandboxd sends", body = ValidationErrorBody),
        (status = 429, description = "too many data-plane calls; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer", body = ErrorBody)))]
pub async fn signal(
    State(state): State<AppState>,
    Path((raw_chat, raw_id)): Path<(String, String)>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Signalled>, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let obj = input::json_object(&headers, &body)?;
    let mut f = input::Fields::new(&obj);
    let raw = f.string("signal").map(str::to_string);
    f.forbid_others(&["signal"]);
    let mut p = f.problems;
    let signal = raw.and_then(|raw| {
        let parsed = parse_signal(&raw);
        if parsed.is_none() {
            p.push(
                "value_error",
                Source::Body,
                "signal",
                format!(
                    "Value error, one of {} (with or without SIG), or a number 1-64",
                    SIGNALS.join(" ")
                ),
                json!(raw),
            );
        }
        parsed
    });
    p.finish()?;
    let (_, id) = process_path(&raw_chat, &raw_id)?;
    let signal = signal.unwrap_or_default();
    let who = caller(&state, &headers, peer);
    let (info, delivered) = state
        .data_plane
        .signal_process(chat_id, &id, &signal, &who)
        .await?;
    Ok(Json(Signalled {
        process: info.into(),
        signal,
        delivered,
    }))
}

/// Write to a background process's stdin (and close it with `eof`).
#[utoipa::path(post, operation_id = "process_stdin", path = "/api/v1/sandboxes/{chat_id}/processes/{process_id}/stdin", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("process_id" = String, Path, format = "uuid")),
    request_body = StdinBody,
    responses(
        (status = 200, description = "written", body = ProcessView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process", body = ErrorBody),
        (status = 409, description = "the process has ended, its stdin is closed, or it does not read it", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn stdin(
    State(state): State<AppState>,
    Path((raw_chat, raw_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ProcessView>, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let obj = input::json_object(&headers, &body)?;
    let mut p = Problems::default();
    let data = match (obj.get("data"), obj.get("data_base64")) {
        (Some(Value::String(s)), None) => s.clone().into_bytes(),
        (None, Some(Value::String(b))) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_else(|e| {
                p.push(
                    "value_error",
                    Source::Body,
                    "data_base64",
                    format!("Value error, not base64: {e}"),
                    json!(b),
                );
                Vec::new()
            }),
        (None | Some(Value::Null), None | Some(Value::Null)) => Vec::new(),
        (Some(Value::String(_)), Some(Value::String(_))) => {
            p.push(
                "value_error",
                Source::Body,
                "data",
                "Value error, give `data` or `data_base64`, not both".into(),
                Value::Null,
            );
            Vec::new()
        }
        (Some(other), _) | (_, Some(other)) => {
            p.push(
                "string_type",
                Source::Body,
                "data",
                "Input should be a valid string".into(),
                other.clone(),
            );
            Vec::new()
        }
    };
    let eof = match obj.get("eof") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            p.push(
                "bool_type",
                Source::Body,
                "eof",
                "Input should be a valid boolean".into(),
                other.clone(),
            );
            false
        }
    };
    let mut f = input::Fields::new(&obj);
    f.forbid_others(&["data", "data_base64", "eof"]);
    let mut all = f.problems;
    all.extend(p);
    all.finish()?;
    let (_, id) = process_path(&raw_chat, &raw_id)?;
    let info = state
        .data_plane
        .process_stdin(chat_id, &id, &data, eof)
        .await?;
    Ok(Json(info.into()))
}

/// One item of an output stream.
enum Item {
    /// Output the ring dropped before the reader came: `bytes` from the offset asked for.
    Dropped {
        offset: u64,
        bytes: u64,
    },
    Output(Frame),
    /// The last item: where a reader goes on, and the process as it is now.
    End {
        offset: u64,
        process: Box<ProcessView>,
    },
}

impl Item {
    fn kind(&self) -> &'static str {
        match self {
            Item::Dropped { .. } => "dropped",
            Item::Output(_) => "output",
            Item::End { .. } => "end",
        }
    }

    /// The offset a reader that saw this item goes on from.
    fn next(&self) -> u64 {
        match self {
            Item::Dropped { offset, bytes } => offset + bytes,
            Item::Output(f) => f.next(),
            Item::End { offset, .. } => *offset,
        }
    }

    fn json(&self) -> Value {
        match self {
            Item::Dropped { offset, bytes } => {
                json!({ "type": "dropped", "offset": offset, "dropped_bytes": bytes })
            }
            Item::Output(f) => {
                let (data, encoding) = encode(&f.data);
                let mut v = json!({ "type": "output", "offset": f.offset,
                    "stream": f.stream.as_str(), "data": data });
                if encoding == Encoding::Base64 {
                    v["encoding"] = json!("base64");
                }
                v
            }
            Item::End { offset, process } => {
                json!({ "type": "end", "offset": offset, "process": process })
            }
        }
    }
}

/// The items from `since`: what the ring holds, then (with `follow`) what comes, until the
/// process ends or the client goes away.
fn items(
    state: AppState,
    chat_id: ChatId,
    id: String,
    handle: Option<std::sync::Arc<Handle>>,
    since: u64,
    follow: bool,
) -> impl futures::Stream<Item = Item> {
    let stopped = state.watch.stopped();
    async_stream::stream! {
        let mut offset = since;
        let mut stopped = std::pin::pin!(stopped);
        if let Some(h) = handle {
            let mut progress = h.progress();
            loop {
                // Marked seen before the read, so output that lands after it wakes the wait.
                let ended = progress.borrow_and_update().ended.is_some();
                let read = h.read_from(offset);
                if read.dropped_bytes > 0 {
                    yield Item::Dropped { offset, bytes: read.dropped_bytes };
                }
                for frame in read.frames {
                    yield Item::Output(frame);
                }
                offset = read.next;
                if ended || !follow {
                    break;
                }
                tokio::select! {
                    changed = progress.changed() => if changed.is_err() { break },
                    // sandboxd stops: the stream ends (with where to go on from).
                    _ = &mut stopped => break,
                }
            }
        }
        if let Ok(info) = state.data_plane.process(chat_id, &id).await {
            yield Item::End { offset, process: Box::new(info.into()) };
        }
    }
}

/// A process's output from an offset: NDJSON lines, or SSE with `Accept: text/event-stream`.
#[utoipa::path(get, operation_id = "process_output", path = "/api/v1/sandboxes/{chat_id}/processes/{process_id}/output", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("process_id" = String, Path, format = "uuid"),
        ("since" = Option<u64>, Query, description = "byte offset over stdout and stderr together (default 0; SSE: also `Last-Event-ID`)"),
        ("follow" = Option<bool>, Query, description = "keep the stream open until the process ends (default false: what is there now)")),
    responses(
        (status = 200, description = "items, each `{\"type\": …}`: `output` `{offset, stream, data, encoding?}` (base64 when not UTF-8), \
            `dropped` `{offset, dropped_bytes}` when the ring no longer holds output from `since`, then `end` \
            `{offset, process}`: the offset to go on from, and the process. As SSE the event name is the type and the id the \
            offset after the item, so a reconnecting client goes on from `Last-Event-ID` with no gap and no repeat",
            content((String = "application/x-ndjson"), (String = "text/event-stream"))),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such process", body = ErrorBody),
        (status = 422, description = "invalid `since` or `follow`", body = ValidationErrorBody)))]
pub async fn output(
    State(state): State<AppState>,
    Path((raw_chat, raw_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    let mut p = Problems::default();
    let since = params.int("since", 0, i64::MAX as u64, &mut p);
    let follow = params.flag("follow", &mut p);
    let last_event_id = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        None => None,
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                p.push(
                    "int_parsing",
                    Source::Header,
                    "Last-Event-ID",
                    "Input should be a byte offset".into(),
                    json!(raw),
                );
                None
            }
        },
    };
    p.finish()?;
    let (chat_id, id) = process_path(&raw_chat, &raw_id)?;
    let (_, handle) = state.data_plane.output(chat_id, &id).await?;
    // An `EventSource` reconnects to the same URL: its `Last-Event-ID` is where it got to.
    let since = last_event_id.or(since).unwrap_or(0);
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let items = items(state, chat_id, id, handle, since, follow);
    if sse {
        let events = futures::StreamExt::map(items, |item| {
            Ok::<_, Infallible>(
                Event::default()
                    .event(item.kind())
                    .id(item.next().to_string())
                    .data(item.json().to_string()),
            )
        });
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response());
    }
    let lines = futures::StreamExt::map(items, |item| {
        let mut line = item.json().to_string().into_bytes();
        line.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    let mut response = Response::new(Body::from_stream(lines));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}
