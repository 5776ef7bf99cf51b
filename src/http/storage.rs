//! Chat storage routes: workspaces (one per user, with a quota), their chats, each chat's
//! `history.md` and attachments. Metadata is in the store; the bytes are on the workspace's
//! own file system (`crate::storage`), where the kernel holds the quota. Like the
//! desired-state routes, these never call the container engine.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::dataplane::{caller, Peer};
use super::error::ChatPath;
use super::input::{self, Fields, QueryParams, Source};
use super::views::{ErrorBody, ValidationErrorBody};
use super::{ApiError, AppState};
use crate::domain::storage::{AttachmentName, WorkspaceId, HISTORY_FILE};
use crate::domain::{format_time, ChatId};
use crate::storage::{files, StorageError};
use crate::store::{Chat, ChatFile, EventAction, EventOutcome, NewEvent, Workspace};

/// An error code of chat storage, as `{"detail": "<code>"}`.
fn code(status: StatusCode, detail: &str) -> ApiError {
    ApiError::BadRequest {
        status,
        detail: detail.into(),
    }
}

fn workspace_not_found() -> ApiError {
    code(StatusCode::NOT_FOUND, "workspace_not_found")
}

fn chat_not_found() -> ApiError {
    code(StatusCode::NOT_FOUND, "chat_not_found")
}

fn quota_exceeded() -> ApiError {
    code(StatusCode::PAYLOAD_TOO_LARGE, "workspace_quota_exceeded")
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::QuotaExceeded => quota_exceeded(),
            StorageError::NotFound => code(StatusCode::NOT_FOUND, "chat_file_not_found"),
            StorageError::Busy(why) => code(
                StatusCode::CONFLICT,
                &format!("workspace_quota_not_changed: {why}"),
            ),
            other => {
                tracing::error!(error = %other, "chat storage failed");
                code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("storage_unavailable: {other}"),
                )
            }
        }
    }
}

/// `{workspace_id}` in the path; a bad one is a 422 naming it.
fn workspace_id(raw: &str) -> Result<WorkspaceId, ApiError> {
    raw.parse().map_err(|_| {
        input::reject(
            "uuid_parsing",
            Source::Path,
            "workspace_id",
            "Input should be a valid UUID".into(),
            json!(raw),
        )
    })
}

/// An attachment name from the path; a refused one is a 422 saying why.
fn attachment(raw: &str) -> Result<AttachmentName, ApiError> {
    AttachmentName::parse(raw).map_err(|e| {
        input::reject(
            "value_error",
            Source::Path,
            "name",
            format!("Value error, {e}"),
            json!(raw),
        )
    })
}

/// A workspace's usage: bytes in use on its file system, and its quota.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub used_bytes: u64,
    pub quota_bytes: u64,
}

/// A user's workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceView {
    pub workspace_id: String,
    pub user_id: String,
    pub quota_bytes: u64,
    /// ISO-8601 UTC.
    pub created_at: String,
    /// `null` while its file system is not mounted.
    pub usage: Option<UsageView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceList {
    pub items: Vec<WorkspaceView>,
}

/// A chat of a workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatView {
    pub chat_id: String,
    pub workspace_id: String,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatList {
    pub items: Vec<ChatView>,
}

/// An attachment's metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileView {
    pub file_id: String,
    pub chat_id: String,
    pub name: String,
    pub content_type: Option<String>,
    pub size_bytes: u64,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    pub items: Vec<FileView>,
}

/// The history after a write.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryWritten {
    pub chat_id: String,
    pub size_bytes: u64,
}

/// What a delete did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub chat_id: String,
    /// The attachment's name (attachment deletes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `deleted`.
    pub result: String,
}

/// `POST /api/v1/workspaces`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // read field by field (`input::Fields`), described for OpenAPI
pub struct CreateWorkspaceBody {
    /// The trusted caller's user id: 1 to 256 bytes, no control characters.
    #[schema(min_length = 1, max_length = 256)]
    pub user_id: String,
    /// Default `storage.default_quota_bytes`; at least 1 MiB, at most `storage.max_quota_bytes`.
    #[schema(minimum = 1048576)]
    pub quota_bytes: Option<u64>,
}

