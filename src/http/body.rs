//! Request bodies are read whole, up to `http.body_limit_bytes`, before routing. A larger body
//! is answered 413 only after the rest of it was read and dropped (up to a bound): blocking
//! clients (Python `requests`, `urllib`) write the whole body before they read the reply, and
//! would see `Broken pipe` instead of the 413 if the server closed on them mid-upload.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

use super::ApiError;

/// Most bytes read and dropped after the limit before giving up and closing.
pub const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Longest time spent draining one oversized body.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(15);
/// Longest time a client may take to send a body within the limit (a slow client cannot
/// hold a connection and its buffer for ever).
const READ_MAX_TIME: Duration = Duration::from_secs(30);
/// Buffer reserved up front, whatever `Content-Length` claims.
const PREALLOCATE_MAX: usize = 64 * 1024;

/// Body limits: `http.body_limit_bytes` for every route but a file write, which has
/// `data_plane.file_write_limit_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub default: usize,
    pub file_write: usize,
}

/// `PUT /api/v1/chats/{chat_id}/files/{name}`: a chat storage attachment.
fn is_attachment_write(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::PUT
        && path.starts_with("/api/v1/chats/")
        && path.contains("/files/")
}

impl Limits {
    fn of(&self, method: &axum::http::Method, path: &str) -> (usize, &'static str) {
        if method == axum::http::Method::PUT && path.ends_with("/files")
            || is_attachment_write(method, path)
        {
            (self.file_write, "data_plane.file_write_limit_bytes")
        } else {
            (self.default, "http.body_limit_bytes")
        }
    }
}

pub async fn read_whole(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let (limit, key) = limits.of(&parts.method, parts.uri.path());
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = || {
        ApiError::BadRequest {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            detail: format!("request body over {key} ({limit} bytes)"),
        }
        .into_response()
    };
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > limit as u64) {
        // A client waiting for `100 Continue` has sent nothing yet: answer at once.
        let expects_continue = parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // Waiting for `100 Continue`, the client has sent nothing yet; a body too large to
        // drain would be read in vain: answer at once and close.
        if expects_continue || declared.is_some_and(|n| n > DRAIN_MAX_BYTES) {
            return close(too_large());
        }
        return drained_answer(stream, too_large()).await;
    }
    if is_attachment_write(&parts.method, parts.uri.path()) {
        // Streamed to its file by the handler, which holds the limit (and the quota) itself:
        // a 100 MiB attachment is never held in memory.
        return next
            .run(Request::from_parts(parts, Body::from_stream(stream)))
            .await;
    }
    let read = async {
        let capacity = declared.map_or(0, |n| (n as usize).min(PREALLOCATE_MAX));
        let mut buf = Vec::with_capacity(capacity);
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) if buf.len() + c.len() > limit => return Err(true),
                Ok(c) => buf.extend_from_slice(&c),
                Err(_) => return Err(false),
            }
        }
        Ok(buf)
    };
    let buf = match tokio::time::timeout(READ_MAX_TIME, read).await {
        Ok(Ok(buf)) => buf,
        Ok(Err(true)) => return drained_answer(stream, too_large()).await,
        Ok(Err(false)) => {
            let e = ApiError::BadRequest {
                status: StatusCode::BAD_REQUEST,
                detail: "the request body could not be read to its end".into(),
            };
            return close(e.into_response());
        }
        Err(_) => {
            let e = ApiError::BadRequest {
                status: StatusCode::REQUEST_TIMEOUT,
                detail: format!(
                    "request body not received within {}s",
                    READ_MAX_TIME.as_secs()
                ),
            };
            return close(e.into_response());
        }
    };
    next.run(Request::from_parts(parts, Body::from(Bytes::from(buf))))
        .await
}

/// Reads and drops the rest of the body (bounded), then gives `answer`; closes the
/// connection if the body could not be drained.
pub(super) async fn drained_answer<E>(
    mut rest: impl Stream<Item = Result<Bytes, E>> + Unpin,
    answer: Response,
) -> Response {
    let drain = async {
        let mut seen = 0u64;
        while let Some(chunk) = rest.next().await {
            match chunk {
                Ok(c) => seen += c.len() as u64,
                Err(_) => return false,
            }
            if seen > DRAIN_MAX_BYTES {
                return false;
            }
        }
        true
    };
    match tokio::time::timeout(DRAIN_MAX_TIME, drain).await {
        Ok(true) => answer,
        _ => close(answer),
    }
}

pub(super) fn close(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// 405 answers carry the old server's body, `{"detail": "Method Not Allowed"}`, and keep
/// axum's `Allow` header.
pub async fn method_not_allowed_body(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut out = (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(serde_json::json!({ "detail": "Method Not Allowed" })),
    )
        .into_response();
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}
