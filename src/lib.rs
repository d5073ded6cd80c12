//! sluice: an io_uring-native artifact cache server.
#![forbid(unsafe_code)]
pub mod app;
pub mod auth;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod fallback;
pub mod front;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http1;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod outgoing;
pub mod peer_limit;
pub mod pressure;
pub mod replication;
pub mod route;
pub mod server;
pub mod single_flight;
pub mod store;
pub mod tier;
