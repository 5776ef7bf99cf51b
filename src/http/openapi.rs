//! The HTTP contract as OpenAPI 3, generated from the handlers' annotations (utoipa) and served
//! at `/api/v1/openapi.json`. `docs/openapi.json` is a checked-in copy; a test fails when they
//! differ (`sandboxd openapi > docs/openapi.json` refreshes it).

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{compat, dataplane, filewatch, processes, sandboxes, storage, terminal, views};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sandboxd",
        description = "Keeps per-chat agent sandboxes (Docker containers) in their declared state. \
            Errors are `{\"detail\": ...}`. With `security.api_token` set, every route but \
            `/api/v1/health` needs the token in `security.token_header` (default `X-API-Token`)."
    ),
    paths(
        compat::health,
        compat::ready,
        compat::metrics,
        compat::create,
        compat::delete,
        sandboxes::apply,
        sandboxes::get_one,
        sandboxes::list,
        sandboxes::renew,
        sandboxes::pause,
        sandboxes::hibernate,
        sandboxes::resume,
        sandboxes::events,
        dataplane::exec,
        dataplane::write_file,
        dataplane::read_file,
        dataplane::list_dir,
        filewatch::watch,
        processes::start,
        processes::list,
        processes::get,
        processes::kill,
        processes::output,
        processes::stdin,
        processes::signal,
        terminal::pty,
        storage::create_workspace,
        storage::list_workspaces,
        storage::get_workspace,
        storage::set_quota,
        storage::create_chat,
        storage::list_chats,
        storage::get_chat,
        storage::delete_chat,
        storage::get_history,
        storage::put_history,
        storage::append_history,
        storage::put_file,
        storage::get_file,
        storage::delete_file,
        storage::list_files,
    ),
    components(schemas(views::ErrorBody, crate::dataplane::watch::Change)),
    // Every route needs the token when one is configured; health says `security(())`.
    security(("api_token" = [])),
    modifiers(&TokenScheme),
    tags(
        (name = "compat", description = "The old service's contract, unchanged for its clients"),
        (name = "sandboxes", description = "Declarative desired state"),
        (name = "data plane", description = "Exec and files on a running sandbox (these talk to the engine)"),
        (name = "processes", description = "Background processes: they outlive the request and the client's connection; output by byte offset (docs/data-plane.md)"),
        (name = "operations", description = "Readiness and metrics"),
        (name = "storage", description = "Chat storage: workspaces, chats, history.md and attachments (docs/storage.md)"),
    )
)]
pub struct ApiDoc;

struct TokenScheme;

impl Modify for TokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Token"))),
        );
    }
}

/// The document as pretty JSON (what `sandboxd openapi` prints).
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
