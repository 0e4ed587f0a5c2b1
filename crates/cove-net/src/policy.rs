//! Egress policy: the entries of `allow_out` / `deny_out`, what they
//! match, and which destinations stay closed unless named.
//!
//! A destination is reachable when
//! 1. no `deny_out` entry matches it, and
//! 2. it is not *protected* (the host, the sandbox pool, 0.0.0.0/8,
//!    127.0.0.0/8, 169.254.0.0/16, multicast and reserved space) — unless an
//!    `allow_out` entry *names* it: a single address, or a CIDR that lies
//!    inside a protected block — and
//! 3. `allow_out` is empty, or an `allow_out` entry matches it.
//!
//! Host names match the addresses they resolve to (at create time, and
//! through cove's DNS forwarder later). They never open a protected
//! destination: a name that resolves to 169.254.169.254 stays closed, so
//! DNS rebinding cannot reach the metadata service.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Blocks a sandbox never reaches unless its policy names them. The
/// sandbox pool is added by the caller; the host's own addresses are
/// reached through the INPUT hook, which only opens named addresses.
pub const PROTECTED: [(Ipv4Addr, u8); 4] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    // Multicast, reserved, and the limited broadcast.
    (Ipv4Addr::new(224, 0, 0, 0), 3),
];

/// One entry of `allow_out` or `deny_out`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An address (as a /32) or a CIDR.
    Net(Ipv4Net),
    /// A host name, lowercase, without a trailing dot.
    Name(String),
    /// `*.example.com`: every name below `example.com` (not itself).
    Suffix(String),
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network.{field}: {message}")]
pub struct PolicyError {
    pub field: &'static str,
    pub message: String,
}

impl Target {
    /// Parse an entry of the list called `field`.
    pub fn parse(entry: &str, field: &'static str) -> Result<Target, PolicyError> {
        let err = |message: String| PolicyError { field, message };
        let s = entry.trim();
        if s.is_empty() {
            return Err(err("an entry is empty".into()));
        }
        if s.contains(':') {
            return Err(err(format!(
                "{entry:?} is IPv6 or has a port; cove's egress is IPv4 only, \
                 give an IPv4 address, a CIDR or a host name"
            )));
        }
        if let Some((addr, len)) = s.split_once('/') {
            let addr: Ipv4Addr = addr.parse().map_err(|_| {
                err(format!(
                    "{entry:?} is not a CIDR: {addr:?} is not an IPv4 address"
                ))
            })?;
            let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| {
                err(format!(
                    "{entry:?} is not a CIDR: the prefix length must be 0-32"
                ))
            })?;
            let net = Ipv4Net::new(addr, len)
                .map_err(|e| err(format!("{entry:?} is not a CIDR: {e}")))?;
            return Ok(Target::Net(net.trunc()));
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            let addr: Ipv4Addr = s
                .parse()
                .map_err(|_| err(format!("{entry:?} is not a valid IPv4 address")))?;
            return Ok(Target::Net(Ipv4Net::from(addr)));
        }
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        if !valid_host_name(&name) {
            return Err(err(format!(
                "{entry:?} is not an IPv4 address, a CIDR, a host name or *.domain"
            )));
        }
        Ok(if wild {
            Target::Suffix(name)
        } else {
            Target::Name(name)
        })
    }

    /// Whether this entry matches the host name `name` (lowercase).
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Net(_) => false,
            Target::Name(n) => n == name,
            Target::Suffix(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Net(net) if net.prefix_len() == 32 => write!(f, "{}", net.addr()),
            Target::Net(net) => write!(f, "{net}"),
            Target::Name(n) => write!(f, "{n}"),
            Target::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // An all-numeric name would be an address; refuse the ambiguity.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A parsed, validated policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<Target>,
    pub deny: Vec<Target>,
}

