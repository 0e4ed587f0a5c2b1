//! cove's per-sandbox networking, on the host side.
//!
//! Every sandbox has its own network namespace (cove-isolate). With
//! `network: "none"` it holds only `lo`. With `egress`:
//!
//! ```text
//!   sandbox netns                 host
//!   eth0 10.88.0.7/16 ── veth ── cv1a2b3c4d ─┐ (isolated bridge port)
//!   default via 10.88.0.1                    cove0 10.88.0.1/16 ── routing ── NAT ── host's networks
//!   resolv.conf → 10.88.0.1                  └─ DNS forwarder (the daemon) on 10.88.0.1:53
//! ```
//!
//! * **Filtering** is one nftables table (`inet cove`, see [`nft`]): what
//!   a sandbox may reach is decided per source address by its own chain,
//!   built from its policy ([`policy`]). The host itself, other
//!   sandboxes, and 169.254.0.0/16 are refused unless the policy names
//!   them. IPv6 from sandboxes is dropped.
//! * **DNS** goes through the daemon ([`dns`]): it answers only names the
//!   policy allows and opens the addresses it hands out.
//! * **Published ports** ([`ports`]) are listeners on the host's 127.0.0.1
//!   that forward into the sandbox's namespace; they work in every mode.
//!
//! Lifecycle: [`Network::prepare`] checks the request and takes what can
//! fail for the request's own reasons (host names that do not resolve, a
//! host port in use, an address) before anything is created;
//! [`Network::attach`] wires the sandbox once its namespace exists;
//! [`Network::detach`] removes its veth, rules and address. The bridge,
//! the base table and the DNS forwarder exist while at least one egress
//! sandbox does. After a daemon restart [`Network::recover`] adopts the
//! rules of each running sandbox (re-creating only what is missing) and
//! [`Network::collect_garbage`] removes whatever belongs to sandboxes that
//! are gone.

pub mod dns;
pub mod link;
pub mod netns;
pub mod nft;
pub mod policy;
pub mod pool;
pub mod ports;

pub use ports::{Duplex, PortRelay};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cove_api::{NetworkInfo, NetworkMode, NetworkRequest, PortMapping};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::link::Links;
use crate::nft::{Nft, SandboxRules};
use crate::policy::Policy;
use crate::pool::Pool;

/// Host-side settings.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The bridge egress sandboxes hang off (default `cove0`).
    pub bridge: String,
    /// cove's nftables table, in the `inet` family (default `cove`).
    pub table: String,
    /// The sandbox pool; its first address is the bridge's (default 10.88.0.0/16).
    pub pool: Ipv4Net,
    /// DNS servers the forwarder asks; empty: the host's `/etc/resolv.conf`.
    pub dns_upstream: Vec<SocketAddr>,
}

pub const DEFAULT_BRIDGE: &str = "cove0";
pub const DEFAULT_TABLE: &str = "cove";
pub const DEFAULT_POOL: &str = "10.88.0.0/16";

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.into(),
            table: DEFAULT_TABLE.into(),
            pool: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or_default(),
            dns_upstream: Vec::new(),
        }
    }
}

/// Errors, by whose fault they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The request is wrong (a 400): the message names the culprit.
    #[error("{0}")]
    Invalid(String),
    /// A host port the request asks for is taken (a 409).
    #[error("{0}")]
    PortInUse(String),
    /// Something the request needs is not available now (a 503): the DNS
    /// servers do not answer, the pool is full.
    #[error("{0}")]
    Unavailable(String),
    /// The host refused a change (a 500).
    #[error("{0}")]
    Host(String),
}

/// What the daemon stores with a sandbox to describe, recover and tear
/// down its network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub mode: NetworkMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// Addresses the host names of allow_out / deny_out resolved to at create.
    #[serde(default)]
    pub resolved_allow: Vec<Ipv4Addr>,
    #[serde(default)]
    pub resolved_deny: Vec<Ipv4Addr>,
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// A microVM's tap in the sandbox's namespace: the namespace bridges
    /// `eth0` to it and holds no address (the guest does). `None` for a
    /// namespace sandbox, whose `eth0` holds the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_link: Option<String>,
}

