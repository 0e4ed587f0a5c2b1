//! Backends and what only some of them have: `GET /v1/backends` (which
//! backends can create sandboxes here, and why not) and a microVM's
//! console log.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use cove_api::{BackendList, ErrorBody, Scope};

use super::AppState;
use super::extract::Auth;
use crate::backend::microvm::CONSOLE_MAX;
use crate::error::ApiError;

/// List the backends: `namespace` always, `microvm` with whether this host
/// can run it and, if not, what to install.
#[utoipa::path(
    get, path = "/v1/backends", tag = "system",
    responses(
        (status = 200, description = "Backends", body = BackendList),
        (status = 401, description = "No or bad key", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<BackendList>, ApiError> {
    auth.require(Scope::SandboxesRead)?;
    Ok(Json(BackendList {
        backends: state.manager.backends(),
    }))
}

/// A microVM's serial console (kernel messages, the guest init's errors),
/// the last MiB of it. Kept for an hour after a VM dies on its own.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/console", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, description = "The console log", content_type = "text/plain", body = String),
        (status = 404, description = "No such sandbox, or it has no console (namespace backend)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn console(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let who = auth.require(Scope::SandboxesRead)?;
    let log = state.manager.console(who, &id, CONSOLE_MAX).await?;
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], log))
}
