//! Data-plane routes: exec, file write/read and directory listing on a running sandbox. They
//! call [`crate::dataplane`], which finds the container in the store and talks to the engine;
//! the desired-state routes never come here. A sandbox that is not running answers 409 naming
//! its phase; an engine that does not answer, 503.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::ChatPath;
use super::input::{self, Problems, QueryParams, Source};
use super::views::{ErrorBody, ValidationErrorBody};
use super::{ApiError, AppState};
use crate::backend::io::{ExecChunk, EXEC_MARKER_VAR};
use crate::dataplane::exec::{ExecEnd, ExecEvent, ExecRequest};
use crate::dataplane::files::{Listing, Written};
use crate::dataplane::output::{encode, Encoding};
use crate::dataplane::paths::PathError;
use crate::dataplane::{Caller, DataPlaneError};

/// An exec request. `command` is an argv list, or a string run by `sh -c`.
// Documents the input for OpenAPI; `parse_exec` reads it field by field.
#[allow(dead_code)]
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// `["ls", "-l"]` or `"ls -l | wc -l"` (run by `sh -c`).
    #[schema(value_type = Object)]
    command: Value,
    /// Default `data_plane.exec_default_timeout_seconds`; at most
    /// `data_plane.exec_max_timeout_seconds`. At the timeout the command and every process it
    /// started are killed, and `exit_code` is 124.
    timeout_seconds: Option<u64>,
    env: Option<BTreeMap<String, String>>,
    /// Relative to the chat mount, or absolute on one of the sandbox's mounts.
    workdir: Option<String>,
    /// Text written to the command's stdin, then closed.
    stdin: Option<String>,
    /// Binary stdin, base64 (instead of `stdin`).
    stdin_base64: Option<String>,
    /// Stream output as NDJSON lines (also chosen by `Accept: application/x-ndjson`).
    stream: Option<bool>,
}

/// A finished exec. Output that is not UTF-8 is base64, as `*_encoding` says.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResponse {
    exit_code: i64,
    stdout: String,
    stderr: String,
    stdout_encoding: Encoding,
    stderr_encoding: Encoding,
    timed_out: bool,
    /// Output beyond `data_plane.exec_output_limit_bytes` (per stream) was dropped.
    truncated: bool,
    duration_ms: u64,
}

/// The client's address (when the server was started with connect info).
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

impl From<DataPlaneError> for ApiError {
    fn from(e: DataPlaneError) -> Self {
        ApiError::DataPlane(e)
    }
}

