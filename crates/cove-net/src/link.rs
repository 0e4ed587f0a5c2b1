//! Links and addresses, through rtnetlink: the bridge, each sandbox's
//! veth pair (host end on the bridge, peer `eth0` created directly inside
//! the sandbox's namespace), and the peer's address and default route.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::netns;

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn describe(what: &str, err: rtnetlink::Error) -> String {
    match errno(&err) {
        Some(code) => format!("{what}: {}", std::io::Error::from_raw_os_error(code)),
        None => format!("{what}: {err}"),
    }
}

/// A netlink connection to the namespace it was created in.
#[derive(Debug, Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// A connection to the caller's namespace, served on the current runtime.
    pub fn connect() -> std::io::Result<Links> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// A connection to the namespace `netns`.
    pub async fn connect_in(netns: &OwnedFd) -> std::io::Result<Links> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _) = netns::in_netns(netns, move || {
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })
        .await?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// The link called `name`, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<LinkMessage>, String> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(describe(&format!("looking up {name}"), e)),
        }
    }

    pub async fn index(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(self.get(name).await?.map(|l| l.header.index))
    }

    /// Make sure bridge `name` exists, is up and has `gateway/prefix`.
    /// Returns its index.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<u32, String> {
        let index = match self.index(name).await? {
            Some(index) => index,
            None => {
                let request = self
                    .handle
                    .link()
                    // A fixed address: a bridge without one takes the
                    // lowest of its ports', and would change it when a
                    // sandbox's veth leaves, so that the other sandboxes'
                    // ARP entry for their gateway went stale.
                    .add(LinkBridge::new(name).address(bridge_mac(name)).build())
                    .execute()
                    .await;
                if let Err(e) = request
                    && errno(&e) != Some(EEXIST)
                {
                    return Err(describe(&format!("creating bridge {name}"), e));
                }
                self.index(name)
                    .await?
                    .ok_or_else(|| format!("bridge {name} vanished right after it was created"))?
            }
        };
        // No IPv6 on the bridge: sandboxes have IPv4 egress only, and a
        // link-local address would let them reach the host over IPv6.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let has_address = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| describe(&format!("listing the addresses of {name}"), e))?
            .iter()
            .any(|a| {
                a.header.prefix_len == prefix
                    && a.attributes.iter().any(|attr| {
                        matches!(attr, rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) if *ip == gateway)
                    })
            });
        if !has_address {
            let added = self
                .handle
                .address()
                .add(index, IpAddr::V4(gateway), prefix)
                .execute()
                .await;
            if let Err(e) = added
                && errno(&e) != Some(EEXIST)
            {
                return Err(describe(&format!("adding {gateway}/{prefix} to {name}"), e));
            }
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| describe(&format!("bringing {name} up"), e))?;
        Ok(index)
    }

    /// Delete link `name`; a link that is already gone is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), String> {
        let Some(index) = self.index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(describe(&format!("deleting {name}"), e)),
        }
    }

    /// Create the veth pair of a sandbox: `host` on `bridge` (an isolated
    /// port, so sandboxes cannot reach each other at layer 2), and its peer
    /// as `eth0` inside `netns`.
    pub async fn add_veth(&self, host: &str, bridge: u32, netns: &OwnedFd) -> Result<(), String> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth0")
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let message = LinkVeth::new(host, "eth0")
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .controller(bridge)
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| describe(&format!("creating veth {host}"), e))?;
        let configured = async {
            let index = self
                .index(host)
                .await?
                .ok_or_else(|| format!("veth {host} vanished right after it was created"))?;
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{host}/disable_ipv6"), "1");
            self.handle
                .link()
                .set_port(
                    LinkBridgePort::new(index)
                        .isolated(true)
                        .learning(true)
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| describe(&format!("isolating bridge port {host}"), e))?;
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|e| describe(&format!("bringing {host} up"), e))
        }
        .await;
        if configured.is_err() {
            let _ = self.delete(host).await;
        }
        configured
    }

    /// Names of the links enslaved to the bridge with index `bridge`.
    pub async fn ports(&self, bridge: u32) -> Result<Vec<String>, String> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| describe("listing links", e))?;
        Ok(links
            .iter()
            .filter(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge))
            })
            .filter_map(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
            })
            .collect())
    }

    /// Inside a microVM's namespace: `eth0` and the VMM's `tap` become the
    /// two ports of a bridge, so the guest's frames reach cove's bridge as
    /// they are. The namespace holds no address: the guest has the
    /// sandbox's.
    pub async fn bridge_guest(&self, tap: &str) -> Result<(), String> {
        const BRIDGE: &str = "br0";
        let bridge = match self.index(BRIDGE).await? {
            Some(index) => index,
            None => {
                let created = self
                    .handle
                    .link()
                    .add(LinkBridge::new(BRIDGE).build())
                    .execute()
                    .await;
                if let Err(e) = created
                    && errno(&e) != Some(EEXIST)
                {
                    return Err(describe("creating the microVM's bridge", e));
                }
                self.index(BRIDGE)
                    .await?
                    .ok_or("the microVM's bridge vanished right after it was created")?
            }
        };
        for port in ["eth0", tap] {
            let index = self
                .index(port)
                .await?
                .ok_or_else(|| format!("the microVM's namespace has no {port}"))?;
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .controller(bridge)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| describe(&format!("bridging {port} to the microVM"), e))?;
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(bridge).up().build())
            .execute()
            .await
            .map_err(|e| describe("bringing the microVM's bridge up", e))
    }

    /// Inside a sandbox: `eth0` gets `addr/prefix` and comes up, and the
    /// default route goes through `gateway`.
    pub async fn configure_eth0(
        &self,
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<(), String> {
        let index = self.index("eth0").await?.ok_or("the sandbox has no eth0")?;
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(|e| describe(&format!("adding {addr}/{prefix} to the sandbox's eth0"), e))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| describe("bringing the sandbox's eth0 up", e))?;
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .output_interface(index)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| describe(&format!("adding the default route via {gateway}"), e))
    }
}

/// A locally administered unicast MAC address derived from the bridge's
/// name (stable across daemon restarts).
fn bridge_mac(name: &str) -> Vec<u8> {
    // FNV-1a: stable, no dependency.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    vec![0x02, 0xc0, h[0], h[1], h[2], h[3]]
}
