//! The old service's contract: `POST /api/v1/create`, `DELETE /api/v1/sandboxes/{chat_id}`,
//! `GET /api/v1/health`, answered in one call by waiting (bounded) for the controller.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{rejection::JsonRejection, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use utoipa::ToSchema;

use super::views::{DeleteResponse, ErrorBody, SessionResponse};
use super::wait::{self, Gone, StartOutcome};
use super::{ApiError, AppState};
use crate::domain::request::{parse_chat_id, validate_agent_id};
use crate::domain::{spec, ChatId, Phase};
use crate::store::{CreateOutcome, NewSession, SandboxRow};

/// Liveness: the process answers. Never needs a token.
#[utoipa::path(get, path = "/api/v1/health", tag = "compat",
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = serde_json::Value)))]
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 only when the database answers, the engine is connected and a pass completed recently.
#[utoipa::path(get, path = "/api/v1/ready", tag = "operations",
    responses(
        (status = 200, description = "database, engine and controller loop are fine", body = serde_json::Value),
        (status = 503, description = "names each failed check", body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let db = state.store.ping().await.map_err(|e| e.to_string());
    let docker = state.controller.docker_connected.load(Ordering::Relaxed);
    let last = state.controller.last_pass_ms.load(Ordering::Relaxed);
    let max_age_ms = i64::try_from(state.settings.sandbox.cleanup_interval_seconds)
        .unwrap_or(i64::MAX / 4000)
        .saturating_mul(2000)
        .saturating_add(5000);
    let fresh = last > 0 && Utc::now().timestamp_millis() - last <= max_age_ms;
    let mut failed = Vec::new();
    if let Err(e) = &db {
        failed.push(format!("database: {e}"));
    }
    if !docker {
        let why = state
            .controller
            .error()
            .unwrap_or_else(|| "not connected".into());
        failed.push(format!("docker: {why}"));
    }
    if !fresh {
        failed.push("controller: no reconcile pass completed recently".into());
    }
    if failed.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "detail": format!("not_ready: {}", failed.join("; ")) })),
        )
            .into_response()
    }
}

/// Prometheus text format; 404 when `metrics.enabled` is false.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    if !state.settings.metrics.enabled {
        return ApiError::BadRequest {
            status: StatusCode::NOT_FOUND,
            detail: "metrics are disabled (metrics.enabled)".into(),
        }
        .into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// A UUID in any spelling; answered canonical.
    chat_id: String,
    agent_id: String,
    volume_host_path: String,
}

/// Validates a request into the session it asks for. Nothing is written here.
pub(super) fn new_session(
    state: &AppState,
    chat_id: ChatId,
    agent_id: &str,
    volume_host_path: &str,
    ttl_seconds: u64,
) -> Result<NewSession, ApiError> {
    let agent_id = validate_agent_id(agent_id)?;
    let volume = state.volumes.check(volume_host_path)?;
    let spec = spec::resolve(&state.settings.sandbox, chat_id, agent_id, &volume);
    Ok(NewSession {
        chat_id,
        agent_id: agent_id.to_string(),
        volume_host_path: volume.display().to_string(),
        spec_json: spec.to_json(),
        spec_hash: spec.hash(),
        ttl: chrono::Duration::seconds(i64::try_from(ttl_seconds).unwrap_or(i64::MAX / 1000)),
    })
}