/// Who is calling, for the audit log: whether a token came, and from where.
pub(super) fn caller(state: &AppState, headers: &HeaderMap, peer: Option<SocketAddr>) -> Caller {
    let header = state.settings.security.token_header.as_str();
    let who = if state.settings.security.api_token.is_some() && headers.contains_key(header) {
        "token"
    } else {
        "anonymous"
    };
    Caller {
        actor: format!(
            "{who}@{}",
            peer.map_or_else(|| "-".to_string(), |p| p.to_string())
        ),
        request_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

/// A path rule broken by a parameter: 422 naming it, or 403 for a read-only mount.
fn path_problem(source: Source, field: &str, raw: &str, e: PathError) -> ApiError {
    if e.is_invalid_input() {
        input::reject(
            "value_error",
            source,
            field,
            format!("Value error, {e}"),
            json!(raw),
        )
    } else {
        ApiError::DataPlane(DataPlaneError::Path(e))
    }
}

pub(super) fn data_plane_error(
    e: DataPlaneError,
    source: Source,
    field: &str,
    raw: &str,
) -> ApiError {
    match e {
        DataPlaneError::Path(p) => path_problem(source, field, raw, p),
        other => ApiError::DataPlane(other),
    }
}

/// What an exec and a background process share: the command, its environment, working
/// directory and stdin.
pub(super) struct Command {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub stdin: Option<Vec<u8>>,
}

/// The fields of [`Command`] in a body.
pub(super) const COMMAND_FIELDS: &[&str] = &["command", "env", "workdir", "stdin", "stdin_base64"];

/// Reads and checks a command's fields, adding what is wrong to `p`.
pub(super) fn parse_command(
    state: &AppState,
    obj: &serde_json::Map<String, Value>,
    p: &mut Problems,
) -> Command {
    let limits = &state.settings.data_plane;
    let argv: Option<Vec<String>> = match obj.get("command") {
        None => {
            p.push(
                "missing",
                Source::Body,
                "command",
                "Field required".into(),
                Value::Object(obj.clone()),
            );
            None
        }
        Some(Value::String(s)) if !s.trim().is_empty() => {
            Some(vec!["sh".into(), "-c".into(), s.clone()])
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let strings: Option<Vec<String>> = items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect();
            if strings.is_none() {
                p.push(
                    "string_type",
                    Source::Body,
                    "command",
                    "Input should be a list of strings".into(),
                    Value::Array(items.clone()),
                );
            }
            strings
        }
        Some(other) => {
            p.push(
                "value_error",
                Source::Body,
                "command",
                "Value error, a non-empty string or a non-empty list of strings".into(),
                other.clone(),
            );
            None
        }
    };
    if let Some(argv) = &argv {
        let bytes: usize = argv.iter().map(String::len).sum();
        if bytes > limits.exec_max_command_bytes {
            p.push("value_error", Source::Body, "command", format!("Value error, the command is {bytes} bytes, over data_plane.exec_max_command_bytes ({})", limits.exec_max_command_bytes), json!(format!("<{bytes} bytes>")));
        } else if argv.iter().any(|a| a.contains('\0')) {
            p.push(
                "value_error",
                Source::Body,
                "command",
                "Value error, the command contains a NUL byte".into(),
                json!(argv),
            );
        }
    }
    let mut env = Vec::new();
    match obj.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(vars)) => {
            for (k, v) in vars {
                let name_ok =
                    !k.is_empty() && !k.contains('=') && !k.contains('\0') && k != EXEC_MARKER_VAR;
                match v.as_str() {
                    Some(v) if name_ok && !v.contains('\0') => env.push(format!("{k}={v}")),
                    _ => p.push("value_error", Source::Body, "env", format!("Value error, `{k}`: names are non-empty without `=` or NUL (and not {EXEC_MARKER_VAR}); values are strings without NUL"), v.clone()),
                }
            }
        }
        Some(other) => p.push(
            "dict_type",
            Source::Body,
            "env",
            "Input should be a valid dictionary".into(),
            other.clone(),
        ),
    }
    let workdir = match obj.get("workdir") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            p.push(
                "string_type",
                Source::Body,
                "workdir",
                "Input should be a valid string".into(),
                other.clone(),
            );
            None
        }
    };
    let stdin = match (obj.get("stdin"), obj.get("stdin_base64")) {
        (Some(Value::String(s)), None) => Some(s.clone().into_bytes()),
        (None, Some(Value::String(b))) => match base64::engine::general_purpose::STANDARD.decode(b)
        {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                p.push(
                    "value_error",
                    Source::Body,
                    "stdin_base64",
                    format!("Value error, not base64: {e}"),
                    json!(b),
                );
                None
            }
        },
        (None, None) | (Some(Value::Null), None) | (None, Some(Value::Null)) => None,
        (Some(_), Some(_)) => {
            p.push(
                "value_error",
                Source::Body,
                "stdin",
                "Value error, give `stdin` or `stdin_base64`, not both".into(),
                Value::Null,
            );
            None
        }
        (Some(other), _) | (_, Some(other)) => {
            p.push(
                "string_type",
                Source::Body,
                "stdin",
                "Input should be a valid string".into(),
                other.clone(),
            );
            None
        }
    };
    Command {
        argv: argv.unwrap_or_default(),
        env,
        workdir,
        stdin,
    }
}

/// Reads and checks an exec body.
fn parse_exec(
    state: &AppState,
    obj: &serde_json::Map<String, Value>,
) -> Result<(ExecRequest, bool), ApiError> {
    let limits = &state.settings.data_plane;
    let mut p = Problems::default();
    let mut f = input::Fields::new(obj);
    let command = parse_command(state, obj, &mut p);
    let timeout = f
        .optional_int("timeout_seconds", 1, limits.exec_max_timeout_seconds)
        .ok()
        .flatten()
        .unwrap_or(limits.exec_default_timeout_seconds);
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            p.push(
                "bool_type",
                Source::Body,
                "stream",
                "Input should be a valid boolean".into(),
                other.clone(),
            );
            false
        }
    };
    let mut known = COMMAND_FIELDS.to_vec();
    known.extend(["timeout_seconds", "stream"]);
    f.forbid_others(&known);
    let mut all = f.problems;
    all.extend(p);
    all.finish()?;
    Ok((
        ExecRequest {
            argv: command.argv,
            env: command.env,
            workdir: command.workdir,
            stdin: command.stdin,
            timeout: Duration::from_secs(timeout),
        },
        stream,
    ))
}