impl Stored {
    /// How the API shows it.
    pub fn info(&self) -> NetworkInfo {
        NetworkInfo {
            mode: self.mode,
            address: self.address.map(|a| a.to_string()),
            gateway: self.gateway.map(|a| a.to_string()),
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
            ports: self.ports.clone(),
        }
    }

    fn policy(&self) -> Policy {
        Policy::parse(&self.allow_out, &self.deny_out).unwrap_or_default()
    }
}

/// The host end of a sandbox's veth: `cv` and the random part of its ID.
pub fn veth_name(id: &str) -> String {
    format!("cv{}", id.strip_prefix("sbx-").unwrap_or(id))
}

fn sandbox_of_veth(name: &str) -> Option<String> {
    let rest = name.strip_prefix("cv")?;
    (rest.len() == 8
        && rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
    .then(|| format!("sbx-{rest}"))
}

/// The sandbox a DNS query comes from.
#[derive(Debug)]
pub(crate) struct Client {
    pub id: String,
    pub policy: Policy,
}

/// What the DNS forwarder shares with the rest.
#[derive(Debug)]
pub(crate) struct Shared {
    pub nft: Nft,
    pub upstream: Vec<SocketAddr>,
    clients: RwLock<HashMap<Ipv4Addr, Arc<Client>>>,
}

impl Shared {
    pub fn client(&self, addr: Ipv4Addr) -> Option<Arc<Client>> {
        self.clients
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)
            .cloned()
    }

    fn register(&self, addr: Ipv4Addr, client: Client) {
        self.clients
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr, Arc::new(client));
    }

    fn unregister(&self, addr: Ipv4Addr) {
        self.clients
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr);
    }
}

/// The bridge, base table and DNS forwarder, while egress sandboxes exist.
#[derive(Debug)]
struct Base {
    bridge_index: u32,
    _dns: dns::DnsServer,
}

#[derive(Debug, Default)]
struct BaseState {
    base: Option<Base>,
    /// Egress sandboxes attached or being attached.
    users: usize,
    /// Held while this daemon owns the bridge and table (see [`take_lock`]).
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Another daemon on this host owns the same table and bridge.
const LOCKED: &str = "another cove daemon on this host uses the same nftables table and bridge";

/// A lock on the table's name for this process: two daemons with the same
/// table and bridge would remove each other's rules. `Ok(None)`: another
/// process holds it.
fn take_lock(table: &str) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, String> {
    let path = format!("/run/cove-net-{table}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(format!("cannot lock {path}: {e}")),
    }
}

/// A sandbox's network in use.
#[derive(Debug)]
struct Attached {
    stored: Stored,
    port_tasks: Vec<JoinHandle<()>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        for task in &self.port_tasks {
            task.abort();
        }
    }
}

/// What [`Network::prepare`] took for a sandbox about to be created.
/// Dropping it gives everything back.
#[derive(Debug)]
pub struct Prepared {
    id: String,
    stored: Stored,
    policy: Policy,
    listeners: Vec<(PortMapping, tokio::net::TcpListener)>,
    inner: Arc<Inner>,
}

impl Prepared {
    /// What to store with the sandbox (and show).
    pub fn stored(&self) -> &Stored {
        &self.stored
    }

    /// The sandbox's `/etc/resolv.conf`, for egress sandboxes.
    pub fn resolv_conf(&self) -> Option<String> {
        self.stored
            .gateway
            .filter(|_| self.stored.mode == NetworkMode::Egress)
            .map(|gw| format!("nameserver {gw}\noptions edns0\n"))
    }

    /// The sandbox is a microVM whose guest holds the address behind
    /// `tap` (in the namespace given to [`Network::attach`]).
    pub fn set_guest_link(&mut self, tap: &str) {
        self.stored.guest_link = Some(tap.to_string());
    }

    /// Whether [`Network::attach`] has anything to do.
    pub fn needs_attach(&self) -> bool {
        self.stored.mode == NetworkMode::Egress || !self.listeners.is_empty()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(addr) = self.stored.address.take() {
            self.inner.pool().release(addr);
        }
    }
}

/// The host side of every sandbox's network. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NetworkConfig,
    nft: Nft,
    links: Links,
    pool: Mutex<Pool>,
    shared: Arc<Shared>,
    base: tokio::sync::Mutex<BaseState>,
    attached: Mutex<HashMap<String, Attached>>,
}

