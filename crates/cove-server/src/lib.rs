//! `cove serve`: the daemon. It owns the state (SQLite in the data
//! directory), the API keys, the sandbox manager and its backends, and
//! serves the native HTTP API and the seed platforms' dialects.
//!
//! ```text
//!  HTTP ─▶ axum routes ─▶ Manager (state machine, TTL reaper) ─▶ Backend (namespace, microvm)
//!             │                │                                   │
//!             │                └── Store (SQLite thread)            └─▶ agent socket
//!             └── Auth (keys, scopes, owners)
//! ```

pub mod api;
pub mod auth;
pub mod backend;
pub mod engine;
pub mod error;
pub mod exec;
pub mod manager;
pub mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

pub use backend::factory::factory_main;
pub use backend::namespace::helper_main;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub cgroup_parent: String,
    /// The cove binary, run as `cove __create-sandbox` to create sandboxes.
    pub helper: PathBuf,
    /// The bridge, nftables table, address pool and DNS servers of
    /// sandboxes with egress (docs/network.md).
    pub network: cove_net::NetworkConfig,
    /// The backend of sandboxes whose request names none: those of the
    /// dialects, whose clients cannot ask (`namespace` or `microvm`).
    pub default_backend: String,
}

/// The optional TOML configuration file; every field may be omitted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub cgroup_parent: Option<String>,
    /// The bridge egress sandboxes hang off (default `cove0`).
    pub network_bridge: Option<String>,
    /// cove's nftables table in the `inet` family (default `cove`).
    pub network_table: Option<String>,
    /// The sandbox address pool (default `10.88.0.0/16`).
    pub network_pool: Option<String>,
    /// DNS servers the sandboxes' resolver asks (default: the host's
    /// `/etc/resolv.conf`), as `IP` or `IP:PORT`.
    pub dns_upstream: Option<Vec<String>>,
    /// The backend of sandboxes whose request names none (default
    /// `namespace`).
    pub default_backend: Option<String>,
}

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<ConfigFile, ServeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServeError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ServeError::Config(format!("{}: {e}", path.display())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

fn make_dir(path: &std::path::Path, mode: u32) -> Result<(), ServeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| ServeError::Dir {
            path: path.to_path_buf(),
            source,
        })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    Ok(())
}

/// A daemon that is set up and bound, ready to serve.
pub struct Server {
    listener: tokio::net::TcpListener,
    app: axum::Router,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Set everything up (state, keys, reattaching sandboxes) and bind.
    pub async fn bind(config: ServeConfig) -> Result<Server, ServeError> {
        if !cove_isolate::cgroups::valid_parent(&config.cgroup_parent) {
            return Err(ServeError::Config(format!(
                "cgroup parent {:?} must be a plain relative path",
                config.cgroup_parent
            )));
        }
        make_dir(&config.data_dir, 0o700)?;
        make_dir(&config.runtime_dir.join("sandboxes"), 0o700)?;
        // Orphaned agents (their creating helper exits at once) become our
        // children, so we can reap them.
        // SAFETY: prctl on the calling process.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

        let store = store::Store::open(&config.data_dir.join("cove.db"))?;
        auth::ensure_admin_key(&store, &config.data_dir)?;
        let keys = auth::Keys::default();
        keys.load(&store.keys_blocking()?);

        let templates = cove_template::TemplateStore::new(config.data_dir.join("templates"));
        let namespace = Arc::new(backend::namespace::NamespaceBackend::new(
            config.runtime_dir.join("sandboxes"),
            config.helper.clone(),
        ));
        // The microVM backend is always there to reattach or clean up VMs
        // an earlier run left; it creates sandboxes only when the host has
        // QEMU (or Firecracker and KVM), vsock and a static agent.
        let helper = config.helper.clone();
        let vm_setup = tokio::task::spawn_blocking(move || backend::microvm::probe_host(&helper))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match &vm_setup {
            Ok(agent) => tracing::info!(agent = %agent.display(), "microVM backend available"),
            Err(why) => tracing::info!(%why, "microVM backend unavailable"),
        }
        let microvm = Arc::new(backend::microvm::MicrovmBackend::new(
            &config.runtime_dir,
            &config.data_dir,
            vm_setup,
        ));
        let backends: Vec<Arc<dyn backend::Backend>> = vec![namespace, microvm];
        default_backend_check(&backends, &config.default_backend)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let network = match cove_net::Network::new(config.network.clone()) {
            Ok(network) => Some(network),
            Err(err) => {
                tracing::warn!(%err, "sandbox networking is off: only network \"none\" works");
                None
            }
        };
        let manager = manager::Manager::new(
            store,
            templates,
            backends,
            manager::ManagerConfig {
                cgroup_parent: config.cgroup_parent.clone(),
                default_backend: config.default_backend.clone(),
                network,
            },
            metrics,
        );
        manager.recover().await?;
        manager.spawn_reaper();

        let state = api::AppState {
            manager,
            keys,
            data_dir: config.data_dir.clone(),
        };
        let app = api::app(state, api::compat::routes());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: config.listen,
                source,
            })?;
        Ok(Server {
            listener,
            app,
            data_dir: config.data_dir,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` resolves. Sandboxes keep running after the
    /// daemon stops; the next start reattaches to them.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        tracing::info!(listen = %self.listener.local_addr()?, data_dir = %self.data_dir.display(), "cove is serving");
        axum::serve(self.listener, self.app)
            .with_graceful_shutdown(shutdown)
            .await?;
        tracing::info!("stopped serving; sandboxes keep running");
        Ok(())
    }
}

/// The default backend must exist and work here: a daemon told to put
/// every sandbox in a microVM does not quietly fall back to namespaces.
fn default_backend_check(
    backends: &[Arc<dyn backend::Backend>],
    name: &str,
) -> Result<(), ServeError> {
    let Some(backend) = backends.iter().find(|b| b.name() == name) else {
        let known: Vec<&str> = backends.iter().map(|b| b.name()).collect();
        return Err(ServeError::Config(format!(
            "default backend {name:?} is unknown; choose one of: {}",
            known.join(", ")
        )));
    };
    match backend.unavailable() {
        Some(why) => Err(ServeError::Config(format!(
            "default backend {name:?} is not available on this host: {why}"
        ))),
        None => Ok(()),
    }
}

/// A DNS server given as `IP` or `IP:PORT` (port 53 by default).
pub fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("DNS server {s:?} must be an IP address or IP:PORT"))
}
