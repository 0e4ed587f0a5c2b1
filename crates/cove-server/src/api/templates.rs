//! Templates: list, inspect, import or pull, remove; and snapshots of
//! sandboxes as new templates. The work is the template store's (see
//! `cove-template`); these handlers check scopes and call the manager.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use cove_api::{
    CreateTemplateRequest, ErrorBody, Scope, SnapshotRequest, TemplateInfo, TemplateList,
};

use super::AppState;
use super::extract::{ApiJson, Auth};
use crate::error::ApiError;

/// List templates.
#[utoipa::path(
    get, path = "/v1/templates", tag = "templates",
    responses((status = 200, description = "Templates", body = TemplateList)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<TemplateList>, ApiError> {
    auth.require(Scope::SandboxesRead)?;
    let manager = state.manager.clone();
    let templates = tokio::task::spawn_blocking(move || manager.template_infos())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(TemplateList { templates }))
}

/// Describe one template.
#[utoipa::path(
    get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, description = "The template", body = TemplateInfo),
        (status = 404, description = "No such template", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<TemplateInfo>, ApiError> {
    auth.require(Scope::SandboxesRead)?;
    Ok(Json(state.manager.template(&name).await?))
}

/// Import a template from a path on the daemon's host (an OCI image
/// layout, a `docker save` archive, a root filesystem directory or
/// tarball), or pull one from a registry. Answers when it is ready.
/// Needs an admin key: the daemon reads the path with its own rights.
#[utoipa::path(
    post, path = "/v1/templates", tag = "templates",
    request_body = CreateTemplateRequest,
    responses(
        (status = 201, description = "Imported", body = TemplateInfo),
        (status = 400, description = "Bad name, or a corrupt, truncated or unsafe image", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "A template of that name exists", body = ErrorBody),
        (status = 502, description = "The registry failed", body = ErrorBody),
        (status = 504, description = "The registry did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<CreateTemplateRequest>,
) -> Result<(StatusCode, Json<TemplateInfo>), ApiError> {
    auth.require(Scope::Admin)?;
    let info = state.manager.create_template(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Remove a template, and the layers no other template uses. Refused
/// while a running sandbox uses it.
#[utoipa::path(
    delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "The built-in host template", body = ErrorBody),
        (status = 404, description = "No such template", body = ErrorBody),
        (status = 409, description = "In use by a running sandbox", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Scope::Admin)?;
    state.manager.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Make a new template of a sandbox's filesystem: its writable layer
/// stacked on its template's layers. The sandbox keeps running (a
/// namespace sandbox is frozen while its writable layer is copied; a
/// microVM's agent sends its layer while it runs). Memory and processes
/// are not kept.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/snapshot", tag = "templates",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = SnapshotRequest,
    responses(
        (status = 201, description = "The new template", body = TemplateInfo),
        (status = 400, description = "Bad name, or a backend that cannot snapshot", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "A template of that name exists, the sandbox's template predates layered storage (rebuild it), or the sandbox is a paused microVM", body = ErrorBody),
        (status = 410, description = "The sandbox has ended", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn snapshot(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SnapshotRequest>,
) -> Result<(StatusCode, Json<TemplateInfo>), ApiError> {
    let who = auth.require(Scope::SandboxesWrite)?;
    let info = state.manager.snapshot(who, &id, &req.name).await?;
    Ok((StatusCode::CREATED, Json(info)))
}
