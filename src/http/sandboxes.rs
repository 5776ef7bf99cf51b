//! The declarative API: apply, read, list, renew. Returns at once; `?wait=SECONDS` blocks
//! (bounded by `controller.max_wait_seconds`) until the sandbox settles.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::compat::{new_session, TAKEOVER_WAIT};
use utoipa::{IntoParams, ToSchema};

use super::error::ChatPath;
use super::input::{self, Fields, Problems, QueryParams, Source};
use super::views::{ErrorBody, SandboxView, ValidationErrorBody};
use super::{watch, ApiError, AppState};
use crate::domain::hibernation::SandboxState;
use crate::domain::{ChatId, Phase};
use crate::store::wait;
use crate::store::{ApplyOutcome, ListFilter, StoredEvent};
use axum::response::{IntoResponse, Response};

/// Longest TTL a client may ask for (30 days).
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Longest `?wait=` accepted; the server also caps it at `controller.max_wait_seconds`.
const MAX_WAIT_PARAM: u64 = 3600;

/// `?wait=SECONDS`: read from the raw query (`input.rs`), documented by this type.
#[derive(Debug, Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to wait for the sandbox to settle (0 = answer at once; capped by
    /// `controller.max_wait_seconds`).
    #[param(minimum = 0, maximum = 3600)]
    wait: Option<u64>,
}

impl WaitQuery {
    fn read(raw: Option<&str>) -> Result<Self, ApiError> {
        let params = QueryParams::parse(raw)?;
        let mut problems = Problems::default();
        let wait = params.int("wait", 0, MAX_WAIT_PARAM, &mut problems);
        problems.finish()?;
        Ok(Self { wait })
    }

    fn duration(&self, state: &AppState) -> Option<Duration> {
        self.wait
            .filter(|w| *w > 0)
            .map(|w| Duration::from_secs(w.min(state.settings.controller.max_wait_seconds)))
    }
}

// Documents the input for OpenAPI; `input.rs` reads it field by field.
#[allow(dead_code)]
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// Non-blank, at most 256 bytes, no control characters.
    #[schema(min_length = 1, max_length = 256)]
    pub agent_id: String,
    /// An absolute host directory that exists and that the volume policy allows.
    pub volume_host_path: String,
    /// TTL of a new session (1 s to 30 days); default `sandbox.ttl_seconds`.
    #[schema(minimum = 1, maximum = 2592000)]
    pub ttl_seconds: Option<u64>,
    /// An isolation profile of `sandbox.profiles` (default `sandbox.default_profile`); a
    /// different one replaces the sandbox.
    pub profile: Option<String>,
    /// `running` (default), `paused` or `hibernated`; changing only this keeps the session
    /// and its container (`docs/hibernation.md`).
    pub state: Option<SandboxState>,
}

