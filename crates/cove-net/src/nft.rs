//! cove's nftables table (`inet cove` by default), written with the `nft`
//! binary: each change is one generated script run by `nft -f -`, which
//! the kernel applies as one transaction (all of it or nothing), and the
//! table is read back with `nft -j list table`.
//!
//! ```text
//! table inet cove
//!   set protected            0/8 127/8 169.254/16 224/3 + the pool
//!   map egress  { sandbox address : goto <id>-out }   (forward, from the bridge)
//!   map to_host { sandbox address : goto <id>-in }    (input, from the bridge)
//!   chain forward     from the bridge: v6 drop, established accept, vmap @egress, drop
//!                     to the bridge:   established accept, drop
//!   chain input       from the bridge: v6 drop, established accept, vmap @to_host, drop
//!   chain postrouting masquerade the pool unless it stays on the bridge
//!   chain refuse      TCP reset, else ICMP admin-prohibited
//!   per sandbox <id>: sets <id>-allow <id>-deny <id>-pin <id>-dns,
//!                     chains <id>-out <id>-in
//! ```
//!
//! Only cove's own table is ever changed: no other table is flushed and no
//! other chain's policy is touched. Every per-sandbox object carries the
//! sandbox ID in its name, so teardown and garbage collection are exact.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;

use crate::policy;

/// What the rules of one sandbox need.
#[derive(Debug, Clone, Default)]
pub struct SandboxRules {
    pub address: Option<Ipv4Addr>,
    /// allow_out CIDRs and the addresses its host names resolved to.
    pub allow: Vec<Ipv4Net>,
    /// deny_out CIDRs and the addresses its host names resolved to.
    pub deny: Vec<Ipv4Net>,
    /// allow_out entries that open protected destinations.
    pub pins: Vec<Ipv4Net>,
    /// Whether anything not allowed is refused (allow_out is not empty).
    pub allow_list: bool,
}

/// The objects of cove's table, as listed.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    /// (map, key) of elements whose verdict jumps to a per-sandbox chain,
    /// with that chain.
    pub elements: Vec<(String, String, String)>,
}

impl Listing {
    /// Sandbox IDs that own objects in the table.
    pub fn sandbox_ids(&self) -> BTreeSet<String> {
        self.chains
            .iter()
            .chain(&self.sets)
            .chain(self.elements.iter().map(|(_, _, chain)| chain))
            .filter_map(|name| sandbox_of(name))
            .collect()
    }
}

/// `sbx-1a2b3c4d` from `sbx-1a2b3c4d-out`.
fn sandbox_of(name: &str) -> Option<String> {
    let (id, _) = name.rsplit_once('-')?;
    (id.starts_with("sbx-") && id.len() == 12).then(|| id.to_string())
}

/// The `nft` front end for one table.
#[derive(Debug, Clone)]
pub struct Nft {
    pub table: String,
    pub bridge: String,
}

fn elements(nets: &[Ipv4Net]) -> String {
    let items: Vec<String> = policy::normalize(nets.iter().copied())
        .iter()
        .map(|n| {
            if n.prefix_len() == 32 {
                n.addr().to_string()
            } else {
                n.to_string()
            }
        })
        .collect();
    if items.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", items.join(", "))
    }
}

