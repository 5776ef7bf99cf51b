//! `GET /api/v1/sandboxes/{chat_id}/pty`: a terminal over a WebSocket
//! ([`crate::dataplane::terminals`]).
//!
//! Frames. Server to client: binary frames are the terminal's output; text frames are JSON
//! control messages: `ready` `{terminal_id, pid, cols, rows}` first, `dropped` `{bytes}` when
//! the reader fell behind, `error` `{detail}`, `taken_over` (another socket attached), and
//! `exit` `{reason, exit_code}` last. Client to server: binary frames are keystrokes; text
//! frames are `{"type":"resize","cols","rows"}`, `{"type":"input","data"}`,
//! `{"type":"close"}` (kills the terminal's process tree), and, first and only when the
//! token did not come in the header (browsers cannot set one), `{"type":"auth","token"}`.
//! A socket that drops without `close` leaves the terminal open for
//! `data_plane.terminal_grace_seconds`; `?terminal_id=` re-attaches and replays the last
//! output.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::auth::TokenPending;
use super::dataplane::{caller, Peer};
use super::input::{self, Problems, QueryParams, Source};
use super::views::{ErrorBody, ValidationErrorBody};
use super::{ApiError, AppState};
use crate::dataplane::terminals::{Attached, Size, MAX_COLS, MAX_ROWS};
use crate::dataplane::{Caller, DataPlaneError};
use crate::domain::ChatId;

/// How long a socket that owes its token has to send it.
const AUTH_WITHIN: Duration = Duration::from_secs(10);
/// Policy violation (RFC 6455): a missing or wrong token.
const CLOSE_POLICY: u16 = 1008;
/// Going away: the terminal ended.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_ERROR: u16 = 1011;
/// Keystroke frames waiting for the terminal to read them; more are dropped (and said so).
const KEY_QUEUE: usize = 256;

/// What the socket is for: a new terminal or a re-attach.
enum Open {
    New { argv: Vec<String>, size: Size },
    Reattach(String),
}

/// Open (or re-attach to) a terminal over a WebSocket.
#[utoipa::path(get, operation_id = "open_terminal", path = "/api/v1/sandboxes/{chat_id}/pty", tag = "processes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("cols" = Option<u16>, Query, description = "columns, 1-1000 (default 80)"),
        ("rows" = Option<u16>, Query, description = "rows, 1-500 (default 24)"),
        ("command" = Option<String>, Query, description = "run by `sh -c` instead of `sh`"),
        ("terminal_id" = Option<String>, Query, format = "uuid", description = "re-attach to this open terminal (its last output is replayed)")),
    responses(
        (status = 101, description = "a WebSocket carrying the terminal: binary frames are its bytes both ways; text frames are JSON control \
            messages (server: `ready`, `dropped`, `error`, `taken_over`, `exit`; client: `resize` `{cols, rows}`, `input` `{data}`, \
            `close`, and `auth` `{token}` first when the token is not in the header). See docs/data-plane.md"),
        (status = 400, description = "not a WebSocket upgrade", body = ErrorBody),
        (status = 401, description = "token wrong (or missing, and the request is not an upgrade)", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no open terminal with that id", body = ErrorBody),
        (status = 409, description = "the sandbox is not running", body = ErrorBody),
        (status = 422, description = "invalid size or command", body = ValidationErrorBody),
        (status = 429, description = "over `data_plane.max_terminals(_per_sandbox)`; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer", body = ErrorBody)))]
