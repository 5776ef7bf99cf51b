//! The old service's contract: `POST /api/v1/create`, `DELETE /api/v1/sandboxes/{chat_id}`,
//! `GET /api/v1/health`, answered in one call by waiting (bounded) for the controller.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use utoipa::ToSchema;

use super::error::ChatPath;
use super::input::{self, Fields, Problems, Source};
use super::views::{DeleteResponse, ErrorBody, SessionResponse, ValidationErrorBody};
use super::{ApiError, AppState};
use crate::config::spec;
use crate::domain::request::validate_agent_id;
use crate::domain::{ChatId, Phase};
use crate::store::wait::{self, Gone, StartOutcome};
use crate::store::{CreateOutcome, NewSession, SandboxRow};

/// Liveness: the process answers. Never needs a token.
#[utoipa::path(get, path = "/api/v1/health", tag = "compat", security(()),
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = serde_json::Value)))]
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 only when the database answers, the engine is connected and a pass completed recently.
#[utoipa::path(get, path = "/api/v1/ready", tag = "operations",
    responses(
        (status = 200, description = "database, engine and controller loop are fine", body = serde_json::Value),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 503, description = "names each failed check", body = ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let db = state.store.ping().await.map_err(|e| e.to_string());
    let health = state.status.snapshot();
    let max_age_ms = i64::try_from(state.settings.sandbox.cleanup_interval_seconds)
        .unwrap_or(i64::MAX / 4000)
        .saturating_mul(2000)
        .saturating_add(5000);
    let fresh = health
        .last_pass
        .is_some_and(|at| (Utc::now() - at).num_milliseconds() <= max_age_ms);
    let mut failed = Vec::new();
    if let Err(e) = &db {
        failed.push(format!("database: {e}"));
    }
    if !health.engine_connected {
        let why = health.last_error.as_deref().unwrap_or("not connected");
        failed.push(format!("{}: {why}", state.settings.runtime.as_str()));
    }
    if !fresh {
        failed.push("controller: no reconcile pass completed recently".into());
    }
    if let Some(e) = &health.egress_error {
        failed.push(format!("egress: {e}"));
    }
    failed.extend(health.profile_errors.iter().cloned());
    if failed.is_empty() {
        Json(json!({ "status": "ready", "warm_pool": health.warm_pool })).into_response()
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
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain"),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`metrics.enabled` is false", body = ErrorBody)))]
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

/// `POST /api/v1/create` body. Read field by field (`input.rs`) so that every problem is
/// reported in the old server's shape; this type documents it.
// Documents the input for OpenAPI; `input.rs` reads it field by field.
#[allow(dead_code)]
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// A UUID in any spelling; answered canonical.
    #[schema(format = "uuid")]
    pub chat_id: String,
    /// Non-blank, at most 256 bytes, no control characters.
    #[schema(min_length = 1, max_length = 256)]
    pub agent_id: String,
    /// An absolute host directory that exists and that the volume policy allows.
    pub volume_host_path: String,
    /// An isolation profile of `sandbox.profiles` (default `sandbox.default_profile`). Old
    /// clients never send it; a live session under another profile is not reused.
    pub profile: Option<String>,
}

/// Checks agent and volume into the session they ask for, adding each problem under its
/// field to those the body already had; a 422 with all of them if any. Nothing is written.
pub(super) fn new_session(
    state: &AppState,
    chat_id: Option<ChatId>,
    agent_id: Option<&str>,
    volume_host_path: Option<&str>,
    profile: Option<&str>,
    ttl_seconds: u64,
    mut problems: Problems,
) -> Result<NewSession, ApiError> {
    let profiles = &state.settings.sandbox.profiles;
    if let Some(name) = profile.filter(|p| !profiles.contains_key(*p)) {
        let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
        problems.push(
            "value_error",
            Source::Body,
            "profile",
            format!(
                "Value error, unknown profile `{name}` (sandbox.profiles has: {})",
                known.join(", ")
            ),
            json!(name),
        );
    }
    let agent_id = agent_id.and_then(|raw| {
        validate_agent_id(raw)
            .map_err(|e| problems.value_error(Source::Body, "agent_id", json!(raw), &e))
            .ok()
    });
    let volume = volume_host_path.and_then(|raw| {
        state
            .volumes
            .check(raw)
            .map_err(|e| problems.value_error(Source::Body, "volume_host_path", json!(raw), &e))
            .ok()
    });
    problems.finish()?;
    // Without a problem every field is there.
    let (Some(chat_id), Some(agent_id), Some(volume)) = (chat_id, agent_id, volume) else {
        return Err(ApiError::BadRequest {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: "invalid request".into(),
        });
    };
    let spec = spec::resolve(&state.settings.sandbox, chat_id, agent_id, &volume, profile);
    Ok(NewSession {
        state: crate::domain::hibernation::SandboxState::Running,
        profile: profile.map(str::to_string),
        chat_id,
        agent_id: agent_id.to_string(),
        volume_host_path: volume.display().to_string(),
        spec_json: spec.to_json(),
        spec_hash: spec.hash(),
        // Bounded by validation (requests) and config validation (the default).
        ttl: chrono::Duration::seconds(i64::try_from(ttl_seconds).unwrap_or(MAX_TTL)),
    })
}