/// `PATCH /api/v1/workspaces/{workspace_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct QuotaBody {
    #[schema(minimum = 1048576)]
    pub quota_bytes: u64,
}

/// `POST /api/v1/workspaces/{workspace_id}/chats` (the body may be empty).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct CreateChatBody {
    /// A UUID; default: a new one.
    #[schema(format = "uuid")]
    pub chat_id: Option<String>,
}

fn workspace_view(state: &AppState, w: &Workspace) -> WorkspaceView {
    WorkspaceView {
        workspace_id: w.workspace_id.to_string(),
        user_id: w.user_id.clone(),
        quota_bytes: w.quota_bytes,
        created_at: format_time(w.created_at),
        usage: state
            .storage
            .usage(w.workspace_id, w.quota_bytes)
            .ok()
            .map(|u| UsageView {
                used_bytes: u.used_bytes,
                quota_bytes: u.quota_bytes,
            }),
    }
}

fn chat_view(c: &Chat) -> ChatView {
    ChatView {
        chat_id: c.chat_id.to_string(),
        workspace_id: c.workspace_id.to_string(),
        created_at: format_time(c.created_at),
    }
}

fn file_view(f: &ChatFile) -> FileView {
    FileView {
        file_id: f.file_id.clone(),
        chat_id: f.chat_id.to_string(),
        name: f.name.clone(),
        content_type: f.content_type.clone(),
        size_bytes: f.size_bytes,
        created_at: format_time(f.created_at),
    }
}

/// Writes an audit line: who wrote or removed what, and how many bytes; never contents.
async fn audit(
    state: &AppState,
    who: &crate::dataplane::Caller,
    chat: Option<ChatId>,
    action: EventAction,
    detail: Value,
) {
    let chat = chat.map_or_else(|| "-".to_string(), |c| c.to_string());
    let detail = detail.to_string();
    let event = NewEvent {
        chat_id: &chat,
        session_id: None,
        container_id: None,
        action,
        outcome: EventOutcome::Ok,
        error: None,
        actor: Some(&who.actor),
        detail: Some(&detail),
    };
    if let Err(e) = state.store.event(&event, Utc::now()).await {
        tracing::warn!(error = %e, "cannot record a storage event");
    }
}