#[allow(clippy::too_many_arguments)]
pub async fn pty(
    State(state): State<AppState>,
    Path(raw_chat): Path<String>,
    RawQuery(query): RawQuery,
    Peer(peer): Peer,
    headers: HeaderMap,
    pending: Option<axum::Extension<TokenPending>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let params = QueryParams::parse(query.as_deref())?;
    let mut p = Problems::default();
    let cols = params
        .int("cols", 1, u64::from(MAX_COLS), &mut p)
        .unwrap_or(80);
    let rows = params
        .int("rows", 1, u64::from(MAX_ROWS), &mut p)
        .unwrap_or(24);
    let argv = match params.get("command") {
        None => vec!["sh".to_string()],
        Some(c) if c.trim().is_empty() || c.contains('\0') => {
            p.push(
                "value_error",
                Source::Query,
                "command",
                "Value error, a non-empty command without NUL".into(),
                json!(c),
            );
            Vec::new()
        }
        Some(c) => vec!["sh".into(), "-c".into(), c.to_string()],
    };
    let open = match params.get("terminal_id") {
        Some(raw) => match uuid::Uuid::parse_str(raw) {
            Ok(id) => Open::Reattach(id.to_string()),
            Err(_) => {
                p.push(
                    "uuid_parsing",
                    Source::Query,
                    "terminal_id",
                    "Input should be a valid UUID".into(),
                    json!(raw),
                );
                Open::Reattach(String::new())
            }
        },
        None => Open::New {
            argv,
            size: Size::new(cols, rows).unwrap_or(Size { cols: 80, rows: 24 }),
        },
    };
    p.finish()?;
    let upgrade = upgrade.map_err(|e| ApiError::BadRequest {
        status: axum::http::StatusCode::BAD_REQUEST,
        detail: format!("websocket_upgrade_required: {}", e.body_text()),
    })?;
    let who = caller(&state, &headers, peer);
    match pending {
        // The token comes in the first message: nothing is opened before it.
        Some(axum::Extension(token)) => Ok(upgrade.on_upgrade(move |mut socket| async move {
            if !authenticated(&mut socket, &token).await {
                let _ = send_json(
                    &mut socket,
                    json!({"type": "error", "detail": "unauthorized"}),
                )
                .await;
                close(socket, CLOSE_POLICY, "unauthorized").await;
                return;
            }
            match attach(&state, chat_id, open, &who).await {
                Ok(attached) => serve(state, socket, attached).await,
                Err(e) => {
                    let detail = e.to_string();
                    let _ =
                        send_json(&mut socket, json!({"type": "error", "detail": detail})).await;
                    close(socket, CLOSE_ERROR, "cannot open the terminal").await;
                }
            }
        })),
        // Opened before the upgrade, so a failure is a plain HTTP answer.
        None => {
            let attached = attach(&state, chat_id, open, &who).await?;
            let mut pending = Pending {
                dp: state.data_plane.clone(),
                attached: Some(attached),
            };
            Ok(upgrade.on_upgrade(move |socket| async move {
                if let Some(attached) = pending.attached.take() {
                    serve(state, socket, attached).await;
                }
            }))
        }
    }
}

/// An attachment made before the upgrade; detached when dropped unless the socket took it
/// (an upgrade that never completes must not leave the terminal attached for good).
struct Pending {
    dp: crate::dataplane::DataPlane,
    attached: Option<Attached>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(a) = self.attached.take() {
            self.dp.detach_terminal(&a);
        }
    }
}

async fn attach(
    state: &AppState,
    chat_id: ChatId,
    open: Open,
    who: &Caller,
) -> Result<Attached, DataPlaneError> {
    match open {
        Open::New { argv, size } => {
            state
                .data_plane
                .open_terminal(chat_id, argv, size, who)
                .await
        }
        Open::Reattach(id) => state.data_plane.attach_terminal(chat_id, &id).await,
    }
}

/// Reads the first message: it must be `{"type":"auth","token":…}` with the token.
async fn authenticated(socket: &mut WebSocket, token: &TokenPending) -> bool {
    let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(AUTH_WITHIN, socket.recv()).await
    else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
        return false;
    };
    v["type"] == "auth"
        && v["token"]
            .as_str()
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(token.0.as_slice())))
}

async fn send_json(socket: &mut WebSocket, v: Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(v.to_string().into())).await
}

