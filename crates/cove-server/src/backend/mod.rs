//! Backends: where sandboxes physically live. Everything a backend must do
//! is in [`Backend`] and [`Instance`]; exec, streaming, PTYs and files go
//! through the agent connection an instance hands back, so they are written
//! once and work on every backend.

pub mod factory;
pub mod microvm;
pub mod namespace;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use cove_template::Template;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::engine::SandboxOptions;

/// A byte stream to a sandbox's agent.
pub trait AgentIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentIo for T {}
pub type AgentStream = Box<dyn AgentIo>;

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub template: Template,
    pub options: SandboxOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request cannot work on this host or backend (a 4xx).
    #[error("{0}")]
    Invalid(String),
    /// Creating or running the sandbox failed (a 5xx).
    #[error("{0}")]
    Failed(String),
    /// The agent cannot be reached.
    #[error("{0}")]
    Unreachable(String),
}

/// A kind of sandbox (namespaces, microVMs).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Create a sandbox and start its agent.
    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Instance>, BackendError>;
    /// Find a sandbox again after a daemon restart, from its record.
    async fn reattach(
        &self,
        id: &str,
        record: serde_json::Value,
    ) -> Result<Arc<dyn Instance>, BackendError>;
    /// Remove whatever a dead or half-created sandbox left on the host.
    async fn clean_up(&self, id: &str, record: Option<serde_json::Value>);
    /// IDs of sandboxes this backend has state for on the host (to find
    /// orphans the database does not know).
    fn known_ids(&self) -> Vec<String>;
    /// Whether its sandboxes can have egress ([`Instance::network_namespace`]).
    fn supports_network(&self) -> bool {
        false
    }
    /// Whether its sandboxes can publish ports on the host.
    fn supports_published_ports(&self) -> bool {
        self.supports_network()
    }
    /// For a backend whose sandboxes are guests behind a tap (microVMs):
    /// the tap's name in [`Instance::network_namespace`], which the
    /// network bridges to the sandbox's veth. `None`: the sandbox's own
    /// `eth0` takes the address.
    fn guest_link(&self) -> Option<&'static str> {
        None
    }
    /// Why this backend cannot create sandboxes on this host (what to
    /// install), or `None` when it can. An unavailable backend still
    /// reattaches and cleans up what an earlier run left.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// The template used when a request names none (`None`: the daemon's).
    fn default_template(&self) -> Option<&'static str> {
        None
    }
    /// The console log kept for an ended sandbox, if any.
    fn saved_console(&self, _id: &str) -> Option<PathBuf> {
        None
    }
}

/// One sandbox of a backend.
#[async_trait]
pub trait Instance: Send + Sync + 'static {
    /// What [`Backend::reattach`] needs, as JSON.
    fn record(&self) -> serde_json::Value;
    /// A new connection to the agent.
    async fn connect(&self) -> Result<AgentStream, BackendError>;
    /// Whether the agent takes a connection whole for one bulk file
    /// transfer (`cove_protocol::fs::TRANSFER_CLIENT`); otherwise files
    /// move framed over the shared connection.
    fn serves_transfers(&self) -> bool {
        true
    }
    async fn pause(&self) -> Result<(), BackendError>;
    async fn resume(&self) -> Result<(), BackendError>;
    /// Kill everything and remove what the sandbox left on the host.
    async fn destroy(&self) -> Result<(), BackendError>;
    /// Resolves when the sandbox ends without being destroyed, with why.
    async fn exited(&self) -> String;
    /// Memory in use, in bytes.
    fn memory_usage(&self) -> Option<u64>;
    /// How the host reaches the sandbox's own TCP ports when its network
    /// namespace does not hold them (a microVM's guest kernel does);
    /// `None`: published ports connect inside [`Instance::network_namespace`].
    fn port_relay(&self) -> Option<std::sync::Arc<dyn cove_net::PortRelay>> {
        None
    }
    /// The sandbox's network namespace, for cove-net to wire it (a veth,
    /// published ports). Backends without one refuse networking.
    fn network_namespace(&self) -> Result<std::os::fd::OwnedFd, BackendError> {
        Err(BackendError::Invalid(
            "this backend has no network namespace cove can wire".into(),
        ))
    }
    /// Whether a snapshot reads the writable layer through the agent
    /// (`FsOp::WritableLayer`) because it lives where the host cannot
    /// read it (a microVM's guest memory), instead of `writable_layer`.
    fn layer_in_guest(&self) -> bool {
        false
    }
    /// The host path of the sandbox's writable overlay layer (what a
    /// snapshot copies), while it runs.
    fn writable_layer(&self) -> Result<std::path::PathBuf, BackendError> {
        Err(BackendError::Invalid(
            "this backend cannot snapshot sandboxes; snapshots need the namespace backend".into(),
        ))
    }
    /// The sandbox's console log (microVMs: the guest's serial console).
    fn console_log(&self) -> Option<PathBuf> {
        None
    }
}

/// The sandbox IDs that have a directory under a backend's `state_root`.
pub(crate) fn sandbox_dirs(state_root: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(state_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("sbx-"))
        .collect()
}
