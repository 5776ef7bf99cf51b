//! One API error type; every error leaves as `{"detail": "..."}` with the right status.
//! Internal errors are logged with their cause and answered with a generic detail.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::domain::request::InvalidInput;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
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
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let detail = match &r {
            JsonRejection::JsonDataError(e) => format!("invalid request body: {}", e.body_text()),
            JsonRejection::JsonSyntaxError(e) => format!("malformed JSON: {}", e.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                "expected `Content-Type: application/json`".to_string()
            }
            other => format!("unreadable request body: {}", other.body_text()),
        };
        // FastAPI answered every body problem with 422; keep that for data and syntax errors.
        let status = match status {
            StatusCode::BAD_REQUEST => StatusCode::UNPROCESSABLE_ENTITY,
            s => s,
        };
        ApiError::BadRequest { status, detail }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::Invalid(format!("invalid path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::Invalid(format!("invalid query: {}", r.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
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
