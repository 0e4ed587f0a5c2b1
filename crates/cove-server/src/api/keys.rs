//! `/v1/keys`: API keys (admin only).

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use cove_api::{CreateKeyRequest, ErrorBody, ErrorCode, KeyCreated, KeyList, Scope};

use super::AppState;
use super::extract::{ApiJson, Auth};
use crate::auth::{key_info, make_key};
use crate::error::ApiError;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

/// Create an API key. The secret is in the answer and nowhere else.
#[utoipa::path(
    post, path = "/v1/keys", tag = "keys",
    request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "Created; `key` is shown this once", body = KeyCreated),
        (status = 400, description = "Invalid name, owner or scopes", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, Json<KeyCreated>), ApiError> {
    auth.require(Scope::Admin)?;
    let owner = req.owner.clone().unwrap_or_else(|| req.name.clone());
    if !valid_name(&req.name) || !valid_name(&owner) {
        return Err(ApiError::invalid(
            "name and owner must be 1-64 letters, digits, '-', '_', '.' or '@'",
        ));
    }
    if req.scopes.is_empty() {
        return Err(ApiError::invalid(
            "a key needs at least one scope: sandboxes:read, sandboxes:write, exec, admin",
        ));
    }
    let scopes: BTreeSet<Scope> = req.scopes.iter().copied().collect();
    let (row, secret) = make_key(&req.name, &owner, &scopes);
    let info = key_info(&row);
    state.manager.store().insert_key(row).await?;
    state.keys.load(&state.manager.store().keys().await?);
    Ok((StatusCode::CREATED, Json(KeyCreated { info, key: secret })))
}

/// List API keys (never their secrets).
#[utoipa::path(
    get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = "Every key, revoked ones included", body = KeyList)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(State(state): State<AppState>, auth: Auth) -> Result<Json<KeyList>, ApiError> {
    auth.require(Scope::Admin)?;
    let rows = state.manager.store().keys().await?;
    Ok(Json(KeyList {
        keys: rows.iter().map(key_info).collect(),
    }))
}

/// Revoke an API key; it stops working at once.
#[utoipa::path(
    delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key ID")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such active key", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Scope::Admin)?;
    if !state.manager.store().revoke_key(&id).await? {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no active key {id}"),
        ));
    }
    state.keys.load(&state.manager.store().keys().await?);
    Ok(StatusCode::NO_CONTENT)
}