impl Policy {
    pub fn parse(allow_out: &[String], deny_out: &[String]) -> Result<Policy, PolicyError> {
        const MAX: usize = 1024;
        if allow_out.len() > MAX || deny_out.len() > MAX {
            return Err(PolicyError {
                field: if allow_out.len() > MAX {
                    "allow_out"
                } else {
                    "deny_out"
                },
                message: format!("at most {MAX} entries"),
            });
        }
        let allow = allow_out
            .iter()
            .map(|e| Target::parse(e, "allow_out"))
            .collect::<Result<Vec<_>, _>>()?;
        let deny = deny_out
            .iter()
            .map(|e| Target::parse(e, "deny_out"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { allow, deny })
    }

    /// Host names (not wildcards) to resolve at create time.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.allow.iter().chain(&self.deny).filter_map(|t| match t {
            Target::Name(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Whether cove's DNS forwarder answers queries for `name`.
    ///
    /// Denied names never resolve. With an empty `allow_out` every other
    /// name does; otherwise only the names and wildcards it lists (a
    /// CIDR-only allow list resolves nothing: queries for other names
    /// would leak data to the upstream resolver).
    pub fn resolves(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.deny.iter().any(|t| t.matches_name(&name)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|t| t.matches_name(&name))
    }

    /// Whether the allow list restricts egress (it is not "everything public").
    pub fn is_allow_list(&self) -> bool {
        !self.allow.is_empty()
    }

    /// CIDR entries of `allow_out`.
    pub fn allow_nets(&self) -> Vec<Ipv4Net> {
        nets(&self.allow)
    }

    /// CIDR entries of `deny_out`.
    pub fn deny_nets(&self) -> Vec<Ipv4Net> {
        nets(&self.deny)
    }

    /// `allow_out` entries that open protected destinations: single
    /// addresses, and CIDRs that lie inside a protected block (`pool`
    /// included).
    pub fn pins(&self, pool: Ipv4Net) -> Vec<Ipv4Net> {
        let protected = protected_blocks(pool);
        nets(&self.allow)
            .into_iter()
            .filter(|n| n.prefix_len() == 32 || protected.iter().any(|p| p.contains(n)))
            .collect()
    }
}

fn nets(targets: &[Target]) -> Vec<Ipv4Net> {
    targets
        .iter()
        .filter_map(|t| match t {
            Target::Net(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// Every protected block, with the sandbox pool.
pub fn protected_blocks(pool: Ipv4Net) -> Vec<Ipv4Net> {
    let mut blocks: Vec<Ipv4Net> = PROTECTED
        .iter()
        .filter_map(|(a, l)| Ipv4Net::new(*a, *l).ok())
        .collect();
    blocks.push(pool.trunc());
    blocks
}

/// The smallest list of CIDRs covering the same addresses: entries inside
/// others are dropped (nftables refuses overlapping interval elements).
pub fn normalize(nets: impl IntoIterator<Item = Ipv4Net>) -> Vec<Ipv4Net> {
    let all: Vec<Ipv4Net> = nets.into_iter().map(|n| n.trunc()).collect();
    Ipv4Net::aggregate(&all)
}

/// `a` without the addresses of `b`, as CIDRs.
pub fn subtract(a: Ipv4Net, b: Ipv4Net) -> Vec<Ipv4Net> {
    if !a.contains(&b.network()) && !b.contains(&a.network()) {
        return vec![a];
    }
    if b.contains(&a) {
        return Vec::new();
    }
    // `a` strictly contains `b`: keep the half without `b`, split the other.
    let Ok(halves) = a.subnets(a.prefix_len() + 1) else {
        return vec![a];
    };
    halves
        .flat_map(|half| {
            if half.contains(&b.network()) {
                subtract(half, b)
            } else {
                vec![half]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn entries_parse_or_name_the_culprit() {
        assert_eq!(
            Target::parse("10.1.2.3", "allow_out").unwrap(),
            Target::Net(net("10.1.2.3/32"))
        );
        assert_eq!(
            Target::parse("10.1.2.3/8", "allow_out").unwrap(),
            Target::Net(net("10.0.0.0/8"))
        );
        assert_eq!(
            Target::parse("PyPI.org.", "allow_out").unwrap(),
            Target::Name("pypi.org".into())
        );
        assert_eq!(
            Target::parse("*.example.com", "deny_out").unwrap(),
            Target::Suffix("example.com".into())
        );
        for bad in [
            "10.0.0.0/33",
            "300.1.1.1/8",
            "10.0.0/8",
            "1.2.3.400",
            "::1",
            "fd00::/8",
            "http://x",
            "a b",
            "-x.com",
            "",
            "example.com:443",
        ] {
            let e = Target::parse(bad, "allow_out").unwrap_err().to_string();
            assert!(e.starts_with("network.allow_out: "), "{e}");
            if !bad.is_empty() {
                assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
            }
        }
    }

    #[test]
    fn dns_follows_the_lists() {
        let p = Policy::parse(
            &[
                "pypi.org".into(),
                "*.github.com".into(),
                "10.0.0.0/8".into(),
            ],
            &["evil.github.com".into()],
        )
        .unwrap();
        assert!(p.resolves("pypi.org"));
        assert!(p.resolves("PYPI.org."));
        assert!(p.resolves("api.github.com"));
        assert!(!p.resolves("github.com"));
        assert!(!p.resolves("evil.github.com"));
        assert!(!p.resolves("example.com"));
        assert!(!p.resolves("xpypi.org"));
        let open = Policy::parse(&[], &["*.tracker.test".into()]).unwrap();
        assert!(open.resolves("example.com"));
        assert!(!open.resolves("a.tracker.test"));
        let cidr_only = Policy::parse(&["10.0.0.0/8".into()], &[]).unwrap();
        assert!(!cidr_only.resolves("example.com"));
    }

    #[test]
    fn pins_are_named_protected_destinations() {
        let pool = net("10.88.0.0/16");
        let p = Policy::parse(
            &[
                "0.0.0.0/0".into(),
                "10.0.0.0/8".into(),
                "169.254.169.254".into(),
                "10.88.0.0/24".into(),
                "192.168.1.7".into(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            p.pins(pool),
            vec![
                net("169.254.169.254/32"),
                net("10.88.0.0/24"),
                net("192.168.1.7/32")
            ]
        );
    }

    #[test]
    fn subtraction_and_normalization() {
        let rest = subtract(net("10.0.0.0/8"), net("10.1.2.3/32"));
        assert_eq!(rest.len(), 24);
        assert!(
            !rest
                .iter()
                .any(|n| n.contains(&"10.1.2.3".parse::<Ipv4Addr>().unwrap()))
        );
        assert!(
            rest.iter()
                .any(|n| n.contains(&"10.1.2.4".parse::<Ipv4Addr>().unwrap()))
        );
        let total: u64 = rest.iter().map(|n| 1u64 << (32 - n.prefix_len())).sum();
        assert_eq!(total, (1 << 24) - 1);
        assert_eq!(
            subtract(net("10.0.0.0/8"), net("11.0.0.0/8")),
            vec![net("10.0.0.0/8")]
        );
        assert!(subtract(net("10.1.0.0/16"), net("10.0.0.0/8")).is_empty());
        assert_eq!(
            normalize([net("10.0.0.0/8"), net("10.1.2.3/32"), net("1.2.3.4/32")]),
            vec![net("1.2.3.4/32"), net("10.0.0.0/8")]
        );
    }
}