/// `POST /api/v1/workspaces {user_id, quota_bytes?}`: the user's workspace, made (201) or
/// as it is (200); never a second one.
#[utoipa::path(post, path = "/api/v1/workspaces", tag = "storage", request_body = CreateWorkspaceBody,
    responses(
        (status = 201, description = "made, with its file system", body = WorkspaceView),
        (status = 200, description = "the user's workspace, as it was (one per user)", body = WorkspaceView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn create_workspace(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let obj = input::json_object(&headers, &body)?;
    let mut f = Fields::new(&obj);
    let user_id = f.string("user_id");
    let limits = &state.settings.storage;
    let quota = f.optional_int("quota_bytes", 1 << 20, limits.max_quota_bytes);
    f.forbid_others(&["user_id", "quota_bytes"]);
    if let Some(u) =
        user_id.filter(|u| u.trim().is_empty() || u.len() > 256 || u.chars().any(char::is_control))
    {
        f.problems.push(
            "value_error",
            Source::Body,
            "user_id",
            "Value error, must be 1 to 256 bytes without control characters".into(),
            json!(u),
        );
    }
    f.problems.finish()?;
    let (Some(user_id), Ok(quota)) = (user_id, quota) else {
        return Err(code(StatusCode::UNPROCESSABLE_ENTITY, "invalid request"));
    };
    let quota = quota.unwrap_or(limits.default_quota_bytes);
    let (workspace, made) = state
        .store
        .workspace_for_user(user_id, quota, Utc::now())
        .await?;
    let ws = workspace.workspace_id;
    let prepared = if made {
        state
            .storage
            .create_workspace(ws, workspace.quota_bytes)
            .await
    } else {
        state
            .storage
            .ensure_workspace(ws, workspace.quota_bytes)
            .await
    };
    if let Err(e) = prepared {
        if made {
            // Nothing half-made stays: the row goes with the file system that failed.
            let _ = state.store.workspace_delete(ws).await;
        }
        return Err(e.into());
    }
    if made {
        let who = caller(&state, &headers, peer);
        audit(
            &state,
            &who,
            None,
            EventAction::StorageWrite,
            json!({"what": "workspace", "workspace_id": ws.to_string(), "quota_bytes": quota}),
        )
        .await;
    }
    let status = if made {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(workspace_view(&state, &workspace))).into_response())
}

/// `GET /api/v1/workspaces?user_id=`: every workspace, or the user's.
#[utoipa::path(get, path = "/api/v1/workspaces", tag = "storage",
    params(("user_id" = Option<String>, Query, description = "only this user's")),
    responses(
        (status = 200, description = "the workspaces, oldest first", body = WorkspaceList),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn list_workspaces(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<WorkspaceList>, ApiError> {
    let query = QueryParams::parse(query.as_deref())?;
    let found = state.store.workspaces(query.get("user_id")).await?;
    let items = found.iter().map(|w| workspace_view(&state, w)).collect();
    Ok(Json(WorkspaceList { items }))
}

async fn find_workspace(state: &AppState, raw: &str) -> Result<Workspace, ApiError> {
    let id = workspace_id(raw)?;
    state
        .store
        .workspace(id)
        .await?
        .ok_or_else(workspace_not_found)
}

/// `GET /api/v1/workspaces/{workspace_id}`, with its usage.
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace_id}", tag = "storage",
    params(("workspace_id" = String, Path, format = "uuid", description = "workspace UUID")),
    responses(
        (status = 200, description = "the workspace and its usage", body = WorkspaceView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`workspace_not_found`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn get_workspace(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let w = find_workspace(&state, &raw).await?;
    Ok(Json(workspace_view(&state, &w)))
}

/// `PATCH /api/v1/workspaces/{workspace_id} {quota_bytes}`: a new quota, online. A quota
/// below what is used is refused (409 `workspace_quota_below_usage`).
#[utoipa::path(patch, path = "/api/v1/workspaces/{workspace_id}", tag = "storage",
    params(("workspace_id" = String, Path, format = "uuid", description = "workspace UUID")), request_body = QuotaBody,
    responses(
        (status = 200, description = "the quota is in force", body = WorkspaceView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`workspace_not_found`", body = ErrorBody),
        (status = 409, description = "`workspace_quota_below_usage`, or `workspace_quota_not_changed: …` (the file system must grow and a sandbox runs on it; docs/storage.md)", body = ErrorBody),
        (status = 413, description = "body over `http.body_limit_bytes`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn set_quota(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WorkspaceView>, ApiError> {
    let w = find_workspace(&state, &raw).await?;
    let obj = input::json_object(&headers, &body)?;
    let mut f = Fields::new(&obj);
    let quota = f.optional_int(
        "quota_bytes",
        1 << 20,
        state.settings.storage.max_quota_bytes,
    );
    f.forbid_others(&["quota_bytes"]);
    f.problems.finish()?;
    let Ok(Some(quota)) = quota else {
        return Err(input::reject(
            "missing",
            Source::Body,
            "quota_bytes",
            "Field required".into(),
            Value::Null,
        ));
    };
    let usage = state.storage.usage(w.workspace_id, w.quota_bytes)?;
    if usage.used_bytes > quota {
        return Err(code(StatusCode::CONFLICT, "workspace_quota_below_usage"));
    }
    // Growing offline (where online is refused) needs every sandbox of the workspace gone.
    let mut in_use = false;
    for c in state.store.chats(Some(w.workspace_id)).await? {
        in_use |= has_sandbox(&state, c.chat_id).await?;
    }
    state
        .storage
        .set_quota(w.workspace_id, quota, !in_use)
        .await?;
    state
        .store
        .workspace_set_quota(w.workspace_id, quota)
        .await?;
    let who = caller(&state, &headers, peer);
    audit(
        &state,
        &who,
        None,
        EventAction::StorageWrite,
        json!({"what": "quota", "workspace_id": w.workspace_id.to_string(), "quota_bytes": quota}),
    )
    .await;
    let w = state
        .store
        .workspace(w.workspace_id)
        .await?
        .ok_or_else(workspace_not_found)?;
    Ok(Json(workspace_view(&state, &w)))
}

/// `POST /api/v1/workspaces/{workspace_id}/chats {chat_id?}`: a chat, its directory and its
/// empty `history.md` made (201); the same chat of the same workspace again is 200.
#[utoipa::path(post, path = "/api/v1/workspaces/{workspace_id}/chats", tag = "storage",
    params(("workspace_id" = String, Path, format = "uuid", description = "workspace UUID")), request_body = CreateChatBody,
    responses(
        (status = 201, description = "made: its directory and an empty `history.md`", body = ChatView),
        (status = 200, description = "the chat of this workspace, as it was", body = ChatView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`workspace_not_found`", body = ErrorBody),
        (status = 409, description = "`chat_conflict`: the chat belongs to another workspace", body = ErrorBody),
        (status = 413, description = "`workspace_quota_exceeded`, or the body is over its limit", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn create_chat(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let w = find_workspace(&state, &raw).await?;
    let chat_id = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let obj = input::json_object(&headers, &body)?;
        let mut f = Fields::new(&obj);
        let raw = f.optional_string("chat_id");
        let id = raw.and_then(|raw| match input::chat_id(Source::Body, "chat_id", raw) {
            Ok(id) => Some(id),
            Err(e) => {
                f.problems
                    .push(e.kind, Source::Body, "chat_id", e.msg.clone(), json!(raw));
                None
            }
        });
        f.forbid_others(&["chat_id"]);
        f.problems.finish()?;
        id
    };
    let chat_id = chat_id.unwrap_or_else(|| ChatId(uuid::Uuid::new_v4()));
    if let Some(existing) = state.store.chat(chat_id).await? {
        return existing_chat(&existing, w.workspace_id);
    }
    state
        .storage
        .ensure_workspace(w.workspace_id, w.quota_bytes)
        .await?;
    let dir = state.storage.chat_dir(w.workspace_id, chat_id);
    // The directory first, then its row: a crash in between leaves a directory the start-up
    // reconcile removes, never a row without its directory.
    files::init_chat(&dir).await?;
    let chat = Chat {
        chat_id,
        workspace_id: w.workspace_id,
        created_at: Utc::now(),
    };
    if !state.store.chat_insert(&chat).await? {
        // Made meanwhile by another request: answer as for an existing chat.
        let existing = state
            .store
            .chat(chat_id)
            .await?
            .ok_or_else(chat_not_found)?;
        return existing_chat(&existing, w.workspace_id);
    }
    let who = caller(&state, &headers, peer);
    audit(
        &state,
        &who,
        Some(chat_id),
        EventAction::StorageWrite,
        json!({"what": "chat", "workspace_id": w.workspace_id.to_string()}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(chat_view(&chat))).into_response())
}

/// A chat asked to be made that exists: 200 as it is in this workspace, else 409.
fn existing_chat(chat: &Chat, workspace: WorkspaceId) -> Result<Response, ApiError> {
    if chat.workspace_id == workspace {
        Ok((StatusCode::OK, Json(chat_view(chat))).into_response())
    } else {
        Err(code(StatusCode::CONFLICT, "chat_conflict"))
    }
}

/// Whether the chat has a sandbox that may still have (or get) a container on its
/// directory: any row but an expired one.
async fn has_sandbox(state: &AppState, chat_id: ChatId) -> Result<bool, ApiError> {
    Ok(state
        .store
        .get(chat_id)
        .await?
        .is_some_and(|row| row.phase != crate::domain::Phase::Expired || row.deleted_at.is_some()))
}

/// `GET /api/v1/workspaces/{workspace_id}/chats`.
#[utoipa::path(get, path = "/api/v1/workspaces/{workspace_id}/chats", tag = "storage",
    params(("workspace_id" = String, Path, format = "uuid", description = "workspace UUID")),
    responses(
        (status = 200, description = "the workspace's chats, oldest first", body = ChatList),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`workspace_not_found`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn list_chats(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<ChatList>, ApiError> {
    let w = find_workspace(&state, &raw).await?;
    let chats = state.store.chats(Some(w.workspace_id)).await?;
    let items = chats.iter().map(chat_view).collect();
    Ok(Json(ChatList { items }))
}

/// A chat and its directory, its workspace's file system mounted.
async fn find_chat(
    state: &AppState,
    chat_id: ChatId,
) -> Result<(Chat, std::path::PathBuf), ApiError> {
    let chat = state
        .store
        .chat(chat_id)
        .await?
        .ok_or_else(chat_not_found)?;
    Ok((
        chat.clone(),
        state.storage.chat_dir(chat.workspace_id, chat.chat_id),
    ))
}

/// `GET /api/v1/chats/{chat_id}`.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "the chat", body = ChatView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn get_chat(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
) -> Result<Json<ChatView>, ApiError> {
    let (chat, _) = find_chat(&state, chat_id).await?;
    Ok(Json(chat_view(&chat)))
}

/// `DELETE /api/v1/chats/{chat_id}`: refused (409 `chat_has_active_sandbox`) while the chat
/// has a live sandbox; otherwise its metadata and then its directory go.
#[utoipa::path(delete, path = "/api/v1/chats/{chat_id}", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "its metadata and directory are gone", body = Deleted),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 409, description = "`chat_has_active_sandbox`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn delete_chat(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Json<Deleted>, ApiError> {
    let (chat, dir) = find_chat(&state, chat_id).await?;
    if has_sandbox(&state, chat_id).await? {
        return Err(code(StatusCode::CONFLICT, "chat_has_active_sandbox"));
    }
    // The row first: a crash before the directory went leaves a directory without a row,
    // which the start-up reconcile removes.
    state.store.chat_delete(chat_id).await?;
    files::remove_chat(&dir)?;
    let who = caller(&state, &headers, peer);
    audit(
        &state,
        &who,
        Some(chat_id),
        EventAction::StorageDelete,
        json!({"what": "chat", "workspace_id": chat.workspace_id.to_string()}),
    )
    .await;
    Ok(Json(Deleted {
        chat_id: chat_id.to_string(),
        name: None,
        result: "deleted".into(),
    }))
}

/// An attachment write refused: the rest of its body is read (and dropped) first, bounded, as
/// for any oversized body; a client still sending would see a broken pipe, not the answer.
async fn refused<S, E>(rest: &mut S, e: ApiError) -> Result<Response, ApiError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
{
    Ok(super::body::drained_answer(rest, e.into_response()).await)
}

/// Longest time an attachment's body may take to arrive.
const WRITE_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(120);

/// Bytes the chat's workspace may still take.
async fn room_left(state: &AppState, chat: &Chat) -> Result<u64, ApiError> {
    let w = state
        .store
        .workspace(chat.workspace_id)
        .await?
        .ok_or_else(workspace_not_found)?;
    let usage = state.storage.usage(w.workspace_id, w.quota_bytes)?;
    Ok(usage.quota_bytes.saturating_sub(usage.used_bytes))
}

/// Refuses a write of `incoming` bytes (replacing `replaced`) that would pass the quota.
async fn check_quota(
    state: &AppState,
    chat: &Chat,
    incoming: u64,
    replaced: u64,
) -> Result<(), ApiError> {
    let w = state
        .store
        .workspace(chat.workspace_id)
        .await?
        .ok_or_else(workspace_not_found)?;
    let usage = state.storage.usage(w.workspace_id, w.quota_bytes)?;
    if usage.used_bytes.saturating_sub(replaced) + incoming > usage.quota_bytes {
        state.metrics.storage_quota_refusals_total.inc();
        return Err(quota_exceeded());
    }
    Ok(())
}

fn size_of(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// `GET /api/v1/chats/{chat_id}/history` (text/markdown).
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/history", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "`history.md`", body = String, content_type = "text/markdown"),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn get_history(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
) -> Result<Response, ApiError> {
    let (_, dir) = find_chat(&state, chat_id).await?;
    let text = tokio::fs::read(dir.join(HISTORY_FILE))
        .await
        .map_err(StorageError::io("read", &dir))?;
    Ok((
        [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
        text,
    )
        .into_response())
}

/// `PUT /api/v1/chats/{chat_id}/history`: replaces it, all or nothing.
#[utoipa::path(put, path = "/api/v1/chats/{chat_id}/history", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    request_body(content = String, content_type = "text/markdown", description = "the whole new history"),
    responses(
        (status = 200, description = "replaced, all or nothing", body = HistoryWritten),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 413, description = "`workspace_quota_exceeded`: the write would pass the quota; nothing was written (or the body is over its limit)", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn put_history(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<HistoryWritten>, ApiError> {
    let (chat, dir) = find_chat(&state, chat_id).await?;
    let _one_writer = state.storage.history_lock().await;
    check_quota(
        &state,
        &chat,
        body.len() as u64,
        size_of(&dir.join(HISTORY_FILE)),
    )
    .await?;
    let who = caller(&state, &headers, peer);
    write_history(
        &state,
        chat_id,
        &dir,
        &body,
        &who,
        json!({"what": "history"}),
    )
    .await
}

/// Writes the chat's whole `history.md` (all or nothing) and audits it: `detail` plus the
/// size written.
async fn write_history(
    state: &AppState,
    chat_id: ChatId,
    dir: &std::path::Path,
    text: &[u8],
    who: &crate::dataplane::Caller,
    mut detail: serde_json::Value,
) -> Result<Json<HistoryWritten>, ApiError> {
    let size = files::write_all(dir, HISTORY_FILE, text).await?;
    detail["bytes"] = size.into();
    audit(state, who, Some(chat_id), EventAction::StorageWrite, detail).await;
    Ok(Json(HistoryWritten {
        chat_id: chat_id.to_string(),
        size_bytes: size,
    }))
}

/// `POST /api/v1/chats/{chat_id}/history:append`: appends the body, all or nothing (appends
/// are serialised, and each rewrites the file through a rename).
#[utoipa::path(post, path = "/api/v1/chats/{chat_id}/history:append", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    request_body(content = String, content_type = "text/markdown", description = "text to append"),
    responses(
        (status = 200, description = "appended, all or nothing", body = HistoryWritten),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 413, description = "`workspace_quota_exceeded`: the write would pass the quota; nothing was written (or the body is over its limit)", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn append_history(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<HistoryWritten>, ApiError> {
    let (chat, dir) = find_chat(&state, chat_id).await?;
    let _one_writer = state.storage.history_lock().await;
    let path = dir.join(HISTORY_FILE);
    let mut text = match tokio::fs::read(&path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StorageError::io("read", &path)(e).into()),
    };
    // The old copy stays until the rename: it counts while the new one is written.
    check_quota(&state, &chat, (text.len() + body.len()) as u64, 0).await?;
    text.extend_from_slice(&body);
    let who = caller(&state, &headers, peer);
    let detail = json!({"what": "history", "appended_bytes": body.len()});
    write_history(&state, chat_id, &dir, &text, &who, detail).await
}

/// `PUT /api/v1/chats/{chat_id}/files/{name}`: the raw body, its `Content-Type` kept; 201
/// when new, 200 when it replaced one of the same name.
#[utoipa::path(put, path = "/api/v1/chats/{chat_id}/files/{name}", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"), ("name" = String, Path, description = "the attachment's name: one path component, not `history.md`")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "the attachment's bytes; its `Content-Type` is kept"),
    responses(
        (status = 201, description = "written, all or nothing", body = FileView),
        (status = 200, description = "replaced one of the same name", body = FileView),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 413, description = "`workspace_quota_exceeded`: the write would pass the quota; nothing was written (or the body is over its limit)", body = ErrorBody),
        (status = 422, description = "invalid chat id or name", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn put_file(
    State(state): State<AppState>,
    Path((raw_chat, raw_name)): Path<(String, String)>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let name = attachment(&raw_name)?;
    let (chat, dir) = find_chat(&state, chat_id).await?;
    // The old copy stays until the rename: it counts while the new one is written. The body
    // streams to the file (never held in memory), bounded by the write limit and the room
    // the quota leaves; a declared length past either is refused before any byte is read.
    let limit = state.settings.data_plane.file_write_limit_bytes as u64;
    let room = room_left(&state, &chat).await?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut stream = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    if declared.is_some_and(|n| n > room) {
        state.metrics.storage_quota_refusals_total.inc();
        return refused(&mut stream, quota_exceeded()).await;
    }
    let written = tokio::time::timeout(
        WRITE_MAX_TIME,
        files::write_stream(&dir, name.as_str(), &mut stream, limit.min(room)),
    )
    .await;
    let size = match written {
        Err(_) => {
            let e = code(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "request body not received within {}s",
                    WRITE_MAX_TIME.as_secs()
                ),
            );
            return Ok(super::body::close(e.into_response()));
        }
        Ok(Ok(size)) => size,
        Ok(Err(StorageError::TooLarge(_))) if room < limit => {
            state.metrics.storage_quota_refusals_total.inc();
            return refused(&mut stream, quota_exceeded()).await;
        }
        Ok(Err(StorageError::TooLarge(_))) => {
            return refused(
                &mut stream,
                code(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body over data_plane.file_write_limit_bytes ({limit} bytes)"),
                ),
            )
            .await
        }
        Ok(Err(e)) => return Err(e.into()),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let replaced = state.store.file(chat_id, name.as_str()).await?.is_some();
    let file = ChatFile {
        file_id: uuid::Uuid::new_v4().to_string(),
        chat_id,
        name: name.to_string(),
        content_type,
        size_bytes: size,
        created_at: Utc::now(),
    };
    state.store.file_put(&file).await?;
    let who = caller(&state, &headers, peer);
    audit(
        &state,
        &who,
        Some(chat_id),
        EventAction::StorageWrite,
        json!({"what": "file", "name": file.name, "bytes": size}),
    )
    .await;
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(file_view(&file))).into_response())
}

/// `GET /api/v1/chats/{chat_id}/files/{name}`: the contents, with the type it was given.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/files/{name}", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"), ("name" = String, Path, description = "the attachment's name: one path component, not `history.md`")),
    responses(
        (status = 200, description = "the attachment's bytes, with the type it was written with", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found` or `chat_file_not_found`", body = ErrorBody),
        (status = 422, description = "invalid chat id or name", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn get_file(
    State(state): State<AppState>,
    Path((raw_chat, raw_name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let name = attachment(&raw_name)?;
    let (_, dir) = find_chat(&state, chat_id).await?;
    let file = state
        .store
        .file(chat_id, name.as_str())
        .await?
        .ok_or_else(|| code(StatusCode::NOT_FOUND, "chat_file_not_found"))?;
    let opened = tokio::fs::File::open(dir.join(name.as_str()))
        .await
        .map_err(StorageError::io("open", &dir))?;
    let length = opened
        .metadata()
        .await
        .map_err(StorageError::io("stat", &dir))?
        .len();
    // Large chunks, and the length up front: small ones cost a round of ACKs each.
    let stream = tokio_util::io::ReaderStream::with_capacity(opened, 256 * 1024);
    let content_type = file
        .content_type
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, HeaderValue::from(length)),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// `DELETE /api/v1/chats/{chat_id}/files/{name}`.
#[utoipa::path(delete, path = "/api/v1/chats/{chat_id}/files/{name}", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling"), ("name" = String, Path, description = "the attachment's name: one path component, not `history.md`")),
    responses(
        (status = 200, description = "removed", body = Deleted),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found` or `chat_file_not_found`", body = ErrorBody),
        (status = 422, description = "invalid chat id or name", body = ValidationErrorBody),
        (status = 503, description = "`storage_unavailable: …`: the workspace's file system could not be used", body = ErrorBody)))]
pub async fn delete_file(
    State(state): State<AppState>,
    Path((raw_chat, raw_name)): Path<(String, String)>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Json<Deleted>, ApiError> {
    let chat_id = input::path_chat_id(&raw_chat)?;
    let name = attachment(&raw_name)?;
    let (_, dir) = find_chat(&state, chat_id).await?;
    if state.store.file(chat_id, name.as_str()).await?.is_none() {
        return Err(code(StatusCode::NOT_FOUND, "chat_file_not_found"));
    }
    // The file first, then its row: a crash in between leaves a row without its file, which
    // the start-up reconcile drops (a file without a row would look like the agent's).
    files::remove(&dir, name.as_str())?;
    state.store.file_delete(chat_id, name.as_str()).await?;
    let who = caller(&state, &headers, peer);
    audit(
        &state,
        &who,
        Some(chat_id),
        EventAction::StorageDelete,
        json!({"what": "file", "name": name.as_str()}),
    )
    .await;
    Ok(Json(Deleted {
        chat_id: chat_id.to_string(),
        name: Some(name.to_string()),
        result: "deleted".into(),
    }))
}

/// `GET /api/v1/chats/{chat_id}/files`: attachments with their sizes.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/files", tag = "storage",
    params(("chat_id" = String, Path, format = "uuid", description = "chat UUID, any spelling")),
    responses(
        (status = 200, description = "the chat's attachments, by name, with their sizes", body = FileList),
        (status = 401, description = "token missing or wrong", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 422, description = "invalid input", body = ValidationErrorBody)))]
pub async fn list_files(
    State(state): State<AppState>,
    ChatPath(chat_id): ChatPath,
) -> Result<Json<FileList>, ApiError> {
    find_chat(&state, chat_id).await?;
    let found = state.store.files(chat_id).await?;
    let items = found.iter().map(file_view).collect();
    Ok(Json(FileList { items }))
}

/// A new session of a workspace's chat mounts that chat's directory, whose file system holds
/// the quota; other chats (the old clients') keep theirs under `sandbox.chats_root`.
pub async fn place_in_workspace(
    state: &AppState,
    new: &mut crate::store::NewSession,
) -> Result<(), ApiError> {
    let Some(chat) = state.store.chat(new.chat_id).await? else {
        return Ok(());
    };
    let w = state
        .store
        .workspace(chat.workspace_id)
        .await?
        .ok_or_else(workspace_not_found)?;
    state
        .storage
        .ensure_workspace(w.workspace_id, w.quota_bytes)
        .await?;
    let dir = state.storage.chat_dir(chat.workspace_id, chat.chat_id);
    let mut spec = crate::domain::spec::ContainerSpec::from_json(&new.spec_json)
        .map_err(|e| code(StatusCode::INTERNAL_SERVER_ERROR, &format!("spec: {e}")))?;
    for m in &mut spec.mounts {
        if m.kind == crate::domain::spec::MountKind::Chat {
            m.source = dir.display().to_string();
        }
    }
    new.spec_json = spec.to_json();
    new.spec_hash = spec.hash();
    Ok(())
}
