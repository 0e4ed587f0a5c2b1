//! Addresses of sandboxes on the bridge. The pool's first address is the
//! bridge's (the gateway and DNS server); every egress sandbox takes one
//! other address. Allocation goes round the pool, so an address freed now
//! is the last to be handed out again (stale conntrack entries of the old
//! owner age out first). The allocation itself is not stored: after a
//! restart it is rebuilt from the addresses of the sandboxes found again.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug)]
pub struct Pool {
    net: Ipv4Net,
    used: BTreeSet<u32>,
    next: u32,
}

impl Pool {
    /// A pool over `net`, which must leave room for the gateway and one
    /// sandbox (a /30 at least).
    pub fn new(net: Ipv4Net) -> Result<Pool, String> {
        let net = net.trunc();
        if net.prefix_len() > 30 {
            return Err(format!(
                "the sandbox pool {net} is too small: use a /30 or larger"
            ));
        }
        Ok(Pool {
            net,
            used: BTreeSet::new(),
            next: 0,
        })
    }

    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    /// The bridge's address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network()) + 1)
    }

    fn range(&self) -> (u32, u32) {
        // Neither the network address, the gateway nor the broadcast.
        (
            u32::from(self.net.network()) + 2,
            u32::from(self.net.broadcast()) - 1,
        )
    }

    /// Take a free address.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let (first, last) = self.range();
        let size = last - first + 1;
        let start = self.next.clamp(first, last);
        for i in 0..size {
            let candidate = first + (start - first + i) % size;
            if self.used.insert(candidate) {
                self.next = candidate + 1;
                return Some(Ipv4Addr::from(candidate));
            }
        }
        None
    }

    /// Mark `addr` as taken (a sandbox found again after a restart).
    /// False when it is outside the pool or already taken.
    pub fn reserve(&mut self, addr: Ipv4Addr) -> bool {
        let (first, last) = self.range();
        let a = u32::from(addr);
        (first..=last).contains(&a) && self.used.insert(a)
    }

    pub fn release(&mut self, addr: Ipv4Addr) {
        self.used.remove(&u32::from(addr));
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn allocation_goes_round_and_skips_reserved() {
        let mut pool = Pool::new("10.9.0.0/29".parse().unwrap()).unwrap();
        assert_eq!(pool.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        assert!(pool.reserve(Ipv4Addr::new(10, 9, 0, 3)));
        assert!(!pool.reserve(Ipv4Addr::new(10, 9, 0, 3)));
        assert!(!pool.reserve(Ipv4Addr::new(10, 9, 0, 7)));
        let got: Vec<Ipv4Addr> = std::iter::from_fn(|| pool.allocate()).collect();
        assert_eq!(
            got,
            [2, 4, 5, 6]
                .iter()
                .map(|h| Ipv4Addr::new(10, 9, 0, *h))
                .collect::<Vec<_>>()
        );
        pool.release(Ipv4Addr::new(10, 9, 0, 4));
        pool.release(Ipv4Addr::new(10, 9, 0, 2));
        // Round-robin: the search resumes after the last one handed out.
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(10, 9, 0, 4)));
        assert_eq!(pool.allocate(), None);
        assert!(Pool::new("10.9.0.0/31".parse().unwrap()).is_err());
    }
}