impl Inner {
    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn gateway(&self) -> Ipv4Addr {
        self.pool().gateway()
    }

    fn rules(&self, stored: &Stored) -> SandboxRules {
        let policy = stored.policy();
        let host = |a: &Ipv4Addr| Ipv4Net::from(*a);
        let mut allow = policy.allow_nets();
        allow.extend(stored.resolved_allow.iter().map(host));
        let mut deny = policy.deny_nets();
        deny.extend(stored.resolved_deny.iter().map(host));
        SandboxRules {
            address: stored.address,
            allow,
            deny,
            pins: policy.pins(self.config.pool),
            allow_list: policy.is_allow_list(),
        }
    }
}

fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Network {
    /// Set up the host side (nothing on the host changes until the first
    /// egress sandbox). Call from within a Tokio runtime.
    pub fn new(mut config: NetworkConfig) -> Result<Network, String> {
        if !valid_name(&config.bridge, 15) {
            return Err(format!(
                "bridge name {:?} must be 1-15 letters, digits, '-' or '_', starting with a letter",
                config.bridge
            ));
        }
        if !valid_name(&config.table, 64) {
            return Err(format!(
                "nftables table name {:?} must be letters, digits, '-' or '_', starting with a letter",
                config.table
            ));
        }
        let pool = Pool::new(config.pool)?;
        config.pool = pool.net();
        if config.dns_upstream.is_empty() {
            config.dns_upstream =
                dns::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        }
        let nft = Nft {
            table: config.table.clone(),
            bridge: config.bridge.clone(),
        };
        let links = Links::connect().map_err(|e| format!("cannot open a netlink socket: {e}"))?;
        Ok(Network {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    nft: nft.clone(),
                    upstream: config.dns_upstream.clone(),
                    clients: RwLock::new(HashMap::new()),
                }),
                config,
                nft,
                links,
                pool: Mutex::new(pool),
                base: tokio::sync::Mutex::new(BaseState::default()),
                attached: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.inner.config
    }

    /// Check a request without touching anything: the policy's entries,
    /// the mode, the ports.
    pub fn validate(req: &NetworkRequest) -> Result<Policy, NetError> {
        let policy = Policy::parse(&req.allow_out, &req.deny_out)
            .map_err(|e| NetError::Invalid(e.to_string()))?;
        if req.effective_mode() == NetworkMode::None
            && !(req.allow_out.is_empty() && req.deny_out.is_empty())
        {
            return Err(NetError::Invalid(
                "network.allow_out and deny_out apply to mode \"egress\"; with \"none\" the sandbox reaches nothing"
                    .into(),
            ));
        }
        let mut seen = HashSet::new();
        for port in &req.exposed_ports {
            if let Some(host) = port.host_port
                && !seen.insert(host)
            {
                return Err(NetError::Invalid(format!(
                    "network.exposed_ports: host port {host} is given twice"
                )));
            }
        }
        if req.exposed_ports.len() > 64 {
            return Err(NetError::Invalid(
                "network.exposed_ports: at most 64 ports".into(),
            ));
        }
        Ok(policy)
    }

    /// Take what sandbox `id` needs before it is created: resolve the
    /// policy's host names, bind the published ports, take an address.
    /// Nothing on the host changes; dropping the result gives it all back.
    pub async fn prepare(&self, id: &str, req: &NetworkRequest) -> Result<Prepared, NetError> {
        let policy = Self::validate(req)?;
        let mode = req.effective_mode();
        let mut stored = Stored {
            mode,
            allow_out: policy.allow.iter().map(|t| t.to_string()).collect(),
            deny_out: policy.deny.iter().map(|t| t.to_string()).collect(),
            ..Stored::default()
        };
        if mode == NetworkMode::Egress {
            let upstream = &self.inner.config.dns_upstream;
            let lookups = policy
                .names()
                .map(|name| async move { (name.to_string(), dns::resolve(upstream, name).await) });
            for (name, result) in futures::future::join_all(lookups).await {
                let field = if policy
                    .allow
                    .iter()
                    .any(|t| *t == policy::Target::Name(name.clone()))
                {
                    "allow_out"
                } else {
                    "deny_out"
                };
                let addrs = match result {
                    Ok(addrs) => addrs,
                    Err(dns::ResolveError::Unknown(why)) => {
                        return Err(NetError::Invalid(format!(
                            "network.{field}: host name {name:?} does not resolve: {why}"
                        )));
                    }
                    Err(dns::ResolveError::Unreachable(why)) => {
                        return Err(NetError::Unavailable(format!(
                            "network.{field}: cannot resolve host name {name:?}: {why}"
                        )));
                    }
                };
                if field == "allow_out" {
                    stored.resolved_allow.extend(addrs);
                } else {
                    stored.resolved_deny.extend(addrs);
                }
            }
            stored.resolved_allow.sort();
            stored.resolved_allow.dedup();
            stored.resolved_deny.sort();
            stored.resolved_deny.dedup();
        }
        let mut listeners = Vec::new();
        for request in &req.exposed_ports {
            let wanted = request.host_port.unwrap_or(0);
            let listener = ports::bind(wanted).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    NetError::PortInUse(format!(
                        "network.exposed_ports: host port 127.0.0.1:{wanted} is already in use; \
                         choose another host_port, or leave it out to get a free one"
                    ))
                } else {
                    NetError::Host(format!("cannot listen on 127.0.0.1:{wanted}: {e}"))
                }
            })?;
            let host_port = listener
                .local_addr()
                .map_err(|e| NetError::Host(e.to_string()))?
                .port();
            let mapping = PortMapping {
                port: request.port,
                host_port,
                host_ip: Ipv4Addr::LOCALHOST.to_string(),
            };
            stored.ports.push(mapping.clone());
            listeners.push((mapping, listener));
        }
        if mode == NetworkMode::Egress {
            let mut pool = self.inner.pool();
            let addr = pool.allocate().ok_or_else(|| {
                NetError::Unavailable(format!(
                    "every address of the sandbox pool {} is in use",
                    pool.net()
                ))
            })?;
            stored.address = Some(addr);
            stored.gateway = Some(pool.gateway());
            stored.prefix = Some(pool.net().prefix_len());
        }
        Ok(Prepared {
            id: id.to_string(),
            stored,
            policy,
            listeners,
            inner: self.inner.clone(),
        })
    }

    /// Wire a created sandbox whose network namespace is `netns`; its
    /// published ports go through `relay` when it has one (a microVM),
    /// into `netns` otherwise. On failure everything done so far is undone.
    pub async fn attach(
        &self,
        mut prepared: Prepared,
        netns: OwnedFd,
        relay: Option<Arc<dyn PortRelay>>,
    ) -> Result<(), NetError> {
        if !prepared.needs_attach() {
            return Ok(());
        }
        let id = prepared.id.clone();
        let netns = Arc::new(netns);
        let stored = prepared.stored.clone();
        if stored.mode == NetworkMode::Egress {
            let policy = std::mem::take(&mut prepared.policy);
            let bridge = self.acquire_base().await?;
            if let Err(err) = self.wire(&id, &stored, policy, bridge, &netns, false).await {
                self.unwire(&id, &stored).await;
                return Err(err);
            }
        }
        // From here the address belongs to the attached sandbox.
        prepared.stored.address = None;
        let upstream = upstream(&stored, &netns, relay);
        let port_tasks = std::mem::take(&mut prepared.listeners)
            .into_iter()
            .map(|(mapping, listener)| ports::serve(listener, upstream.clone(), mapping.port))
            .collect();
        self.inner
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Attached { stored, port_tasks });
        Ok(())
    }

    /// The egress part of attach and recover: base, veth, address,
    /// rules, DNS registration. With `adopt`, parts that exist are kept.
    async fn wire(
        &self,
        id: &str,
        stored: &Stored,
        policy: Policy,
        bridge: u32,
        netns: &OwnedFd,
        adopt: bool,
    ) -> Result<(), NetError> {
        let (Some(addr), Some(gateway), Some(prefix)) =
            (stored.address, stored.gateway, stored.prefix)
        else {
            return Err(NetError::Host(format!(
                "sandbox {id} has no address on the bridge"
            )));
        };
        let veth = veth_name(id);
        let veth_exists = adopt
            && self
                .inner
                .links
                .get(&veth)
                .await
                .map_err(NetError::Host)?
                .is_some();
        if !veth_exists {
            self.inner
                .links
                .add_veth(&veth, bridge, netns)
                .await
                .map_err(NetError::Host)?;
            let inside = Links::connect_in(netns)
                .await
                .map_err(|e| NetError::Host(format!("netlink in the sandbox: {e}")))?;
            match &stored.guest_link {
                Some(tap) => inside.bridge_guest(tap).await,
                None => inside.configure_eth0(addr, prefix, gateway).await,
            }
            .map_err(NetError::Host)?;
            let _ = netns::sysctl_in(
                netns,
                "/proc/sys/net/ipv6/conf/eth0/disable_ipv6".into(),
                "1",
            )
            .await;
        }
        let chain = format!("{id}-out");
        let rules_exist = adopt
            && self
                .inner
                .nft
                .list()
                .await
                .map_err(NetError::Host)?
                .is_some_and(|l| l.chains.contains(&chain));
        if !rules_exist {
            if adopt {
                // Half of it may be there: start from nothing.
                self.delete_rules(&[id.to_string()].into()).await;
            }
            let script = self
                .inner
                .nft
                .sandbox_script(id, gateway, &self.inner.rules(stored));
            self.inner
                .nft
                .apply(&script)
                .await
                .map_err(NetError::Host)?;
        }
        self.inner.shared.register(
            addr,
            Client {
                id: id.to_string(),
                policy,
            },
        );
        Ok(())
    }

    /// Undo [`Network::wire`] (also after a partial one) and give up
    /// its share of the base. The address stays with the caller.
    async fn unwire(&self, id: &str, stored: &Stored) {
        if let Some(addr) = stored.address {
            self.inner.shared.unregister(addr);
        }
        if let Err(err) = self.inner.links.delete(&veth_name(id)).await {
            tracing::warn!(%id, %err, "removing the sandbox's veth");
        }
        self.delete_rules(&[id.to_string()].into()).await;
        self.release_base().await;
    }

    async fn delete_rules(&self, ids: &BTreeSet<String>) {
        match self.inner.nft.list().await {
            Ok(Some(listing)) => {
                let script = self.inner.nft.delete_script(&listing, ids);
                if let Err(err) = self.inner.nft.apply(&script).await {
                    tracing::warn!(?ids, %err, "removing nftables rules");
                }
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(?ids, %err, "listing nftables rules"),
        }
    }

    /// Create the bridge, base table and DNS forwarder if they are not
    /// there, and count one more egress sandbox. Returns the bridge index.
    async fn acquire_base(&self) -> Result<u32, NetError> {
        let mut state = self.inner.base.lock().await;
        if let Some(index) = state.base.as_ref().map(|b| b.bridge_index) {
            state.users += 1;
            return Ok(index);
        }
        let config = &self.inner.config;
        if state.lock.is_none() {
            match take_lock(&config.table) {
                Ok(Some(lock)) => state.lock = Some(lock),
                Ok(None) => {
                    return Err(NetError::Unavailable(format!(
                        "{LOCKED} ({} and {}); give each daemon its own --network-table, \
                         --network-bridge and --network-pool",
                        config.table, config.bridge
                    )));
                }
                Err(err) => return Err(NetError::Host(err)),
            }
        }
        let gateway = self.inner.gateway();
        let result = async {
            let index = self
                .inner
                .links
                .ensure_bridge(&config.bridge, gateway, config.pool.prefix_len())
                .await?;
            enable_forwarding()?;
            self.inner
                .nft
                .apply(&self.inner.nft.base_script(config.pool))
                .await?;
            let dns = dns::serve(gateway, self.inner.shared.clone())
                .await
                .map_err(|e| format!("cannot serve DNS on {gateway}:53: {e}"))?;
            Ok::<_, String>(Base {
                bridge_index: index,
                _dns: dns,
            })
        }
        .await;
        match result {
            Ok(base) => {
                let index = base.bridge_index;
                state.base = Some(base);
                state.users += 1;
                tracing::info!(bridge = %config.bridge, table = %config.table, pool = %config.pool, "egress networking is up");
                Ok(index)
            }
            Err(err) => {
                if state.users == 0 {
                    self.remove_base().await;
                    state.lock = None;
                }
                Err(NetError::Host(err))
            }
        }
    }

    /// One egress sandbox fewer; the last one takes the base with it.
    async fn release_base(&self) {
        let mut state = self.inner.base.lock().await;
        state.users = state.users.saturating_sub(1);
        if state.users == 0 && state.base.take().is_some() {
            self.remove_base().await;
            state.lock = None;
            tracing::info!("egress networking is down: no egress sandbox left");
        }
    }

    async fn remove_base(&self) {
        let nft = &self.inner.nft;
        match nft.list().await {
            Ok(Some(_)) => {
                if let Err(err) = nft.apply(&nft.delete_table_script()).await {
                    tracing::warn!(%err, "removing cove's nftables table");
                }
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(%err, "listing cove's nftables table"),
        }
        if let Err(err) = self.inner.links.delete(&self.inner.config.bridge).await {
            tracing::warn!(%err, "removing cove's bridge");
        }
    }

    /// Remove sandbox `id`'s network: its ports, veth, rules, address.
    /// A sandbox without one is not an error.
    pub async fn detach(&self, id: &str) {
        let attached = self
            .inner
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        let Some(mut attached) = attached else {
            return;
        };
        // The listeners close when their tasks are gone: wait for that, so
        // the host port is free when the caller hears the sandbox is.
        let tasks = std::mem::take(&mut attached.port_tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        if attached.stored.mode == NetworkMode::Egress {
            self.unwire(id, &attached.stored).await;
            if let Some(addr) = attached.stored.address {
                self.inner.pool().release(addr);
            }
        }
        drop(attached);
    }

    /// Remove what sandbox `id` may have left on the host when this daemon
    /// has not attached it (it ended while the daemon was down).
    pub async fn forget(&self, id: &str) {
        if self
            .inner
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(id)
        {
            return self.detach(id).await;
        }
        let _ = self.inner.links.delete(&veth_name(id)).await;
        self.delete_rules(&[id.to_string()].into()).await;
    }

    /// Adopt the network of a sandbox found running after a restart: keep
    /// its veth and rules (re-create what is missing), serve its DNS and
    /// published ports again (`netns` and `relay` as for [`Network::attach`]).
    pub async fn recover(
        &self,
        id: &str,
        stored: Stored,
        netns: OwnedFd,
        relay: Option<Arc<dyn PortRelay>>,
    ) -> Result<(), NetError> {
        if stored.mode == NetworkMode::None && stored.ports.is_empty() {
            return Ok(());
        }
        let netns = Arc::new(netns);
        if stored.mode == NetworkMode::Egress {
            let reserved = stored
                .address
                .is_some_and(|addr| self.inner.pool().reserve(addr));
            if !reserved {
                return Err(NetError::Host(format!(
                    "sandbox {id}'s address {:?} is outside the pool {} or taken",
                    stored.address, self.inner.config.pool
                )));
            }
            let wired = match self.acquire_base().await {
                Ok(bridge) => {
                    let wired = self
                        .wire(id, &stored, stored.policy(), bridge, &netns, true)
                        .await;
                    if wired.is_err() {
                        self.unwire(id, &stored).await;
                    }
                    wired
                }
                Err(err) => Err(err),
            };
            if let Err(err) = wired {
                if let Some(addr) = stored.address {
                    self.inner.pool().release(addr);
                }
                return Err(err);
            }
        }
        let mut port_tasks = Vec::new();
        let upstream = upstream(&stored, &netns, relay);
        for mapping in &stored.ports {
            match ports::bind(mapping.host_port).await {
                Ok(listener) => {
                    port_tasks.push(ports::serve(listener, upstream.clone(), mapping.port))
                }
                Err(err) => tracing::warn!(%id, host_port = mapping.host_port, %err,
                    "cannot publish the port again after the restart"),
            }
        }
        self.inner
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string(), Attached { stored, port_tasks });
        Ok(())
    }

    /// Remove rules and veths of sandboxes that are neither in `live` nor
    /// attached, and the base when no egress sandbox is left.
    pub async fn collect_garbage(&self, live: &HashSet<String>) {
        let mut state = self.inner.base.lock().await;
        if state.lock.is_none() {
            // Nothing on the host: nothing to collect, and no lock file to
            // leave behind for a daemon that never uses the network.
            let table = matches!(self.inner.nft.list().await, Ok(Some(_)));
            let bridge = matches!(
                self.inner.links.index(&self.inner.config.bridge).await,
                Ok(Some(_))
            );
            if !table && !bridge {
                return;
            }
            match take_lock(&self.inner.config.table) {
                Ok(Some(lock)) => state.lock = Some(lock),
                Ok(None) => {
                    tracing::warn!(table = %self.inner.config.table, bridge = %self.inner.config.bridge,
                        "{LOCKED}: leaving its rules alone; this daemon cannot give sandboxes egress");
                    return;
                }
                Err(err) => {
                    tracing::warn!(%err, "not collecting stale network rules");
                    return;
                }
            }
        }
        let attached: HashSet<String> = self
            .inner
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        let keep = |id: &String| live.contains(id) || attached.contains(id);
        if let Ok(Some(listing)) = self.inner.nft.list().await {
            let stale: BTreeSet<String> = listing
                .sandbox_ids()
                .into_iter()
                .filter(|id| !keep(id))
                .collect();
            if !stale.is_empty() {
                tracing::warn!(?stale, "removing nftables rules of sandboxes that are gone");
                self.delete_rules(&stale).await;
            }
        }
        if let Ok(Some(bridge)) = self.inner.links.index(&self.inner.config.bridge).await
            && let Ok(ports) = self.inner.links.ports(bridge).await
        {
            for port in ports {
                if sandbox_of_veth(&port).is_none_or(|id| !keep(&id)) {
                    tracing::warn!(%port, "removing a veth of a sandbox that is gone");
                    let _ = self.inner.links.delete(&port).await;
                }
            }
        }
        if state.users == 0 {
            self.remove_base().await;
            state.lock = None;
        }
    }
}

/// Where a sandbox's published ports lead: to a microVM's guest address,
/// then through its relay, when it has one; into its namespace otherwise.
fn upstream(
    stored: &Stored,
    netns: &Arc<OwnedFd>,
    relay: Option<Arc<dyn PortRelay>>,
) -> ports::Upstream {
    match relay {
        Some(relay) => ports::Upstream::Relay {
            relay,
            address: stored.address,
        },
        None => ports::Upstream::Namespace {
            netns: netns.clone(),
            address: stored.address,
        },
    }
}

/// Let the host route between the bridge and its other networks.
fn enable_forwarding() -> Result<(), String> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1")
        .map_err(|e| format!("cannot enable IPv4 forwarding ({PATH}): {e}"))?;
    tracing::info!("enabled IPv4 forwarding (net.ipv4.ip_forward = 1) for egress sandboxes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct NoRelay;

    impl PortRelay for NoRelay {
        fn connect(
            &self,
            _port: u16,
        ) -> futures::future::BoxFuture<'_, std::io::Result<Box<dyn ports::Duplex>>> {
            Box::pin(async { Err(std::io::ErrorKind::ConnectionRefused.into()) })
        }
    }

    #[test]
    fn published_ports_lead_into_the_namespace_or_through_a_relay() {
        let netns = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let address = Some(Ipv4Addr::new(10, 88, 0, 2));
        let namespace = Stored {
            address,
            ..Stored::default()
        };
        assert!(matches!(
            upstream(&namespace, &netns, None),
            ports::Upstream::Namespace { address: a, .. } if a == address
        ));
        // A guest behind a tap: its address (if any), then its relay.
        let guest = Stored {
            address,
            guest_link: Some("tap0".into()),
            ..Stored::default()
        };
        assert!(matches!(
            upstream(&guest, &netns, Some(Arc::new(NoRelay))),
            ports::Upstream::Relay { address: a, .. } if a == address
        ));
        assert!(matches!(
            upstream(&Stored::default(), &netns, Some(Arc::new(NoRelay))),
            ports::Upstream::Relay { address: None, .. }
        ));
    }

    #[test]
    fn veth_names_round_trip() {
        assert_eq!(veth_name("sbx-1a2b3c4d"), "cv1a2b3c4d");
        assert_eq!(
            sandbox_of_veth("cv1a2b3c4d").as_deref(),
            Some("sbx-1a2b3c4d")
        );
        assert_eq!(sandbox_of_veth("cove0"), None);
        assert_eq!(sandbox_of_veth("cvABCDEFGH"), None);
    }
}
