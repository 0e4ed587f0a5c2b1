//! The error envelope every native endpoint answers with:
//! `{"error": {"code": "...", "message": "..."}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine-readable code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `not_found`, `sandbox_paused`.
    pub code: String,
    /// What happened and what to do about it.
    pub message: String,
}

/// Every error code of the native API, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a value is invalid (400).
    InvalidRequest,
    /// No API key, or an unknown or revoked one (401).
    Unauthorized,
    /// The key lacks the scope this call needs (403).
    Forbidden,
    /// No such sandbox, process, key or template (for this key's owner) (404).
    NotFound,
    /// No such route (404).
    NoRoute,
    /// The method is not allowed on this route (405).
    MethodNotAllowed,
    /// The sandbox is paused; resume it first (409).
    SandboxPaused,
    /// The request conflicts with the resource's state (409).
    Conflict,
    /// The sandbox has stopped or failed (410).
    SandboxStopped,
    /// The body is larger than the daemon accepts (413).
    PayloadTooLarge,
    /// The body is not JSON (415).
    UnsupportedMediaType,
    /// The daemon could not do it; a bug or a host problem (500).
    Internal,
    /// The sandbox's agent cannot be reached (502).
    AgentUnreachable,
    /// An image registry failed or refused (502).
    RegistryFailed,
    /// The daemon is shutting down or lacks a backend (503).
    Unavailable,
    /// Waiting timed out (504).
    Timeout,
    /// The data directory's disk is full (507).
    InsufficientStorage,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::NoRoute => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::SandboxPaused | ErrorCode::Conflict => 409,
            ErrorCode::SandboxStopped => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::Internal => 500,
            ErrorCode::AgentUnreachable | ErrorCode::RegistryFailed => 502,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::InsufficientStorage => 507,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::SandboxPaused => "sandbox_paused",
            ErrorCode::Conflict => "conflict",
            ErrorCode::SandboxStopped => "sandbox_stopped",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Internal => "internal",
            ErrorCode::AgentUnreachable => "agent_unreachable",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::RegistryFailed => "registry_failed",
        }
    }

    /// Every code, for metrics and documentation.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NoRoute,
        ErrorCode::MethodNotAllowed,
        ErrorCode::SandboxPaused,
        ErrorCode::Conflict,
        ErrorCode::SandboxStopped,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Internal,
        ErrorCode::AgentUnreachable,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::InsufficientStorage,
        ErrorCode::RegistryFailed,
    ];
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code.as_str().into(),
                message: message.into(),
            },
        }
    }
}
