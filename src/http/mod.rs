//! The thin HTTP API (axum). It only writes desired state and reads status; it never calls
//! Docker, so it keeps working while the engine is down. Calls that promise an outcome (the
//! old `create` and `delete`) wait on the store's change feed for the controller's result.

mod auth;
mod body;
mod compat;
mod dataplane;
mod error;
mod filewatch;
mod input;
pub mod openapi;
mod processes;
mod sandboxes;
mod storage;
mod terminal;
mod views;

mod watch;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderName;
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::context::Context;
use crate::dataplane::watch::WatchFeed;
use crate::dataplane::DataPlane;

pub use error::ApiError;

/// What handlers share: the process's [`Context`] (reached through it: `state.store`,
/// `state.settings`, ...) and the HTTP side's own parts. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Arc<Context>,
    /// Exec and files on running sandboxes (talks to the engine; only data-plane routes use it).
    pub data_plane: DataPlane,
    /// The change stream behind `?watch=true`.
    pub watch: WatchFeed,
}

impl std::ops::Deref for AppState {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.ctx
    }
}

pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let body_limit = body::Limits {
        default: state.settings.http.body_limit_bytes,
        file_write: state.settings.data_plane.file_write_limit_bytes,
    };
    let token = state.settings.security.api_token.clone();
    let state_token_required = state.settings.security.token_required;
    let header = HeaderName::from_bytes(state.settings.security.token_header.as_bytes())
        .unwrap_or(HeaderName::from_static("x-api-token"));

    let mut app = Router::new()
        .route("/api/v1/health", get(compat::health))
        .route("/api/v1/ready", get(compat::ready))
        .route("/metrics", get(compat::metrics))
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/api/v1/create", post(compat::create))
        .route(
            "/api/v1/sandboxes/{chat_id}",
            get(sandboxes::get_one)
                .put(sandboxes::apply)
                .delete(compat::delete),
        )
        .route("/api/v1/sandboxes/{chat_id}/renew", post(sandboxes::renew))
        .route("/api/v1/sandboxes/{chat_id}/pause", post(sandboxes::pause))
        .route(
            "/api/v1/sandboxes/{chat_id}/hibernate",
            post(sandboxes::hibernate),
        )
        .route(
            "/api/v1/sandboxes/{chat_id}/resume",
            post(sandboxes::resume),
        )
        .route("/api/v1/sandboxes/{chat_id}/events", get(sandboxes::events))
        .route("/api/v1/sandboxes/{chat_id}/exec", post(dataplane::exec))
        .route(
            "/api/v1/sandboxes/{chat_id}/files",
            get(dataplane::read_file).put(dataplane::write_file),
        )
        .route("/api/v1/sandboxes/{chat_id}/dir", get(dataplane::list_dir))
        .route(
            "/api/v1/sandboxes/{chat_id}/files/watch",
            get(filewatch::watch),
        )
        .route(
            "/api/v1/sandboxes/{chat_id}/processes",
            post(processes::start).get(processes::list),
        )
        .route(
            "/api/v1/sandboxes/{chat_id}/processes/{process_id}",
            get(processes::get).delete(processes::kill),
        )
        .route(
            "/api/v1/sandboxes/{chat_id}/processes/{process_id}/output",
            get(processes::output),
        )
        .route(
            "/api/v1/sandboxes/{chat_id}/processes/{process_id}/stdin",
            post(processes::stdin),
        )
        .route(
            "/api/v1/sandboxes/{chat_id}/processes/{process_id}/signal",
            post(processes::signal),
        )
        .route("/api/v1/sandboxes/{chat_id}/pty", get(terminal::pty))
        .route("/api/v1/sandboxes", get(sandboxes::list))
        .route(
            "/api/v1/workspaces",
            post(storage::create_workspace).get(storage::list_workspaces),
        )
        .route(
            "/api/v1/workspaces/{workspace_id}",
            get(storage::get_workspace).patch(storage::set_quota),
        )
        .route(
            "/api/v1/workspaces/{workspace_id}/chats",
            post(storage::create_chat).get(storage::list_chats),
        )
        .route(
            "/api/v1/chats/{chat_id}",
            get(storage::get_chat).delete(storage::delete_chat),
        )
        .route(
            "/api/v1/chats/{chat_id}/history",
            get(storage::get_history).put(storage::put_history),
        )
        .route(
            "/api/v1/chats/{chat_id}/history:append",
            post(storage::append_history),
        )
        .route("/api/v1/chats/{chat_id}/files", get(storage::list_files))
        .route(
            "/api/v1/chats/{chat_id}/files/{name}",
            get(storage::get_file)
                .put(storage::put_file)
                .delete(storage::delete_file),
        )
        // The old server's words for an unknown route and a wrong method.
        .fallback(|| async {
            ApiError::BadRequest {
                status: axum::http::StatusCode::NOT_FOUND,
                detail: "Not Found".into(),
            }
        })
        .layer(axum::middleware::map_response(
            body::method_not_allowed_body,
        ))
        .layer(DefaultBodyLimit::max(
            body_limit.default.max(body_limit.file_write),
        ))
        .with_state(state);
    if let Some(token) = token {
        let guard = auth::TokenGuard {
            header,
            token: Arc::new(token.into_bytes()),
            required: state_token_required,
        };
        app = app.layer(axum::middleware::from_fn_with_state(
            guard,
            auth::require_token,
        ));
    }
    // Outermost but tracing: an oversized body is drained and answered 413 before anything else.
    app.layer(axum::middleware::from_fn_with_state(
        body_limit,
        body::read_whole,
    ))
    .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}
