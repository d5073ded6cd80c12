//! Checks of what a node says about its peers against what the peers hold.
//!
//! [`Ledger`] keeps every write a test had acknowledged by a node (and
//! when), and checks the node's lag gauge for a peer against the peer's own
//! store: the gauge read first, then the peer asked for each write
//! acknowledged before that read, through its peer API
//! (`HEAD /_peer/v1/get/{ns}/{key}`, which answers from its store only: no
//! read-through from other peers or the object-store tier). A write the
//! peer lacks then was lacking at the read too, so a gauge at zero with
//! such a write missing is a lie, whatever the timing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{metric_at, parse_response, sha256_hex, Resp};

/// What the peer should hold for a key once it has everything.
#[derive(Clone, Debug)]
pub enum Want {
    /// This body (its sha256, hex).
    Body { sha256: String },
    /// Nothing: the key was deleted.
    Gone,
}

/// One acknowledged write or delete.
#[derive(Clone, Debug)]
pub struct Acked {
    pub path: String,
    pub want: Want,
    pub at: Instant,
}

/// Writes acknowledged by one node, and which of them a peer was last
/// seen to hold.
pub struct Ledger {
    /// The mesh's peer secret: the checks use the peer API.
    secret: String,
    writes: Vec<Acked>,
    /// Index of the first write not yet seen on the peer; those before are
    /// held (a held write stays held: the tests delete before they check).
    held_upto: usize,
    /// Writes after `held_upto` seen held already.
    held: Vec<bool>,
}

/// One look at the node and the peer.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// `sluice_replication_lag_writes` (or the tier's) when looked at.
    pub lag_writes: f64,
    /// Writes acknowledged before that read which the peer lacked after it.
    pub missing: usize,
}

impl Ledger {
    /// An empty ledger checking peers with `secret`.
    pub fn new(secret: &str) -> Ledger {
        Ledger {
            secret: secret.to_string(),
            writes: Vec::new(),
            held_upto: 0,
            held: Vec::new(),
        }
    }

    pub fn put(&mut self, path: &str, body: &[u8]) {
        self.push(Acked {
            path: path.to_string(),
            want: Want::Body {
                sha256: sha256_hex(body),
            },
            at: Instant::now(),
        });
    }

    pub fn deleted(&mut self, path: &str) {
        self.push(Acked {
            path: path.to_string(),
            want: Want::Gone,
            at: Instant::now(),
        });
    }

