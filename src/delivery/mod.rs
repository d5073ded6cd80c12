//! Delivery of acknowledged writes to other targets, shared by the peers
//! (`crate::replication`) and the object-store tier (`crate::tier`):
//!
//! - [`outbox`]: the durable log every acknowledged write is appended to
//!   before its 2xx, with one cursor per target;
//! - [`cursor`]: a target's position in it, sans-IO (in flight, retries,
//!   the durable acknowledged offset);
//! - [`backoff`]: when to try a failing target again, sans-IO;
//! - [`limiter`]: the one token bucket all background bytes draw from,
//!   yielding to public pressure, sans-IO at its core;
//! - [`lag`]: what a target is not known to hold (writes, bytes, the
//!   oldest's age), added up over the parts that hold it;
//! - [`series`]: labelled counters for `/metrics`.
//!
//! Nothing here knows what a peer or a bucket is: each user brings its own
//! transport and drives these with the real clock; the tests drive them
//! with a fake one.

pub mod backoff;
pub mod cursor;
pub mod lag;
pub mod limiter;
pub mod outbox;
pub mod series;

pub use backoff::{Backoff, Rng};
pub use cursor::{Next, OutboxCursor};
pub use lag::Lag;
pub use limiter::Limiter;
pub use series::Series;
