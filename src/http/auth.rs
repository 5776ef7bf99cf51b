//! Token check: when `security.api_token` is set, every route except health needs it in
//! `security.token_header`. Compared in constant time; never logged. With
//! `security.token_required: false` a request *without* the header passes (a migration aid for
//! old clients that never sent it); a wrong token is refused either way.
//!
//! One exception: a WebSocket upgrade of the terminal route without the header passes with a
//! [`TokenPending`] extension, and the terminal's first message must carry the token
//! (browsers cannot set headers on a WebSocket). Nothing is opened before it comes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The token a terminal's first message must carry (the header did not).
#[derive(Clone)]
pub struct TokenPending(pub Arc<Vec<u8>>);

/// The terminal route, the only one whose token may come in its first message.
const TERMINAL_ROUTE: &str = "/api/v1/sandboxes/{chat_id}/pty";

/// Whether the request is a WebSocket upgrade (a GET) of the terminal route, as the router
/// matched it (a path that merely ends in `/pty`, an attachment named `pty`, is not).
fn terminal_upgrade(request: &Request) -> bool {
    request.method() == axum::http::Method::GET
        && request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .is_some_and(|m| m.as_str() == TERMINAL_ROUTE)
        && request
            .headers()
            .get(axum::http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

#[derive(Clone)]
pub struct TokenGuard {
    pub header: HeaderName,
    pub token: Arc<Vec<u8>>,
    /// `security.token_required`: when false, a request without the header passes.
    pub required: bool,
}

pub async fn require_token(
    State(guard): State<TokenGuard>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/api/v1/health" {
        return next.run(request).await;
    }
    let Some(presented) = request.headers().get(&guard.header) else {
        if guard.required && terminal_upgrade(&request) {
            request
                .extensions_mut()
                .insert(TokenPending(guard.token.clone()));
            return next.run(request).await;
        }
        return if guard.required {
            ApiError::Unauthorized.into_response()
        } else {
            next.run(request).await
        };
    };
    if bool::from(presented.as_bytes().ct_eq(guard.token.as_slice())) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}
