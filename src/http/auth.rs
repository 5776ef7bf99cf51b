//! Token check: when `security.api_token` is set, every route except health needs it in
//! `security.token_header`. Compared in constant time; never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Clone)]
pub struct TokenGuard {
    pub header: HeaderName,
    pub token: Arc<Vec<u8>>,
}

pub async fn require_token(
    State(guard): State<TokenGuard>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/api/v1/health" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(&guard.header)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if bool::from(presented.ct_eq(guard.token.as_slice())) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}
