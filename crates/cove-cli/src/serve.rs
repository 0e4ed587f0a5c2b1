//! `cove serve`: run the daemon in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;

use cove_server::{ConfigFile, ServeConfig};

use crate::{ExitCode, Failure};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7411].
    #[arg(long, env = "COVE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the database, keys and templates live [default: /var/lib/cove as root].
    #[arg(long, env = "COVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where per-sandbox state lives [default: /run/cove as root].
    #[arg(long, env = "COVE_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// The cgroup directory sandboxes go under [default: cove].
    #[arg(long, env = "COVE_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// The bridge sandboxes with egress hang off [default: cove0].
    #[arg(long, env = "COVE_NETWORK_BRIDGE", value_name = "NAME")]
    pub network_bridge: Option<String>,
    /// cove's nftables table (family inet) [default: cove].
    #[arg(long, env = "COVE_NETWORK_TABLE", value_name = "NAME")]
    pub network_table: Option<String>,
    /// The address pool of sandboxes with egress [default: 10.88.0.0/16].
    #[arg(long, env = "COVE_NETWORK_POOL", value_name = "CIDR")]
    pub network_pool: Option<String>,
    /// A DNS server the sandboxes' resolver asks, IP or IP:PORT
    /// (repeatable) [default: the host's /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    pub dns_upstream: Vec<String>,
    /// The backend of sandboxes whose request names none, which includes
    /// every sandbox of the Hyperfleet, GBOX and Declaw dialects:
    /// namespace or microvm [default: namespace].
    #[arg(long, env = "COVE_DEFAULT_BACKEND", value_name = "NAME")]
    pub default_backend: Option<String>,
    /// A TOML file with any of: listen, data_dir, runtime_dir, cgroup_parent,
    /// network_bridge, network_table, network_pool, dns_upstream,
    /// default_backend.
    #[arg(long, env = "COVE_CONFIG")]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<ExitCode, Failure> {
    if !cove_client::paths::is_root() {
        return Err(Failure::new(
            "cove serve needs root to create namespaces and cgroups (try sudo)",
        ));
    }
    cove_agent::keep_freed_buffers();
    let file = match &args.config {
        Some(path) => ConfigFile::load(path).map_err(|e| Failure::new(e.to_string()))?,
        None => ConfigFile::default(),
    };
    let helper = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the cove binary: {e}")))?;
    let network = network_config(&args, &file)?;
    let config = ServeConfig {
        listen: args.listen.or(file.listen).unwrap_or_else(|| {
            cove_api::DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7411)))
        }),
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(cove_client::paths::default_data_dir),
        runtime_dir: args
            .runtime_dir
            .or(file.runtime_dir)
            .unwrap_or_else(cove_client::paths::default_runtime_dir),
        cgroup_parent: args
            .cgroup_parent
            .or(file.cgroup_parent)
            .unwrap_or_else(|| "cove".into()),
        helper,
        network,
        default_backend: args
            .default_backend
            .or(file.default_backend)
            .unwrap_or_else(|| "namespace".into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cove-serve")
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
    runtime
        .block_on(async {
            let server = cove_server::Server::bind(config).await?;
            let addr = server.local_addr()?;
            // The one line a person (or a test) needs: where to connect.
            println!("cove: serving on http://{addr}");
            server.run(shutdown_signal()).await
        })
        .map_err(|e| Failure::new(e.to_string()))?;
    Ok(ExitCode(0))
}

fn network_config(args: &ServeArgs, file: &ConfigFile) -> Result<cove_net::NetworkConfig, Failure> {
    let mut config = cove_net::NetworkConfig::default();
    if let Some(bridge) = args.network_bridge.clone().or(file.network_bridge.clone()) {
        config.bridge = bridge;
    }
    if let Some(table) = args.network_table.clone().or(file.network_table.clone()) {
        config.table = table;
    }
    if let Some(pool) = args.network_pool.clone().or(file.network_pool.clone()) {
        config.pool = pool
            .parse()
            .map_err(|_| Failure::new(format!("network pool {pool:?} is not an IPv4 CIDR")))?;
    }
    let upstream = if args.dns_upstream.is_empty() {
        file.dns_upstream.clone().unwrap_or_default()
    } else {
        args.dns_upstream.clone()
    };
    for server in upstream {
        config
            .dns_upstream
            .push(cove_server::parse_dns_server(&server).map_err(Failure::new)?);
    }
    Ok(config)
}

/// SIGTERM or SIGINT: stop accepting, finish in-flight requests, leave
/// sandboxes running.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
