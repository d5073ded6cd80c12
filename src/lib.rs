//! sluice: an io_uring-native artifact cache server.
#![forbid(unsafe_code)]
pub mod action_result;
pub mod address_cap;
pub mod app;
pub mod auth;
pub mod background;
pub mod config;
pub mod delivery;
pub mod doctor;
pub mod engine;
pub mod exchange;
pub mod fallback;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod group_sync;
pub mod heap;
pub mod http1;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod outgoing;
pub mod pressure;
pub mod reapi;
pub mod replication;
pub mod route;
pub mod server;
pub mod single_flight;
pub mod store;
pub mod tier;
