//! HopX (seed `001_…`): the VM agent's `POST /commands/run`, served per
//! sandbox under `/hopx/{sandbox_id}`.
//!
//! A command runs through `/bin/sh -c` in `working_dir` (default
//! `/workspace`). 200 with the result when it exits 0; 500 with the same
//! body when it fails; 408 on timeout; 400 without a command; 401 without a
//! key. Other errors are `{"error": message, "code": CODE}`.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cove_api::{DurationValue, ErrorCode, ExecRequest, Scope};
use serde_json::{Value, json};

use super::{Call, run, seconds, text};
use crate::api::AppState;
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/hopx/{id}/commands/run", post(commands_run))
}

pub(super) fn render(err: ApiError) -> Response {
    let (status, code) = match err.code {
        ErrorCode::InvalidRequest => (StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ErrorCode::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "FORBIDDEN"),
        ErrorCode::NotFound | ErrorCode::NoRoute => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        ErrorCode::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
        ErrorCode::SandboxPaused | ErrorCode::Conflict => (StatusCode::CONFLICT, "CONFLICT"),
        ErrorCode::SandboxStopped => (StatusCode::GONE, "SANDBOX_STOPPED"),
        ErrorCode::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
        ErrorCode::UnsupportedMediaType => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE")
        }
        ErrorCode::AgentUnreachable => (StatusCode::BAD_GATEWAY, "AGENT_UNREACHABLE"),
        ErrorCode::Timeout => (StatusCode::REQUEST_TIMEOUT, "TIMEOUT"),
        ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
    };
    let mut response = (
        status,
        axum::Json(json!({ "error": err.message, "code": code })),
    )
        .into_response();
    response.extensions_mut().insert(err.code);
    response
}

async fn commands_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        let call = Call::accept(&state, req).await?;
        let who = call.require(Scope::Exec)?;
        let body = call.object()?;
        let command = match body.get("command") {
            Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    "missing command: send {\"command\": \"ls -la\"}",
                ));
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "command must be a string run by /bin/sh -c",
                ));
            }
        };
        let timeout = seconds(body.get("timeout"), 30.0, "timeout")?;
        let cwd = match body.get("working_dir") {
            None | Some(Value::Null) => "/workspace".to_string(),
            Some(Value::String(d)) => d.clone(),
            Some(_) => return Err(ApiError::invalid("working_dir must be a string")),
        };
        let env: BTreeMap<String, String> = match body.get("env") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Ok((k.clone(), other.to_string())),
                })
                .collect::<Result<_, ApiError>>()?,
            Some(_) => return Err(ApiError::invalid("env must be an object of strings")),
        };
        let req = ExecRequest {
            cmd: Some(command),
            cwd: Some(cwd),
            env,
            timeout: (!timeout.is_zero()).then_some(DurationValue(timeout)),
            ..ExecRequest::default()
        };
        let out = run(&state, who, &id, req).await?;
        let body = json!({
            "stdout": text(&out.stdout),
            "stderr": text(&out.stderr),
            "exit_code": out.status.shell_code(),
        });
        let status = if out.status.timed_out {
            let mut timed = body;
            timed["error"] =
                format!("command timed out after {} seconds", timeout.as_secs()).into();
            timed["code"] = "TIMEOUT".into();
            return Ok((StatusCode::REQUEST_TIMEOUT, axum::Json(timed)).into_response());
        } else if out.status.shell_code() == 0 {
            StatusCode::OK
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Ok((status, axum::Json(body)).into_response())
    }
    .await;
    result.unwrap_or_else(render)
}
