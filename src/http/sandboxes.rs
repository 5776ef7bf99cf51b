//! The declarative API: apply, read, list, renew. Returns at once; `?wait=SECONDS` blocks
//! (bounded by `controller.max_wait_seconds`) until the sandbox settles.

use std::time::Duration;

use axum::extract::{rejection::JsonRejection, Path, Query, State};
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::compat::new_session;
use utoipa::{IntoParams, ToSchema};

use super::views::{ErrorBody, SandboxView};
use super::{wait, ApiError, AppState};
use crate::domain::request::{parse_chat_id, validate_ttl};
use crate::domain::{ChatId, Phase};
use crate::store::{ApplyOutcome, ListFilter, StoredEvent};

/// Longest TTL a client may ask for (30 days).
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Debug, Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Seconds to wait for the sandbox to settle (0 = answer at once).
    #[serde(default)]
    wait: u64,
}

impl WaitQuery {
    fn duration(&self, state: &AppState) -> Option<Duration> {
        (self.wait > 0)
            .then(|| Duration::from_secs(self.wait.min(state.settings.controller.max_wait_seconds)))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    agent_id: String,
    volume_host_path: String,
    /// TTL of a new session (1 s to 30 days); default `sandbox.ttl_seconds`.
    ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApplyResponse {
    /// `created`, `replaced` or `unchanged`.
    #[schema(value_type = String)]
    outcome: &'static str,
    sandbox: SandboxView,
}

async fn view_after_wait(
    state: &AppState,
    chat_id: ChatId,
    q: &WaitQuery,
) -> Result<SandboxView, ApiError> {
    let row = match q.duration(state) {
        Some(d) => wait::for_settled(&state.store, chat_id, d).await?,
        None => state.store.get(chat_id).await?,
    };
    row.as_ref()
        .map(SandboxView::from)
        .ok_or(ApiError::NotFound)
}

/// Declare the sandbox of a chat; a changed spec replaces the session.
#[utoipa::path(put, path = "/api/v1/sandboxes/{chat_id}", tag = "sandboxes",
    params(("chat_id" = String, Path, description = "chat UUID, any spelling"), WaitQuery),
    request_body = ApplyRequest,
    responses(
        (status = 200, description = "written; with `wait`, settled or timed out", body = ApplyResponse),
        (status = 422, description = "invalid input", body = ErrorBody)))]
pub async fn apply(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<ApplyRequest>, JsonRejection>,
) -> Result<Json<ApplyResponse>, ApiError> {
    let chat_id = parse_chat_id(&raw)?;
    let Query(q) = query?;
    let Json(req) = body?;
    let ttl = match req.ttl_seconds {
        Some(t) => validate_ttl(t, MAX_TTL_SECONDS)?,
        None => state.settings.sandbox.ttl_seconds,
    };
    let new = new_session(&state, chat_id, &req.agent_id, &req.volume_host_path, ttl)?;
    let (outcome, row) = match state.store.apply(&new, Utc::now()).await? {
        ApplyOutcome::Created(r) => ("created", r),
        ApplyOutcome::Replaced(r) => ("replaced", r),
        ApplyOutcome::Unchanged(r) => ("unchanged", r),
    };
    if outcome != "unchanged" {
        state.wake.notify_one();
    }
    let sandbox = match q.duration(&state) {
        Some(d) => {
            match wait::for_start(&state.store, chat_id, row.session_id, row.attempts, d).await? {
                wait::StartOutcome::Running(r) | wait::StartOutcome::Failed(r) => {
                    SandboxView::from(&r)
                }
                wait::StartOutcome::Timeout(Some(r)) => SandboxView::from(&r),
                wait::StartOutcome::Timeout(None) | wait::StartOutcome::Gone(_) => {
                    view_after_wait(&state, chat_id, &WaitQuery::default()).await?
                }
            }
        }
        None => SandboxView::from(&row),
    };
    Ok(Json(ApplyResponse { outcome, sandbox }))
}

/// Desired spec and observed status of one chat.
#[utoipa::path(get, path = "/api/v1/sandboxes/{chat_id}", tag = "sandboxes",
    params(("chat_id" = String, Path, description = "chat UUID, any spelling"), WaitQuery),
    responses(
        (status = 200, body = SandboxView),
        (status = 404, description = "`sandbox_not_found`", body = ErrorBody),
        (status = 422, description = "not a UUID", body = ErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SandboxView>, ApiError> {
    let chat_id = parse_chat_id(&raw)?;
    let Query(q) = query?;
    view_after_wait(&state, chat_id, &q).await.map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this phase.
    phase: Option<String>,
    /// Only this agent.
    agent_id: Option<String>,
    /// Opaque cursor from the previous page's `next_cursor`.
    cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListResponse {
    items: Vec<SandboxView>,
    next_cursor: Option<String>,
}

/// Sandboxes ordered by chat id, filtered and paginated.
#[utoipa::path(get, path = "/api/v1/sandboxes", tag = "sandboxes", params(ListQuery),
    responses(
        (status = 200, body = ListResponse),
        (status = 422, description = "invalid filter or cursor", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(q) = query?;
    let phase = q
        .phase
        .as_deref()
        .map(str::parse::<Phase>)
        .transpose()
        .map_err(|e| ApiError::Invalid(format!("invalid phase: {e}")))?;
    let after = q
        .cursor
        .as_deref()
        .map(parse_chat_id)
        .transpose()
        .map_err(|_| ApiError::Invalid("invalid cursor".into()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Invalid("invalid limit: must be 1..=1000".into()));
    }
    let rows = state
        .store
        .list(&ListFilter {
            phase,
            agent_id: q.agent_id,
            after,
            limit,
        })
        .await?;
    let next_cursor = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| r.chat_id.to_string()))
        .flatten();
    Ok(Json(ListResponse {
        items: rows.iter().map(SandboxView::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// New TTL from now (1 s to 30 days); default `sandbox.ttl_seconds`.
    ttl_seconds: Option<u64>,
}

/// Extend the TTL of a live session; the container stays.
#[utoipa::path(post, path = "/api/v1/sandboxes/{chat_id}/renew", tag = "sandboxes",
    params(("chat_id" = String, Path, description = "chat UUID, any spelling")),
    request_body(content = Option<RenewRequest>, description = "optional"),
    responses(
        (status = 200, body = SandboxView),
        (status = 404, description = "no live session", body = ErrorBody),
        (status = 422, description = "invalid input", body = ErrorBody)))]
pub async fn renew(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let chat_id = parse_chat_id(&raw)?;
    // The body is optional: empty means "the configured TTL".
    let req: RenewRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RenewRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Invalid(format!("invalid request body: {e}")))?
    };
    let ttl = match req.ttl_seconds {
        Some(t) => validate_ttl(t, MAX_TTL_SECONDS)?,
        None => state.settings.sandbox.ttl_seconds,
    };
    let ttl = chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX / 1000));
    let row = state
        .store
        .renew(chat_id, ttl, Utc::now())
        .await?
        .ok_or(ApiError::NotFound)?;
    state.wake.notify_one();
    Ok(Json(SandboxView::from(&row)))
}

/// The chat's last 100 events, newest first.
#[utoipa::path(get, path = "/api/v1/sandboxes/{chat_id}/events", tag = "sandboxes",
    params(("chat_id" = String, Path, description = "chat UUID, any spelling")),
    responses(
        (status = 200, body = Vec<StoredEvent>),
        (status = 422, description = "not a UUID", body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Vec<StoredEvent>>, ApiError> {
    let chat_id = parse_chat_id(&raw)?;
    Ok(Json(state.store.events(Some(chat_id), 100).await?))
}