async fn close(mut socket: WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Carries one attachment until the terminal ends, another socket takes it over, or this
/// socket goes away (the terminal then waits for a re-attach).
async fn serve(state: AppState, socket: WebSocket, attached: Attached) {
    let t = attached.terminal.clone();
    let dp = &state.data_plane;
    let (mut tx, mut rx) = socket.split();
    let size = t.size();
    let ready = json!({
        "type": "ready",
        "terminal_id": t.id,
        "pid": t.pid(),
        "cols": size.cols,
        "rows": size.rows,
    });
    if tx
        .send(Message::Text(ready.to_string().into()))
        .await
        .is_err()
    {
        dp.detach_terminal(&attached);
        return;
    }
    // Keystrokes go through a queue to a writer of their own: a program that does not read
    // its input must not stop the output or hide a disconnect.
    let (keys, mut queued) = tokio::sync::mpsc::channel::<Vec<u8>>(KEY_QUEUE);
    let writer = t.clone();
    tokio::spawn(async move {
        while let Some(k) = queued.recv().await {
            if writer.write(&k).await.is_err() {
                break;
            }
        }
    });
    let mut progress = t.progress();
    let mut offset = attached.from;
    loop {
        let now = *progress.borrow_and_update();
        if now.attach != attached.number {
            let _ = tx
                .send(Message::Text(
                    json!({"type": "taken_over"}).to_string().into(),
                ))
                .await;
            let _ = tx.send(Message::Close(None)).await;
            return;
        }
        let read = t.read_from(offset);
        let mut gone = false;
        if read.dropped_bytes > 0 {
            let msg = json!({"type": "dropped", "bytes": read.dropped_bytes});
            gone |= tx
                .send(Message::Text(msg.to_string().into()))
                .await
                .is_err();
        }
        for frame in read.frames {
            gone |= tx.send(Message::Binary(frame.data)).await.is_err();
        }
        offset = read.next;
        if gone {
            dp.detach_terminal(&attached);
            return;
        }
        if let Some(closed) = now.closed {
            let msg =
                json!({"type": "exit", "reason": closed.as_str(), "exit_code": closed.exit_code()});
            let _ = tx.send(Message::Text(msg.to_string().into())).await;
            let _ = tx
                .send(Message::Close(Some(CloseFrame {
                    code: CLOSE_NORMAL,
                    reason: "terminal ended".into(),
                })))
                .await;
            return;
        }
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { return },
            msg = rx.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                    dp.detach_terminal(&attached);
                    return;
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if let Some(reply) = queue_keys(&keys, bytes.to_vec()) {
                        if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                            dp.detach_terminal(&attached);
                            return;
                        }
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = control(&state, &t, &keys, text.as_str()).await {
                        if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                            dp.detach_terminal(&attached);
                            return;
                        }
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            },
        }
    }
}

/// Queues keystrokes; an error to send back when they cannot be.
fn queue_keys(keys: &tokio::sync::mpsc::Sender<Vec<u8>>, bytes: Vec<u8>) -> Option<Value> {
    use tokio::sync::mpsc::error::TrySendError;
    match keys.try_send(bytes) {
        Ok(()) => None,
        Err(TrySendError::Full(_)) => Some(json!({"type": "error",
            "detail": "input dropped: the terminal is not reading its input"})),
        Err(TrySendError::Closed(_)) => Some(json!({"type": "error",
            "detail": "input dropped: the terminal's input is closed"})),
    }
}

/// Handles a control message; an error to send back, if any.
async fn control(
    state: &AppState,
    t: &crate::dataplane::terminals::Terminal,
    keys: &tokio::sync::mpsc::Sender<Vec<u8>>,
    text: &str,
) -> Option<Value> {
    let error = |detail: String| Some(json!({"type": "error", "detail": detail}));
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return error("a control message is a JSON object with a `type`".into());
    };
    match v["type"].as_str() {
        Some("resize") => {
            let size = match (v["cols"].as_u64(), v["rows"].as_u64()) {
                (Some(c), Some(r)) => Size::new(c, r),
                _ => None,
            };
            match size {
                Some(size) => t
                    .resize(size)
                    .await
                    .err()
                    .and_then(|e| error(e.to_string())),
                None => error(format!(
                    "resize needs cols 1-{MAX_COLS} and rows 1-{MAX_ROWS}"
                )),
            }
        }
        Some("input") => match v["data"].as_str() {
            Some(data) => queue_keys(keys, data.as_bytes().to_vec()),
            None => error("input needs `data` (a string; send bytes as a binary frame)".into()),
        },
        Some("close") => {
            state.data_plane.close_terminal(t).await;
            None
        }
        Some("auth") => None, // already authorised (by the header)
        _ => error("unknown control message; expected resize, input or close".into()),
    }
}