/// Run a command in the running sandbox.
#[utoipa::path(post, path = "/api/v1/sandboxes/{chat_id}/exec", tag = "data plane",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "the command ended (or was killed at its timeout: exit code 124). \
            With `stream: true` or `Accept: application/x-ndjson`: NDJSON lines \
            `{\"stream\":\"stdout\"|\"stderr\",\"data\":…}` (or `data_base64`), then \
            `{\"exit_code\":…,\"timed_out\":…,\"duration_ms\":…}`",
            content((ExecResponse = "application/json"), (String = "application/x-ndjson"))),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no such sandbox", body = ErrorBody),
        (status = 409, description = "the sandbox is not running (the detail names its phase)", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 429, description = "over `data_plane.max_concurrent(_per_sandbox)`; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer, or a paused or hibernated sandbox could not be resumed for the call", body = ErrorBody)))]
pub async fn exec(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let obj = input::json_object(&headers, &body)?;
    let (req, stream_flag) = parse_exec(&state, &obj)?;
    let workdir = req.workdir.clone().unwrap_or_default();
    let who = caller(&state, &headers, peer);
    let ndjson = stream_flag
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/x-ndjson"));
    let dp = &state.data_plane;
    if ndjson {
        let rx = dp
            .exec_stream(chat_id, req, who)
            .await
            .map_err(|e| data_plane_error(e, Source::Body, "workdir", &workdir))?;
        let events =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
            );
        let lines = events.map(|ev| Ok::<_, std::convert::Infallible>(ndjson_line(ev)));
        let mut response = Response::new(Body::from_stream(lines));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        return Ok(response);
    }
    let out = dp
        .exec(chat_id, req, &who)
        .await
        .map_err(|e| data_plane_error(e, Source::Body, "workdir", &workdir))?;
    let truncated = out.stdout.truncated() || out.stderr.truncated();
    let (stdout, stdout_encoding) = out.stdout.finish();
    let (stderr, stderr_encoding) = out.stderr.finish();
    Ok(Json(ExecResponse {
        exit_code: out.end.exit_code,
        stdout,
        stderr,
        stdout_encoding,
        stderr_encoding,
        timed_out: out.end.timed_out,
        truncated,
        duration_ms: out.end.duration.as_millis() as u64,
    })
    .into_response())
}

/// One NDJSON line of a streamed exec.
fn ndjson_line(ev: ExecEvent) -> Bytes {
    let value = match ev {
        ExecEvent::Chunk(chunk) => {
            let (stream, bytes) = match &chunk {
                ExecChunk::Stdout(b) => ("stdout", b),
                ExecChunk::Stderr(b) => ("stderr", b),
            };
            match encode(bytes) {
                (text, Encoding::Utf8) => json!({ "stream": stream, "data": text }),
                (b64, Encoding::Base64) => json!({ "stream": stream, "data_base64": b64 }),
            }
        }
        ExecEvent::End(ExecEnd {
            exit_code,
            timed_out,
            duration,
            stdout_bytes,
            stderr_bytes,
            ..
        }) => json!({
            "exit_code": exit_code,
            "timed_out": timed_out,
            "duration_ms": duration.as_millis() as u64,
            "stdout_bytes": stdout_bytes,
            "stderr_bytes": stderr_bytes,
        }),
        ExecEvent::Failed(e) => json!({ "error": e.to_string() }),
    };
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// `?path=` (required) and `?mode=` (octal, writes only).
fn path_param(params: &QueryParams, required: bool) -> Result<Option<String>, ApiError> {
    match params.get("path") {
        Some(p) => Ok(Some(p.to_string())),
        None if required => Err(input::reject(
            "missing",
            Source::Query,
            "path",
            "Field required".into(),
            Value::Null,
        )),
        None => Ok(None),
    }
}

/// Write a file (the raw request body) into the running sandbox.
#[utoipa::path(put, path = "/api/v1/sandboxes/{chat_id}/files", tag = "data plane",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("path" = String, Query, description = "relative to the chat mount, or absolute on a writable mount"),
        ("mode" = Option<String>, Query, description = "octal permission bits `000`-`777`, default `0644`")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "the file's bytes, at most `data_plane.file_write_limit_bytes`"),
    responses(
        (status = 200, description = "written; missing parent directories were created", body = Written),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 403, description = "the path is on a read-only mount", body = ErrorBody),
        (status = 404, description = "no such sandbox", body = ErrorBody),
        (status = 409, description = "the sandbox is not running", body = ErrorBody),
        (status = 413, description = "over `data_plane.file_write_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid path or mode (`..`, NUL, too long, not on a mount)", body = ValidationErrorBody),
        (status = 429, description = "too many data-plane calls; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer, or a paused or hibernated sandbox could not be resumed for the call", body = ErrorBody)))]