/// The old contract: reuse the live session when agent and volume match, else start one.
#[utoipa::path(post, path = "/api/v1/create", tag = "compat", request_body = CreateRequest,
    responses(
        (status = 200, description = "running", body = SessionResponse),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 409, description = "`sandbox_conflict`: a live session has another agent or volume; or a concurrent delete/replace won", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input, named in `detail`", body = ErrorBody),
        (status = 503, description = "`sandbox_start_failed: <reason>`; retries continue in the background", body = ErrorBody),
        (status = 504, description = "not running within `controller.create_wait_seconds`", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Json<SessionResponse>, ApiError> {
    let result = create_inner(&state, body).await;
    state.metrics.create(match &result {
        Ok(_) => "ok",
        Err(ApiError::Conflict) => "conflict",
        Err(ApiError::StartFailed(_)) => "start_failed",
        Err(ApiError::Timeout(_)) => "timeout",
        Err(ApiError::Superseded(_)) => "superseded",
        Err(ApiError::Internal(_)) => "error",
        Err(_) => "invalid",
    });
    result
}

async fn create_inner(
    state: &AppState,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Json<SessionResponse>, ApiError> {
    let Json(req) = body?;
    let chat_id = parse_chat_id(&req.chat_id)?;
    let new = new_session(
        state,
        chat_id,
        &req.agent_id,
        &req.volume_host_path,
        state.settings.sandbox.ttl_seconds,
    )?;
    let row = match state.store.create_or_reuse(&new, Utc::now()).await? {
        CreateOutcome::Conflict(_) => return Err(ApiError::Conflict),
        CreateOutcome::Reused(row) if row.phase == Phase::Running => {
            return respond_running(&row);
        }
        CreateOutcome::Reused(row) if row.phase == Phase::Failed => {
            state
                .store
                .retry_now(chat_id, row.session_id, Utc::now())
                .await?;
            row
        }
        CreateOutcome::Reused(row) | CreateOutcome::Created(row) => row,
    };
    state.wake.notify_one();
    let wait_for = Duration::from_secs(state.settings.controller.create_wait_seconds);
    match wait::for_start(
        &state.store,
        chat_id,
        row.session_id,
        row.attempts,
        wait_for,
    )
    .await?
    {
        StartOutcome::Running(row) => respond_running(&row),
        StartOutcome::Failed(row) => Err(ApiError::StartFailed(
            row.last_error.unwrap_or_else(|| "unknown error".into()),
        )),
        // Another request changed the desired state first: a conflict, not a server failure.
        StartOutcome::Gone(Gone::Deleted) => Err(ApiError::Superseded(
            "sandbox_deleted_while_starting: a delete for this chat was accepted before it ran",
        )),
        StartOutcome::Gone(Gone::Replaced) => Err(ApiError::Superseded(
            "sandbox_replaced_while_starting: another request made a new session for this chat",
        )),
        StartOutcome::Gone(Gone::Expired) => Err(ApiError::StartFailed(
            "the session's ttl ran out before it was running".into(),
        )),
        StartOutcome::Timeout(_) => Err(ApiError::Timeout(format!(
            "sandbox_start_timeout: not running after {}s; it keeps starting in the background",
            wait_for.as_secs()
        ))),
    }
}

fn respond_running(row: &SandboxRow) -> Result<Json<SessionResponse>, ApiError> {
    SessionResponse::from_running(row)
        .map(Json)
        .ok_or_else(|| ApiError::StartFailed("running without an endpoint".into()))
}

/// The old contract: answered once the container is gone.
#[utoipa::path(delete, path = "/api/v1/sandboxes/{chat_id}", tag = "compat",
    params(("chat_id" = String, Path, description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "`deleted` or `not_found`", body = DeleteResponse),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 422, description = "not a UUID", body = ErrorBody),
        (status = 504, description = "not removed within `controller.delete_wait_seconds`", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<DeleteResponse>, ApiError> {
    let result = delete_inner(&state, &raw).await;
    state.metrics.delete(match &result {
        Ok(r) => r.result,
        Err(ApiError::Timeout(_)) => "timeout",
        Err(ApiError::Internal(_)) => "error",
        Err(_) => "invalid",
    });
    result
}

async fn delete_inner(state: &AppState, raw: &str) -> Result<Json<DeleteResponse>, ApiError> {
    let chat_id = parse_chat_id(raw)?;
    let now = Utc::now();
    let Some(before) = state.store.request_delete(chat_id, now).await? else {
        return Ok(Json(DeleteResponse {
            chat_id: chat_id.to_string(),
            result: "not_found",
            session_id: None,
            container_id: None,
        }));
    };
    state.wake.notify_one();
    let wait_for = Duration::from_secs(state.settings.controller.delete_wait_seconds);
    if !wait::for_gone(&state.store, chat_id, before.session_id, wait_for).await? {
        return Err(ApiError::Timeout(format!(
            "sandbox_delete_timeout: container not removed after {}s; removal continues in the background",
            wait_for.as_secs()
        )));
    }
    // An expired session was already stopped: to the old clients that is "not found".
    let found = before.is_live(now) || before.deleted_at.is_some();
    Ok(Json(DeleteResponse {
        chat_id: chat_id.to_string(),
        result: if found { "deleted" } else { "not_found" },
        session_id: found.then(|| before.session_id.to_string()),
        container_id: if found { before.container_id } else { None },
    }))
}