/// Reads and checks a PUT body.
fn read_apply(
    state: &AppState,
    chat_id: ChatId,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<crate::store::NewSession, ApiError> {
    let obj = input::json_object(headers, body)?;
    let mut f = Fields::new(&obj);
    let agent_id = f.string("agent_id");
    let volume = f.string("volume_host_path");
    let ttl = f.optional_int("ttl_seconds", 1, MAX_TTL_SECONDS);
    let profile = f.optional_string("profile");
    let wanted = f.optional_string("state");
    f.forbid_others(&[
        "agent_id",
        "volume_host_path",
        "ttl_seconds",
        "profile",
        "state",
    ]);
    let ttl = ttl
        .ok()
        .flatten()
        .unwrap_or(state.settings.sandbox.ttl_seconds);
    let mut problems = f.problems;
    let wanted = read_state(state, wanted, &mut problems);
    let mut new = new_session(
        state,
        Some(chat_id),
        agent_id,
        volume,
        profile,
        ttl,
        problems,
    )?;
    new.state = wanted;
    Ok(new)
}

/// `state`: one of the three names; paused and hibernated need an engine that can do them.
fn read_state(state: &AppState, raw: Option<&str>, problems: &mut Problems) -> SandboxState {
    let Some(raw) = raw else {
        return SandboxState::Running;
    };
    match raw.parse::<SandboxState>() {
        Ok(s) if s != SandboxState::Running && !hibernation_available(state) => {
            problems.push(
                "value_error",
                Source::Body,
                "state",
                format!(
                    "Value error, `{s}` is not available with runtime: {} (docs/hibernation.md)",
                    state.settings.runtime.as_str()
                ),
                json!(raw),
            );
            SandboxState::Running
        }
        Ok(s) => s,
        Err(_) => {
            problems.push(
                "enum",
                Source::Body,
                "state",
                "Input should be 'running', 'paused' or 'hibernated'".to_string(),
                json!(raw),
            );
            SandboxState::Running
        }
    }
}

/// Swarm services cannot be paused or stopped in place.
fn hibernation_available(state: &AppState) -> bool {
    state.settings.runtime != crate::config::RuntimeKind::Swarm
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
        .map(SandboxView::detailed)
        .ok_or(ApiError::NotFound)
}

/// Declare the sandbox of a chat; a changed spec replaces the session.
#[utoipa::path(put, path = "/api/v1/sandboxes/{chat_id}", tag = "sandboxes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"), WaitQuery),
    request_body = ApplyRequest,
    responses(
        (status = 200, description = "written; with `wait`, settled or timed out", body = ApplyResponse),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn apply(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ApplyResponse>, ApiError> {
    let q = WaitQuery::read(query.as_deref())?;
    let mut new = read_apply(&state, chat_id, &headers, &body)?;
    super::storage::place_in_workspace(&state, &mut new).await?;
    state.status.takeover_settled(TAKEOVER_WAIT).await;
    let retention = state.settings.sandbox.hibernated_retention();
    let (outcome, row) = match state.store.apply(&new, Utc::now(), retention).await? {
        ApplyOutcome::Created(r) => ("created", r),
        ApplyOutcome::Replaced(r) => ("replaced", r),
        ApplyOutcome::StateChanged(r) => ("state_changed", r),
        ApplyOutcome::Unchanged(r) => ("unchanged", r),
    };
    // "running", unchanged, for a sandbox the idle policy put to sleep: a resume.
    let row = if outcome == "unchanged"
        && new.state == SandboxState::Running
        && crate::resume::asleep(&state, &row, Utc::now())
    {
        state
            .store
            .declare_state(
                chat_id,
                row.session_id,
                SandboxState::Running,
                crate::store::Declared::Client,
                new.ttl,
                retention,
                Utc::now(),
            )
            .await?
            .unwrap_or(row)
    } else {
        row
    };
    if outcome != "unchanged" || row.phase != Phase::Running {
        state.wake.notify_one();
    }
    let sandbox = match q.duration(&state) {
        Some(d) if new.state != SandboxState::Running => {
            let phase = new.state.phase();
            match wait::for_phase(&state.store, chat_id, row.session_id, phase, d).await? {
                Some(r) => SandboxView::from(&r),
                None => view_after_wait(&state, chat_id, &WaitQuery::default()).await?,
            }
        }
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
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"), WaitQuery, WatchQuery),
    responses(
        (status = 200, description = "the sandbox; with `watch=true` a `text/event-stream` of its \
            changes (`event: change`, `id` = event-log id, data = a `Change`; a final \
            `event: resync` when the client fell behind)", body = SandboxView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`sandbox_not_found`", body = ErrorBody),
        (status = 422, description = "not a UUID, or a bad `wait`", body = ValidationErrorBody)))]
pub async fn get_one(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    if watch::wanted(&params)? {
        return watch::stream(&state, &headers, &params, Some(chat_id));
    }
    let q = WaitQuery::read(query.as_deref())?;
    Ok(Json(view_after_wait(&state, chat_id, &q).await?).into_response())
}

/// `?watch=true`: a Server-Sent Events stream of changes instead of one answer.
#[allow(dead_code)]
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Stream changes (SSE) instead of answering once.
    watch: Option<bool>,
    /// Resume after this event id (as the `Last-Event-ID` header does).
    #[param(minimum = 0)]
    last_event_id: Option<i64>,
}

/// List filters: read from the raw query (`input.rs`), documented by this type.
// Documents the input for OpenAPI; `input.rs` reads it field by field.
#[allow(dead_code)]
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only this agent.
    pub agent_id: Option<String>,
    /// Opaque cursor from the previous page's `next_cursor`.
    #[param(format = "uuid")]
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListResponse {
    items: Vec<SandboxView>,
    next_cursor: Option<String>,
}

/// Sandboxes ordered by chat id, filtered and paginated.
#[utoipa::path(get, path = "/api/v1/sandboxes", tag = "sandboxes", params(ListQuery, WatchQuery),
    responses(
        (status = 200, description = "one page, ordered by chat id; with `watch=true` a \
            `text/event-stream` of every sandbox's changes (see the one-sandbox route)", body = ListResponse),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 422, description = "invalid filter or cursor", body = ValidationErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = QueryParams::parse(query.as_deref())?;
    if watch::wanted(&params)? {
        return watch::stream(&state, &headers, &params, None);
    }
    let mut problems = Problems::default();
    let phase = params.get("phase").and_then(|raw| {
        raw.parse::<Phase>()
            .map_err(|_| {
                let names: Vec<_> = Phase::ALL.iter().map(|p| format!("'{p}'")).collect();
                problems.push(
                    "enum",
                    Source::Query,
                    "phase",
                    format!("Input should be {}", names.join(", ")),
                    json!(raw),
                )
            })
            .ok()
    });
    let after = params.get("cursor").and_then(|raw| {
        input::chat_id(Source::Query, "cursor", raw)
            .map_err(|e| problems.push(e.kind, Source::Query, "cursor", e.msg, e.input))
            .ok()
    });
    let limit = params.int("limit", 1, 1000, &mut problems).unwrap_or(100) as u32;
    problems.finish()?;
    let rows = state
        .store
        .list(&ListFilter {
            phase,
            agent_id: params.get("agent_id").map(str::to_string),
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
    })
    .into_response())
}

// Documents the input for OpenAPI; `input.rs` reads it field by field.
#[allow(dead_code)]
#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// New TTL from now (1 s to 30 days); default `sandbox.ttl_seconds`.
    #[schema(minimum = 1, maximum = 2592000)]
    pub ttl_seconds: Option<u64>,
}

/// Extend the TTL of a live session; the container stays.
#[utoipa::path(post, path = "/api/v1/sandboxes/{chat_id}/renew", tag = "sandboxes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    request_body(content = Option<RenewRequest>, description = "optional: empty, `null` or an object"),
    responses(
        (status = 200, description = "the renewed sandbox (a paused or hibernated one is resumed first)", body = SandboxView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "no live session", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`sandbox_start_failed: resume failed: …`: a sleeping sandbox could not be resumed", body = ErrorBody),
        (status = 504, description = "`sandbox_resume_timeout`: not running again within `controller.create_wait_seconds`", body = ErrorBody)))]