pub async fn write_file(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    Peer(peer): Peer,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Written>, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    let path = path_param(&params, true)?.unwrap_or_default();
    let mode = match params.get("mode") {
        None => 0o644,
        Some(raw) => u32::from_str_radix(raw.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                input::reject(
                    "value_error",
                    Source::Query,
                    "mode",
                    "Value error, octal permission bits 000-777, e.g. 0644 (no setuid, setgid or sticky bits: the file lands on a host directory)".into(),
                    json!(raw),
                )
            })?,
    };
    let who = caller(&state, &headers, peer);
    state
        .data_plane
        .write_file(chat_id, &path, mode, body, &who)
        .await
        .map(Json)
        .map_err(|e| data_plane_error(e, Source::Query, "path", &path))
}

/// Read a file from the running sandbox, streamed.
#[utoipa::path(get, path = "/api/v1/sandboxes/{chat_id}/files", tag = "data plane",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("path" = String, Query, description = "relative to the chat mount, or absolute on a mount")),
    responses(
        (status = 200, description = "the file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "the path is a directory", body = ErrorBody),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 403, description = "a symlink leads off the sandbox's mounts", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such file", body = ErrorBody),
        (status = 409, description = "the sandbox is not running", body = ErrorBody),
        (status = 413, description = "over `data_plane.file_read_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid path", body = ValidationErrorBody),
        (status = 429, description = "too many data-plane calls; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer, or a paused or hibernated sandbox could not be resumed for the call", body = ErrorBody)))]
pub async fn read_file(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    let path = path_param(&params, true)?.unwrap_or_default();
    let file = state
        .data_plane
        .read_file(chat_id, &path)
        .await
        .map_err(|e| data_plane_error(e, Source::Query, "path", &path))?;
    let mut response = Response::new(Body::from_stream(file.body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(file.size));
    Ok(response)
}

/// List a directory of the running sandbox.
#[utoipa::path(get, path = "/api/v1/sandboxes/{chat_id}/dir", tag = "data plane",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"),
        ("path" = Option<String>, Query, description = "default: the chat mount")),
    responses(
        (status = 200, description = "the entries, by name", body = Listing),
        (status = 400, description = "the path is not a directory", body = ErrorBody),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 403, description = "a symlink leads off the sandbox's mounts", body = ErrorBody),
        (status = 404, description = "no such sandbox, or no such directory", body = ErrorBody),
        (status = 409, description = "the sandbox is not running", body = ErrorBody),
        (status = 422, description = "invalid path", body = ValidationErrorBody),
        (status = 429, description = "too many data-plane calls; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "the engine does not answer, or a paused or hibernated sandbox could not be resumed for the call", body = ErrorBody)))]
pub async fn list_dir(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    RawQuery(query): RawQuery,
) -> Result<Json<Listing>, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    let path = path_param(&params, false)?;
    state
        .data_plane
        .list_dir(chat_id, path.as_deref())
        .await
        .map(Json)
        .map_err(|e| data_plane_error(e, Source::Query, "path", path.as_deref().unwrap_or(".")))
}

/// The status and detail of a data-plane failure.
pub fn respond(e: &DataPlaneError) -> Response {
    let status = match e {
        DataPlaneError::NotFound
        | DataPlaneError::ProcessNotFound
        | DataPlaneError::TerminalNotFound
        | DataPlaneError::NoSuchPath(_) => StatusCode::NOT_FOUND,
        DataPlaneError::NotRunning(_) | DataPlaneError::ProcessConflict(_) => StatusCode::CONFLICT,
        DataPlaneError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
        DataPlaneError::Path(p) if p.is_invalid_input() => StatusCode::UNPROCESSABLE_ENTITY,
        DataPlaneError::Path(_) | DataPlaneError::Forbidden(_) => StatusCode::FORBIDDEN,
        DataPlaneError::IsDirectory { .. }
        | DataPlaneError::NotDirectory { .. }
        | DataPlaneError::Refused(_) => StatusCode::BAD_REQUEST,
        DataPlaneError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        DataPlaneError::EngineDown(_) | DataPlaneError::Resume(_) | DataPlaneError::Host(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        DataPlaneError::NodeNotConfigured(_) => StatusCode::NOT_IMPLEMENTED,
        DataPlaneError::Engine(_) => StatusCode::BAD_GATEWAY,
        DataPlaneError::Store(_) | DataPlaneError::Spec(_) => {
            tracing::error!(error = %e, "data plane: internal error");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let detail = match status {
        StatusCode::INTERNAL_SERVER_ERROR => "internal error".to_string(),
        _ => e.to_string(),
    };
    let mut response = (status, Json(json!({ "detail": detail }))).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
