//! Connections per client address (`connections_per_ip_max`), as a plain counting policy.
//!
//! Both fronts use it: each ring engine thread owns one (no lock on the accept path), and the
//! fallback keeps one beside its slot table. It only counts and decides; closing a refused
//! connection is the caller's business. The map holds one entry per address with at least one
//! open connection, so its size is bounded by the connections the caller already bounds.

use std::collections::HashMap;
use std::net::IpAddr;

/// Open connections per client address, refusing past a cap.
#[derive(Debug)]
pub struct AddressCap {
    /// Cap per address; 0 = no cap (only counted).
    per_ip_max: usize,
    counts: HashMap<IpAddr, usize>,
}

impl AddressCap {
    /// A table with `per_ip_max` connections per address (0 = no cap).
    pub fn new(per_ip_max: usize) -> AddressCap {
        AddressCap {
            per_ip_max,
            counts: HashMap::new(),
        }
    }

    /// Counts one more connection from `ip`, or returns false (and counts nothing) when the
    /// address already holds `per_ip_max`.
    pub fn try_add(&mut self, ip: IpAddr) -> bool {
        let count = self.counts.entry(canonical(ip)).or_insert(0);
        if self.per_ip_max != 0 && *count >= self.per_ip_max {
            return false;
        }
        *count += 1;
        true
    }

    /// One connection from `ip` closed. A removal without an add is ignored.
    pub fn remove(&mut self, ip: IpAddr) {
        let ip = canonical(ip);
        if let Some(count) = self.counts.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.counts.remove(&ip);
            }
        }
    }

    /// The cap per address (0 = no cap).
    pub fn per_ip_max(&self) -> usize {
        self.per_ip_max
    }

    /// Open connections from `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.counts.get(&canonical(ip)).copied().unwrap_or(0)
    }

    /// Addresses with at least one open connection.
    pub fn addresses(&self) -> usize {
        self.counts.len()
    }
}

/// An IPv4 client reaching a dual-stack socket shows up as `::ffff:a.b.c.d`; it is the same
/// client as `a.b.c.d` and must share its count.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_frees_on_remove() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut t = AddressCap::new(2);
        assert!(t.try_add(a));
        assert!(t.try_add(a));
        assert!(!t.try_add(a), "third from one address");
        assert!(t.try_add(b), "another address is not affected");
        assert_eq!(t.count(a), 2);
        t.remove(a);
        assert!(t.try_add(a));
        t.remove(a);
        t.remove(a);
        t.remove(b);
        assert_eq!(t.addresses(), 0, "empty entries are dropped");
        t.remove(b);
        assert_eq!(t.count(b), 0);
    }

    #[test]
    fn zero_means_no_cap_and_mapped_v4_is_v4() {
        let mut t = AddressCap::new(0);
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..10_000 {
            assert!(t.try_add(v4));
        }
        let mut t = AddressCap::new(1);
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert!(t.try_add(v4));
        assert!(!t.try_add(mapped));
    }
}
