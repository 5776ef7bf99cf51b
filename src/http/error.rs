//! One API error type. Domain outcomes leave as `{"detail": "..."}` with the right status;
//! invalid input leaves as the old server's pydantic-style list (`input.rs`). Internal errors
//! are logged with their cause and answered with a generic detail.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::input::{self, FieldError, Source};
use crate::domain::ChatId;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input: 422 with every problem, each naming its field.
    #[error("invalid input: {}", summary(.0))]
    Validation(Vec<FieldError>),
    #[error("{detail}")]
    BadRequest { status: StatusCode, detail: String },
    #[error("unauthorized")]
    Unauthorized,
    #[error("sandbox_not_found")]
    NotFound,
    #[error("sandbox_conflict")]
    Conflict,
    /// A concurrent request changed the desired state before this one's outcome.
    #[error("{0}")]
    Superseded(&'static str),
    #[error("sandbox_start_failed: {0}")]
    StartFailed(String),
    #[error("{0}")]
    Timeout(String),
    #[error("internal error")]
    Internal(#[from] crate::store::StoreError),
    /// A data-plane call failed (`dataplane.rs` maps each kind to its status).
    #[error("{0}")]
    DataPlane(crate::dataplane::DataPlaneError),
}

fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| {
            let loc: Vec<String> = e
                .loc
                .iter()
                .map(|l| l.as_str().map_or_else(|| l.to_string(), str::to_string))
                .collect();
            format!("{}: {}", loc.join("."), e.msg)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Validation(errors) => {
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Json(json!({ "detail": errors })),
                )
                    .into_response()
            }
            ApiError::DataPlane(e) => return super::dataplane::respond(e),
            ApiError::BadRequest { status, .. } => *status,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict | ApiError::Superseded(_) => StatusCode::CONFLICT,
            ApiError::StartFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "detail": self.to_string() }))).into_response()
    }
}

/// `{chat_id}` in the path, any UUID spelling; a bad one is a 422 naming `["path","chat_id"]`.
pub struct ChatPath(pub ChatId);

impl<S: Send + Sync> FromRequestParts<S> for ChatPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => input::path_chat_id(&raw).map(ChatPath),
            Err(r) => Err(path_rejection(r)),
        }
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    input::reject(
        "path_invalid",
        Source::Path,
        "chat_id",
        format!("Unreadable path parameter: {}", r.body_text()),
        serde_json::Value::Null,
    )
}

impl From<crate::resume::ResumeError> for ApiError {
    fn from(e: crate::resume::ResumeError) -> Self {
        use crate::resume::ResumeError;
        match e {
            ResumeError::Store(e) => ApiError::Internal(e),
            // The old clients' 503 for a sandbox that cannot be given to them now.
            ResumeError::Failed(why) => ApiError::StartFailed(format!("resume failed: {why}")),
            e @ ResumeError::Timeout(_) => ApiError::Timeout(e.to_string()),
        }
    }
}
