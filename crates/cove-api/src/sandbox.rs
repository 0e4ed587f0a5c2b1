//! Sandboxes: creating, listing, and their lifecycle.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::network::{NetworkInfo, NetworkRequest};
use crate::values::{DurationValue, SizeValue};

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Template to start from (default `host`).
    #[serde(default)]
    pub template: Option<String>,
    /// Environment variables of every process in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory of processes (default: the template's, else `/workspace`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Default user of processes: a name, a uid, or uid:gid (default root).
    #[serde(default)]
    pub user: Option<String>,
    /// Memory limit: bytes, or a string like "512M".
    #[serde(default)]
    pub memory: Option<SizeValue>,
    /// CPU limit in CPUs, e.g. 1.5.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    #[serde(default)]
    pub pids: Option<u64>,
    /// Size cap of the writable layer (default 1G).
    #[serde(default)]
    pub disk: Option<SizeValue>,
    /// Time to live: the daemon destroys the sandbox this long after
    /// creation unless extended. Seconds or a string like "10m"; 0 = none.
    #[serde(default)]
    pub timeout: Option<DurationValue>,
    /// Labels to filter by (`GET /v1/sandboxes?label=k=v`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-form metadata kept with the sandbox.
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// `namespace` (default) or `microvm`.
    #[serde(default)]
    pub backend: Option<String>,
    /// What the TTL does when it expires: `kill` (default) or `pause`.
    #[serde(default)]
    pub on_timeout: Option<String>,
    /// Resume a paused sandbox when a command arrives, instead of a 409.
    #[serde(default)]
    pub auto_resume: bool,
    /// The sandbox's network: `"none"` (default, loopback only),
    /// `"egress"`, or an object with `mode`, `allow_out`, `deny_out` and
    /// `exposed_ports` (see docs/network.md).
    #[serde(default)]
    #[schema(value_type = Option<NetworkRequest>)]
    pub network: NetworkRequest,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether the sandbox has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, SandboxState::Stopped | SandboxState::Failed)
    }

    pub const ALL: [SandboxState; 6] = [
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Failed,
    ];
}

/// Resource limits in effect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Bytes, or null when unlimited.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Bytes of the writable layer.
    pub disk: u64,
}

/// A sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    /// `sbx-` and 8 lowercase letters or digits.
    pub id: String,
    pub state: SandboxState,
    /// Why the sandbox failed or stopped, when it did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    pub template: String,
    pub backend: String,
    pub cwd: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// RFC 3339.
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<String>,
    /// When the daemon will destroy it (RFC 3339), or null for never.
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stopped_at: Option<String>,
    /// What the TTL does when it expires: `kill` or `pause`.
    #[serde(default = "default_on_timeout")]
    pub on_timeout: String,
    /// A paused sandbox resumes when a command arrives.
    #[serde(default)]
    pub auto_resume: bool,
    /// Its network mode, address, policy and published ports.
    #[serde(default)]
    pub network: NetworkInfo,
}

fn default_on_timeout() -> String {
    "kill".into()
}

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Query of `GET /v1/sandboxes`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only sandboxes in this state.
    pub state: Option<String>,
    /// Only sandboxes with this label, `key=value`; repeat to require several.
    #[serde(default)]
    #[param(value_type = Option<String>)]
    pub label: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<u32>,
    /// From `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `POST /v1/sandboxes/{id}/timeout`: the sandbox now lives this long from
/// now (0 = no limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeoutRequest {
    pub timeout: DurationValue,
}

/// Query of `GET /v1/sandboxes/{id}/wait`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The state to wait for (default `running`).
    pub state: Option<String>,
    /// How long to wait, e.g. `30s` (default 30s, at most 5m).
    pub timeout: Option<String>,
}

/// A template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    pub name: String,
    /// `host`, `rootfs` (a built or imported root filesystem, or a
    /// snapshot of one) or `image` (an OCI or docker image, or a snapshot
    /// of one).
    pub kind: String,
    pub source: String,
    pub created_at: Option<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Layer digests, topmost first (empty for `host`).
    #[serde(default)]
    pub layers: Vec<String>,
}

/// `POST /v1/templates`: import a template from a path on the daemon's
/// host (`source`), or pull one from a registry (`reference`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateRequest {
    /// Template name; for a pull, derived from the reference by default.
    #[serde(default)]
    pub name: Option<String>,
    /// A path on the daemon's host: an OCI image layout directory (or a
    /// tar of one), a `docker save` archive, or a root filesystem
    /// directory or tarball.
    #[serde(default)]
    pub source: Option<String>,
    /// An image reference to pull, e.g. `127.0.0.1:5000/team/app:v1`.
    #[serde(default)]
    pub reference: Option<String>,
    /// Talk plain HTTP to the registry.
    #[serde(default)]
    pub plain_http: bool,
    /// Accept a registry certificate that does not verify.
    #[serde(default)]
    pub insecure: bool,
    /// Registry credentials (basic); anonymous otherwise.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Per-request registry timeout in seconds (default 30).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Replace an existing template of that name.
    #[serde(default)]
    pub replace: bool,
}

/// `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Name of the new template.
    pub name: String,
}

/// `GET /v1/templates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateInfo>,
}
