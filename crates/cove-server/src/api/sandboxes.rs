//! `/v1/sandboxes`: lifecycle and exec.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cove_api::sandbox::{ListQuery, WaitQuery};
use cove_api::{
    CreateSandboxRequest, ErrorBody, ExecRequest, ExecResult, Sandbox, SandboxList, SandboxState,
    Scope, SetTimeoutRequest,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{ApiJson, ApiQuery, Auth};
use crate::error::ApiError;
use crate::exec;
use crate::manager::ListFilter;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// Return only once the sandbox runs (default true); with false, answer
    /// at once with state `starting`.
    wait: Option<bool>,
}

/// Create a sandbox.
#[utoipa::path(
    post, path = "/v1/sandboxes", tag = "sandboxes",
    params(CreateQuery),
    request_body = CreateSandboxRequest,
    responses(
        (status = 201, description = "Created", body = Sandbox),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "No or bad key", body = ErrorBody),
        (status = 403, description = "Missing scope", body = ErrorBody),
        (status = 500, description = "The sandbox failed to start", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(query): ApiQuery<CreateQuery>,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> Result<Response, ApiError> {
    let who = auth.require(Scope::SandboxesWrite)?;
    let sandbox = state
        .manager
        .create(who, req, query.wait.unwrap_or(true))
        .await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

/// List sandboxes: live ones and those that ended in the last hour.
#[utoipa::path(
    get, path = "/v1/sandboxes", tag = "sandboxes",
    params(ListQuery),
    responses(
        (status = 200, description = "Sandboxes, oldest first", body = SandboxList),
        (status = 400, description = "Invalid filter", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<SandboxList>, ApiError> {
    let who = auth.require(Scope::SandboxesRead)?;
    let state_filter = match query.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(SandboxState::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "unknown state {s:?}; states are starting, running, paused, stopping, stopped, failed"
            ))
        })?),
    };
    let mut labels = Vec::new();
    for pair in query
        .label
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ApiError::invalid(format!("label filter {pair:?} must be key=value")))?;
        labels.push((k.to_string(), v.to_string()));
    }
    let after = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            let (t, id) = c
                .split_once(':')
                .ok_or_else(|| ApiError::invalid("malformed cursor"))?;
            Some((
                t.parse()
                    .map_err(|_| ApiError::invalid("malformed cursor"))?,
                id.to_string(),
            ))
        }
    };
    let limit = query.limit.unwrap_or(100) as usize;
    if limit == 0 || limit > 1000 {
        return Err(ApiError::invalid(format!(
            "limit {limit} must be between 1 and 1000"
        )));
    }
    let filter = ListFilter {
        state: state_filter,
        labels,
        limit,
        after,
        live_only: false,
    };
    Ok(Json(state.manager.list(who, filter).await?))
}

/// Describe a sandbox.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, description = "The sandbox", body = Sandbox),
        (status = 404, description = "No such sandbox for this key", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = auth.require(Scope::SandboxesRead)?;
    Ok(Json(state.manager.get(who, &id).await?))
}

/// Destroy a sandbox and everything in it.
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 204, description = "Destroyed (or already ended)"),
        (status = 404, description = "No such sandbox for this key", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = auth.require(Scope::SandboxesWrite)?;
    state.manager.delete(who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Freeze every process of a sandbox (memory is kept).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, description = "Paused", body = Sandbox),
        (status = 409, description = "Not running", body = ErrorBody),
        (status = 410, description = "Ended", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn pause(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = auth.require(Scope::SandboxesWrite)?;
    Ok(Json(state.manager.pause(who, &id).await?))
}

/// Thaw a paused sandbox.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses(
        (status = 200, description = "Running again", body = Sandbox),
        (status = 410, description = "Ended", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn resume(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = auth.require(Scope::SandboxesWrite)?;
    Ok(Json(state.manager.resume(who, &id).await?))
}

/// Set the sandbox's time to live, counted from now (0 = no limit).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = SetTimeoutRequest,
    responses(
        (status = 200, description = "The new expiry is in `expires_at`", body = Sandbox),
        (status = 410, description = "Ended", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn set_timeout(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SetTimeoutRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = auth.require(Scope::SandboxesWrite)?;
    Ok(Json(
        state.manager.set_timeout(who, &id, req.timeout.0).await?,
    ))
}

/// Wait until a sandbox reaches a state (or ends).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/wait", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID"), WaitQuery),
    responses(
        (status = 200, description = "The sandbox, in the state asked for or ended", body = Sandbox),
        (status = 504, description = "The state was not reached in time", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn wait(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = auth.require(Scope::SandboxesRead)?;
    let target = match query.state.as_deref() {
        None | Some("") => SandboxState::Running,
        Some(s) => SandboxState::parse(s)
            .ok_or_else(|| ApiError::invalid(format!("unknown state {s:?}")))?,
    };
    let timeout = match query.timeout.as_deref() {
        None | Some("") => Duration::from_secs(30),
        Some(t) => cove_api::units::parse_duration(t).map_err(ApiError::invalid)?,
    };
    if timeout > Duration::from_secs(300) {
        return Err(ApiError::invalid("timeout may be at most 5m"));
    }
    Ok(Json(state.manager.wait(who, &id, target, timeout).await?))
}

/// Run a command and return its result.
///
/// A non-zero exit is a result, not an error. If the client disconnects
/// before the command ends, the command and everything it started are
/// killed.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/exec", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "The command ran (whatever its exit code)", body = ExecResult),
        (status = 202, description = "Started in the background (`background`: true)", body = cove_api::Started),
        (status = 400, description = "Invalid request, missing working directory or unknown user", body = ErrorBody),
        (status = 409, description = "The sandbox is paused", body = ErrorBody),
        (status = 410, description = "The sandbox has ended", body = ErrorBody),
        (status = 502, description = "The sandbox's agent cannot be reached", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn exec(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response, ApiError> {
    let who = auth.require(Scope::Exec)?;
    if req.background {
        return super::processes::start_background(&state, who, &id, req).await;
    }
    if req.stdin_open {
        return Err(ApiError::invalid(
            "`stdin_open` needs `background`: true (a synchronous exec reads all its stdin up front)",
        ));
    }
    let (spec, stdin) = exec::process_spec(&req)?;
    let (entry, agent) = state.manager.agent(who, &id).await?;
    let metrics = state.manager.metrics().clone();
    metrics.execs.inc();
    let started = Instant::now();
    let output = match exec::run(&agent, spec, stdin).await {
        Ok(output) => output,
        Err(err) => return Err(state.manager.agent_error(&entry, err).await),
    };
    metrics
        .exec_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(Json(exec::result(&output, req.encoding)).into_response())
}