pub async fn renew(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    // The body is optional: empty or `null` means "the configured TTL".
    let ttl = match input::json_body(&headers, &body, true)? {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => {
            let obj = input::object(value)?;
            let mut f = Fields::new(&obj);
            let ttl = f.optional_int("ttl_seconds", 1, MAX_TTL_SECONDS);
            f.forbid_others(&["ttl_seconds"]);
            f.problems.finish()?;
            ttl.ok().flatten()
        }
    };
    let ttl = ttl.unwrap_or(state.settings.sandbox.ttl_seconds);
    state.status.takeover_settled(TAKEOVER_WAIT).await;
    // Bounded above by validation: far inside chrono's range.
    let ttl = chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::from(u32::MAX)));
    // A renew is a call: a sleeping sandbox is resumed first.
    crate::resume::awake(&state, chat_id, "renew").await?;
    let row = state
        .store
        .renew(chat_id, ttl, Utc::now())
        .await?
        .ok_or(ApiError::NotFound)?;
    state.wake.notify_one();
    Ok(Json(SandboxView::from(&row)))
}

/// `POST …/pause`, `…/hibernate`, `…/resume`: shortcuts for declaring the state of the live
/// session (the declarative field stays the truth); `?wait=` waits until it has settled.
async fn declare(
    state: &AppState,
    chat_id: ChatId,
    wanted: SandboxState,
    query: Option<&str>,
) -> Result<Json<SandboxView>, ApiError> {
    let q = WaitQuery::read(query)?;
    if wanted != SandboxState::Running && !hibernation_available(state) {
        return Err(ApiError::BadRequest {
            status: axum::http::StatusCode::CONFLICT,
            detail: format!(
                "hibernation_unavailable: runtime {} cannot pause or stop a sandbox in place",
                state.settings.runtime.as_str()
            ),
        });
    }
    state.status.takeover_settled(TAKEOVER_WAIT).await;
    let now = Utc::now();
    let live = state
        .store
        .get(chat_id)
        .await?
        .filter(|r| r.is_live(now))
        .ok_or(ApiError::NotFound)?;
    let sandbox = &state.settings.sandbox;
    let row = state
        .store
        .declare_state(
            chat_id,
            live.session_id,
            wanted,
            crate::store::Declared::Client,
            sandbox.ttl(),
            sandbox.hibernated_retention(),
            now,
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    state.wake.notify_one();
    let settled = match q.duration(state) {
        Some(d) => {
            wait::for_phase(&state.store, chat_id, row.session_id, wanted.phase(), d).await?
        }
        None => None,
    };
    Ok(Json(SandboxView::from(settled.as_ref().unwrap_or(&row))))
}

macro_rules! shortcut {
    ($name:ident, $state:expr, $path:literal, $what:literal) => {
        #[doc = $what]
        #[utoipa::path(post, path = $path, tag = "sandboxes",
            params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"), WaitQuery),
            responses(
                (status = 200, description = "declared; with `wait`, settled or timed out", body = SandboxView),
                (status = 401, description = "token missing or wrong", body = ErrorBody),
                (status = 404, description = "no live session", body = ErrorBody),
                (status = 409, description = "`hibernation_unavailable`: the runtime cannot (swarm)", body = ErrorBody),
                (status = 422, description = "not a UUID, or a bad `wait`", body = ValidationErrorBody)))]
        pub async fn $name(
            State(state): State<AppState>,
            ChatPath(chat_id): ChatPath,
            RawQuery(query): RawQuery,
        ) -> Result<Json<SandboxView>, ApiError> {
            declare(&state, chat_id, $state, query.as_deref()).await
        }
    };
}

shortcut!(
    pause,
    SandboxState::Paused,
    "/api/v1/sandboxes/{chat_id}/pause",
    "Freeze the sandbox's processes in place (memory kept, no CPU)."
);
shortcut!(
    hibernate,
    SandboxState::Hibernated,
    "/api/v1/sandboxes/{chat_id}/hibernate",
    "Stop the sandbox's container, keeping it for a resume; deleted after `sandbox.hibernated_retention_seconds`."
);
shortcut!(
    resume,
    SandboxState::Running,
    "/api/v1/sandboxes/{chat_id}/resume",
    "Bring a paused or hibernated sandbox back (same session and container)."
);

/// The chat's last 100 events, newest first.
#[utoipa::path(get, path = "/api/v1/sandboxes/{chat_id}/events", tag = "sandboxes",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "newest first", body = Vec<StoredEvent>),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 422, description = "not a UUID", body = ValidationErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
) -> Result<Json<Vec<StoredEvent>>, ApiError> {
    Ok(Json(state.store.events(Some(chat_id), 100).await?))
}