    fn push(&mut self, a: Acked) {
        // A later write of the same key replaces what the peer should hold.
        if let Some(i) = self.writes.iter().position(|w| w.path == a.path) {
            self.writes.remove(i);
            if i < self.held_upto {
                self.held_upto = i;
            }
            self.held = vec![false; self.writes.len() - self.held_upto];
        }
        self.writes.push(a);
        self.held.push(false);
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn writes(&self) -> &[Acked] {
        &self.writes
    }

    /// Writes acknowledged before `t` that `peer`'s store lacks.
    pub fn missing_on(&mut self, peer: SocketAddr, t: Instant) -> usize {
        let mut missing = 0;
        for i in self.held_upto..self.writes.len() {
            let w = &self.writes[i];
            if w.at > t {
                continue;
            }
            let slot = i - self.held_upto;
            if self.held[slot] {
                continue;
            }
            if holds(peer, &self.secret, w) {
                self.held[slot] = true;
            } else {
                missing += 1;
            }
        }
        while self.held.first() == Some(&true) {
            self.held.remove(0);
            self.held_upto += 1;
        }
        missing
    }

    /// Read `gauge` (writes) on `node`, then what `peer` lacks.
    pub fn sample(&mut self, node: SocketAddr, gauge: &Gauge, peer: SocketAddr) -> Sample {
        let t = Instant::now();
        let lag_writes = gauge.read(node);
        let missing = self.missing_on(peer, t);
        Sample {
            lag_writes,
            missing,
        }
    }

    /// Sample until the gauge reads zero: every sample must satisfy "zero
    /// only when the peer holds everything acknowledged", and zero must come
    /// within `after_held` of the peer holding everything. Returns how long
    /// after the start the peer held everything. Panics naming `what`.
    pub fn converge(
        &mut self,
        what: &str,
        node: SocketAddr,
        gauge: &Gauge,
        peer: SocketAddr,
        timeout: Duration,
        after_held: Duration,
    ) -> Duration {
        let started = Instant::now();
        let mut held_at: Option<Instant> = None;
        let mut samples = 0u64;
        loop {
            let s = self.sample(node, gauge, peer);
            samples += 1;
            assert!(
                !(s.lag_writes == 0.0 && s.missing > 0),
                "{what}: the lag gauge read 0 while the peer lacked {} acknowledged writes \
                 (sample {samples})",
                s.missing
            );
            if s.missing == 0 && held_at.is_none() && self.missing_on(peer, Instant::now()) == 0 {
                held_at = Some(Instant::now());
            }
            if s.missing > 0 {
                held_at = None;
            }
            if s.lag_writes == 0.0 && s.missing == 0 && self.missing_on(peer, Instant::now()) == 0 {
                let held = held_at.unwrap_or_else(Instant::now);
                return held.duration_since(started);
            }
            if let Some(h) = held_at {
                assert!(
                    h.elapsed() <= after_held,
                    "{what}: the peer held everything for {:?} and the gauge still read {}",
                    h.elapsed(),
                    s.lag_writes
                );
            }
            assert!(
                started.elapsed() < timeout,
                "{what}: not converged in {timeout:?}: gauge {}, peer lacks {}",
                s.lag_writes,
                s.missing
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Which lag gauge to read.
pub enum Gauge {
    /// `sluice_replication_lag_writes{peer="127.0.0.1:PORT"}`.
    Peer(u16),
    /// `sluice_tier_lag_writes`.
    Tier,
}

impl Gauge {
    pub fn read(&self, node: SocketAddr) -> f64 {
        match self {
            Gauge::Peer(port) => metric_at(
                node,
                "sluice_replication_lag_writes",
                &[&format!("peer=\"127.0.0.1:{port}\"")],
            ),
            Gauge::Tier => metric_at(node, "sluice_tier_lag_writes", &[]),
        }
    }

    /// The bytes and the oldest's age that go with it.
    pub fn bytes_and_age(&self, node: SocketAddr) -> (f64, f64) {
        match self {
            Gauge::Peer(port) => {
                let label = format!("peer=\"127.0.0.1:{port}\"");
                (
                    metric_at(node, "sluice_replication_lag_bytes", &[&label]),
                    metric_at(node, "sluice_replication_lag_seconds", &[&label]),
                )
            }
            Gauge::Tier => (
                metric_at(node, "sluice_tier_lag_bytes", &[]),
                metric_at(node, "sluice_tier_lag_seconds", &[]),
            ),
        }
    }
}

/// Whether `peer`'s own store holds what `w` wants: its peer API's
/// `HEAD /_peer/v1/get/{ns}/{key}` answers from the store alone, with the
/// body's sha256; a delete wants a 404. Any failure to ask counts as not
/// held.
pub fn holds(peer: SocketAddr, secret: &str, w: &Acked) -> bool {
    let (ns, key) = namespace_and_key(&w.path);
    let auth = format!("SluicePeer {secret}");
    let Some(resp) = try_head(peer, &format!("/_peer/v1/get/{ns}/{key}"), &auth) else {
        return false;
    };
    match &w.want {
        Want::Body { sha256 } => {
            resp.status == 200 && resp.header("x-sluice-sha256") == Some(sha256.as_str())
        }
        Want::Gone => resp.status == 404,
    }
}

/// The namespace and key a public path stores under.
pub fn namespace_and_key(path: &str) -> (String, String) {
    let path = path.trim_start_matches('/');
    let (first, rest) = path.split_once('/').unwrap_or((path, ""));
    match first {
        "cas" | "ac" => (first.to_string(), rest.to_string()),
        "cache" => ("gradle".to_string(), rest.to_string()),
        "v1" => {
            let rest = rest.strip_prefix("artifacts/").unwrap_or(rest);
            let (ns, key) = rest.split_once('/').unwrap_or((rest, ""));
            (ns.to_string(), key.to_string())
        }
        _ => panic!("no namespace for {path}"),
    }
}

/// A HEAD on a fresh connection with `authorization`; `None` when the node
/// does not answer (down, stopped, cut off) within 5 s.
pub fn try_head(addr: SocketAddr, path: &str, authorization: &str) -> Option<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let head = format!(
        "HEAD {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out, true).map(|(r, _)| r)
}
