//! Labelled counters and gauges, for the parts that count per target
//! (peers, the tier) off the public fast path.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// Labelled counters and gauges for `/metrics`, written by background
/// threads and the peer API (never by the public fast path).
#[derive(Default)]
pub struct Series {
    values: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Series {
    pub fn add(&self, name: &'static str, labels: String, n: u64) {
        let mut v = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        *v.entry((name, labels)).or_default() += n;
    }

    pub fn set(&self, name: &'static str, labels: String, n: u64) {
        let mut v = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        v.insert((name, labels), n);
    }

    pub fn get(&self, name: &'static str, labels: &str) -> u64 {
        let v = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        v.get(&(name, labels.to_string())).copied().unwrap_or(0)
    }

    /// Every series and its value, in name order.
    pub fn snapshot(&self) -> Vec<((&'static str, String), u64)> {
        let v = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        v.iter().map(|(k, n)| (k.clone(), *n)).collect()
    }
}