/// How long a write waits, right after start-up, for the old service's containers to be
/// taken over (`controller.take_over_old_service`); then it goes ahead (the engine may be down).
pub(super) const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// A year: the longest TTL anything may carry, far inside chrono's range.
const MAX_TTL: i64 = crate::config::MAX_CONFIG_TTL_SECONDS as i64;

/// Reads and checks a create body; every problem at once, in the old server's shape.
fn read_create(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<NewSession, ApiError> {
    let obj = input::json_object(headers, body)?;
    let mut f = Fields::new(&obj);
    let chat_id = f.uuid("chat_id");
    let agent_id = f.string("agent_id");
    let volume = f.string("volume_host_path");
    let profile = f.optional_string("profile");
    f.forbid_others(&["chat_id", "agent_id", "volume_host_path", "profile"]);
    let ttl = state.settings.sandbox.ttl_seconds;
    new_session(state, chat_id, agent_id, volume, profile, ttl, f.problems)
}

/// The old contract: reuse the live session when agent and volume match, else start one.
#[utoipa::path(post, path = "/api/v1/create", tag = "compat", request_body = CreateRequest,
    responses(
        (status = 200, description = "running", body = SessionResponse),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 409, description = "`sandbox_conflict`: a live session that has run has another agent or volume; or a concurrent delete/replace won", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input: the old server's list of `{type, loc, msg, input}`", body = ValidationErrorBody),
        (status = 503, description = "`sandbox_start_failed: <reason>`; retries continue in the background", body = ErrorBody),
        (status = 504, description = "not running within `controller.create_wait_seconds`", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<SessionResponse>, ApiError> {
    let result = create_inner(&state, &headers, &body).await;
    state.metrics.create(match &result {
        Ok((_, how)) => how,
        Err(ApiError::Conflict) => "conflict",
        Err(ApiError::StartFailed(_) | ApiError::Internal(_)) => "error",
        Err(ApiError::Timeout(_)) => "timeout",
        Err(ApiError::Superseded(_)) => "superseded",
        Err(_) => "invalid",
    });
    result.map(|(answer, _)| answer)
}

/// The answer and how it was reached: `created`, `reused` or `replaced` (the old counter's
/// results: a new session where the chat had an expired, deleted or never-started one).
async fn create_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Json<SessionResponse>, &'static str), ApiError> {
    let mut new = read_create(state, headers, body)?;
    let chat_id = new.chat_id;
    // A session whose first start is still under way (its create may be waiting) is not
    // taken from under it: that create's wait is the window.
    let first_start = chrono::Duration::seconds(
        i64::try_from(state.settings.controller.create_wait_seconds).unwrap_or(i64::from(u32::MAX)),
    );
    // A live session is answered from memory; the workspace lookup (a SQLite read) and the
    // takeover's wait are for a new session only (the scale bench: a third of the API mix).
    let outcome = match state
        .store
        .answer_live(&new, Utc::now(), first_start)
        .await?
    {
        Some(answer) => answer,
        None => {
            super::storage::place_in_workspace(state, &mut new).await?;
            state.status.takeover_settled(TAKEOVER_WAIT).await;
            state
                .store
                .create_or_reuse(&new, Utc::now(), first_start)
                .await?
        }
    };
    let (row, how) = match outcome {
        CreateOutcome::Conflict(_) => return Err(ApiError::Conflict),
        // Paused or hibernated (declared or idle): resumed first, then answered as if it
        // had run all along (same session and container).
        CreateOutcome::Reused(row)
            if crate::resume::asleep(state, &row, Utc::now()) || row.phase == Phase::Running =>
        {
            match crate::resume::awake(state, chat_id, "create").await? {
                Some(r) if r.session_id == row.session_id && r.phase == Phase::Running => {
                    return Ok((respond_running(&r)?, "reused"));
                }
                _ => return Err(ApiError::Superseded(
                    "sandbox_replaced_while_starting: another request changed this chat's sandbox",
                )),
            }
        }
        CreateOutcome::Reused(row) if row.phase == Phase::Failed => {
            state
                .store
                .retry_now(chat_id, row.session_id, Utc::now())
                .await?;
            (row, "reused")
        }
        CreateOutcome::Reused(row) => (row, "reused"),
        CreateOutcome::Created(row) => (row, "created"),
        CreateOutcome::Replaced(row) => (row, "replaced"),
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
        StartOutcome::Running(row) => Ok((respond_running(&row)?, how)),
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
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "`deleted` or `not_found`", body = DeleteResponse),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 422, description = "not a UUID", body = ValidationErrorBody),
        (status = 504, description = "not removed within `controller.delete_wait_seconds`", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
) -> Result<Json<DeleteResponse>, ApiError> {
    let result = delete_inner(&state, chat_id).await;
    state.metrics.delete(match &result {
        Ok(r) => r.result,
        Err(ApiError::Timeout(_)) => "timeout",
        Err(ApiError::Internal(_)) => "error",
        Err(_) => "invalid",
    });
    result
}

async fn delete_inner(state: &AppState, chat_id: ChatId) -> Result<Json<DeleteResponse>, ApiError> {
    state.status.takeover_settled(TAKEOVER_WAIT).await;
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