impl Nft {
    /// The base table: created if missing, its base chains rewritten (in
    /// one transaction, so nothing passes unfiltered meanwhile); the
    /// per-sandbox objects are kept.
    pub fn base_script(&self, pool: Ipv4Net) -> String {
        let (t, b) = (&self.table, &self.bridge);
        let protected = elements(&policy::protected_blocks(pool));
        let mut s = String::new();
        let _ = writeln!(s, "add table inet {t}");
        let _ = writeln!(
            s,
            "add set inet {t} protected {{ type ipv4_addr; flags interval; }}"
        );
        let _ = writeln!(s, "flush set inet {t} protected");
        let _ = writeln!(
            s,
            "add set inet {t} protected {{ type ipv4_addr; flags interval;{protected} }}"
        );
        let _ = writeln!(s, "add map inet {t} egress {{ type ipv4_addr : verdict; }}");
        let _ = writeln!(
            s,
            "add map inet {t} to_host {{ type ipv4_addr : verdict; }}"
        );
        let _ = writeln!(s, "add chain inet {t} refuse");
        let _ = writeln!(
            s,
            "add chain inet {t} forward {{ type filter hook forward priority filter; policy accept; }}"
        );
        let _ = writeln!(
            s,
            "add chain inet {t} input {{ type filter hook input priority filter; policy accept; }}"
        );
        let _ = writeln!(
            s,
            "add chain inet {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
        );
        for chain in ["refuse", "forward", "input", "postrouting"] {
            let _ = writeln!(s, "flush chain inet {t} {chain}");
        }
        let rules = [
            "refuse meta l4proto tcp reject with tcp reset".to_string(),
            "refuse reject with icmpx type admin-prohibited".to_string(),
            // From sandboxes: IPv4 only, and only what their chain allows.
            format!("forward iifname \"{b}\" meta nfproto ipv6 drop"),
            format!("forward iifname \"{b}\" ct state established,related accept"),
            format!("forward iifname \"{b}\" ip saddr vmap @egress"),
            format!("forward iifname \"{b}\" drop"),
            // To sandboxes: only replies; nothing outside opens a connection.
            format!("forward oifname \"{b}\" ct state established,related accept"),
            format!("forward oifname \"{b}\" drop"),
            // To the host itself: DNS on the gateway and what the policy names.
            format!("input iifname \"{b}\" meta nfproto ipv6 drop"),
            format!("input iifname \"{b}\" ct state established,related accept"),
            format!("input iifname \"{b}\" ip saddr vmap @to_host"),
            format!("input iifname \"{b}\" drop"),
            format!("postrouting ip saddr {pool} oifname != \"{b}\" masquerade"),
        ];
        for rule in rules {
            let _ = writeln!(s, "add rule inet {t} {rule}");
        }
        s
    }

    /// Create the objects of sandbox `id` (none may exist yet).
    pub fn sandbox_script(&self, id: &str, gateway: Ipv4Addr, rules: &SandboxRules) -> String {
        let t = &self.table;
        let mut s = String::new();
        let sets = [
            ("allow", elements(&rules.allow)),
            ("deny", elements(&rules.deny)),
            ("pin", elements(&rules.pins)),
        ];
        for (name, elems) in &sets {
            let _ = writeln!(
                s,
                "add set inet {t} {id}-{name} {{ type ipv4_addr; flags interval;{elems} }}"
            );
        }
        let _ = writeln!(s, "add set inet {t} {id}-dns {{ type ipv4_addr; }}");
        let _ = writeln!(s, "add chain inet {t} {id}-out");
        let _ = writeln!(s, "add chain inet {t} {id}-in");
        let last = if rules.allow_list {
            "goto refuse"
        } else {
            "accept"
        };
        let out = [
            format!("ip daddr @{id}-deny goto refuse"),
            format!("ip daddr @{id}-pin accept"),
            "ip daddr @protected goto refuse".to_string(),
            format!("ip daddr @{id}-allow accept"),
            format!("ip daddr @{id}-dns accept"),
            last.to_string(),
        ];
        for rule in out {
            let _ = writeln!(s, "add rule inet {t} {id}-out {rule}");
        }
        let input = [
            format!("ip daddr {gateway} udp dport 53 accept"),
            format!("ip daddr {gateway} tcp dport 53 accept"),
            format!("ip daddr @{id}-deny goto refuse"),
            format!("ip daddr @{id}-pin accept"),
            "goto refuse".to_string(),
        ];
        for rule in input {
            let _ = writeln!(s, "add rule inet {t} {id}-in {rule}");
        }
        if let Some(addr) = rules.address {
            let _ = writeln!(
                s,
                "add element inet {t} egress {{ {addr} : goto {id}-out }}"
            );
            let _ = writeln!(
                s,
                "add element inet {t} to_host {{ {addr} : goto {id}-in }}"
            );
        }
        s
    }

