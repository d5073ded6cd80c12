//! sluice: an io_uring-native artifact cache server.
#![forbid(unsafe_code)]
pub mod auth;
pub mod config;
pub mod fallback;
pub mod http1;
pub mod metrics;
pub mod route;
pub mod store;
