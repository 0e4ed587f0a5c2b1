//! Backends: where sandboxes run (namespaces on the host kernel, or
//! microVMs behind their own kernel).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One backend of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendInfo {
    /// What `"backend"` in a create request names: `namespace`, `microvm`.
    pub name: String,
    /// Whether it can create sandboxes on this host.
    pub available: bool,
    /// Why it cannot, naming what to install.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Used when a create request names no backend.
    pub default: bool,
    /// The template used when a create request names none.
    pub default_template: String,
}

/// `GET /v1/backends`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendList {
    pub backends: Vec<BackendInfo>,
}