    /// Remove every object of the sandboxes in `ids` that `listing` shows.
    pub fn delete_script(&self, listing: &Listing, ids: &BTreeSet<String>) -> String {
        let t = &self.table;
        let mine = |name: &str| sandbox_of(name).is_some_and(|id| ids.contains(&id));
        let mut s = String::new();
        for (map, key, chain) in &listing.elements {
            if mine(chain) {
                let _ = writeln!(s, "delete element inet {t} {map} {{ {key} }}");
            }
        }
        for chain in listing.chains.iter().filter(|c| mine(c)) {
            let _ = writeln!(s, "flush chain inet {t} {chain}");
        }
        for chain in listing.chains.iter().filter(|c| mine(c)) {
            let _ = writeln!(s, "delete chain inet {t} {chain}");
        }
        for set in listing.sets.iter().filter(|c| mine(c)) {
            let _ = writeln!(s, "delete set inet {t} {set}");
        }
        s
    }

    /// Let sandbox `id` reach `addrs` (resolved by the DNS forwarder).
    pub fn dns_script(&self, id: &str, addrs: &[Ipv4Addr]) -> String {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        format!(
            "add element inet {} {id}-dns {{ {} }}\n",
            self.table,
            list.join(", ")
        )
    }

    pub fn delete_table_script(&self) -> String {
        format!("delete table inet {}\n", self.table)
    }

    /// Run a script as one transaction.
    pub async fn apply(&self, script: &str) -> Result<(), String> {
        if script.is_empty() {
            return Ok(());
        }
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run nft: {e} (install the nftables package: apt-get install nftables)"
                )
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| format!("nft stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft refused the ruleset: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// List cove's table; `None` when it does not exist.
    pub async fn list(&self) -> Result<Option<Listing>, String> {
        let out = tokio::process::Command::new("nft")
            .args(["-j", "list", "table", "inet", &self.table])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                format!(
                    "cannot run nft: {e} (install the nftables package: apt-get install nftables)"
                )
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(format!("nft list table: {}", err.trim()));
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("nft printed something that is not JSON: {e}"))?;
        Ok(Some(parse_listing(&json)))
    }
}

fn parse_listing(json: &serde_json::Value) -> Listing {
    let mut listing = Listing::default();
    let items = json["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        if let Some(name) = item["chain"]["name"].as_str() {
            listing.chains.insert(name.to_string());
        }
        if let Some(name) = item["set"]["name"].as_str() {
            listing.sets.insert(name.to_string());
        }
        if let Some(map) = item["map"]["name"].as_str() {
            for elem in item["map"]["elem"].as_array().into_iter().flatten() {
                let (Some(key), Some(verdict)) = (elem[0].as_str(), elem[1].as_object()) else {
                    continue;
                };
                let target = verdict
                    .values()
                    .find_map(|v| v["target"].as_str())
                    .unwrap_or_default();
                listing
                    .elements
                    .push((map.to_string(), key.to_string(), target.to_string()));
            }
        }
    }
    listing
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn listing_finds_sandbox_objects() {
        let json: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {}}, {"table": {"name": "cove"}},
            {"set": {"name": "protected"}}, {"set": {"name": "sbx-abcd1234-allow"}},
            {"map": {"name": "egress", "elem": [["10.88.0.2", {"goto": {"target": "sbx-abcd1234-out"}}]]}},
            {"chain": {"name": "forward"}}, {"chain": {"name": "sbx-abcd1234-out"}},
            {"chain": {"name": "sbx-zzzz9999-in"}}]}"#,
        )
        .unwrap();
        let listing = parse_listing(&json);
        assert_eq!(
            listing.sandbox_ids().into_iter().collect::<Vec<_>>(),
            vec!["sbx-abcd1234", "sbx-zzzz9999"]
        );
        let nft = Nft {
            table: "cove".into(),
            bridge: "cove0".into(),
        };
        let script = nft.delete_script(&listing, &["sbx-abcd1234".to_string()].into());
        assert_eq!(
            script,
            "delete element inet cove egress { 10.88.0.2 }\n\
             flush chain inet cove sbx-abcd1234-out\n\
             delete chain inet cove sbx-abcd1234-out\n\
             delete set inet cove sbx-abcd1234-allow\n"
        );
    }
}
