//! Health, metrics, the OpenAPI document, and templates.

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use cove_api::{Scope, TemplateList};

use super::AppState;
use super::extract::Auth;
use crate::error::ApiError;

/// Liveness: 200 while the daemon serves requests.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, description = "ok")))]
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// Prometheus metrics (names prefixed `cove_`).
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.manager.metrics().render(&state.manager.counts());
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

pub async fn openapi() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], super::openapi_json())
}

/// List templates.
#[utoipa::path(
    get, path = "/v1/templates", tag = "system",
    responses((status = 200, description = "Templates", body = TemplateList)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn templates(
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
