//! API keys.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a key may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub enum Scope {
    /// List and inspect sandboxes.
    #[serde(rename = "sandboxes:read")]
    SandboxesRead,
    /// Create, delete, pause, resume sandboxes; change their timeout.
    #[serde(rename = "sandboxes:write")]
    SandboxesWrite,
    /// Run processes and move files in sandboxes.
    #[serde(rename = "exec")]
    Exec,
    /// Everything, for every owner's sandboxes, and managing keys.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SandboxesRead => "sandboxes:read",
            Scope::SandboxesWrite => "sandboxes:write",
            Scope::Exec => "exec",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        [
            Scope::SandboxesRead,
            Scope::SandboxesWrite,
            Scope::Exec,
            Scope::Admin,
        ]
        .into_iter()
        .find(|scope| scope.as_str() == s.trim())
    }
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    /// Whose sandboxes the key sees (default: the name).
    #[serde(default)]
    pub owner: Option<String>,
    pub scopes: Vec<Scope>,
}

/// A key as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub scopes: Vec<Scope>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked: bool,
}

/// A new key: `key` is shown this once and never again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyCreated {
    #[serde(flatten)]
    pub info: KeyInfo,
    pub key: String,
}

/// `GET /v1/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyInfo>,
}
