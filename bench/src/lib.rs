//! `sluice-bench`: an HTTP/1.1 load generator with HdrHistogram reports, a loopback-bound probe
//! and side-by-side server comparisons. It measures any HTTP/1.1 server, not only sluice.

pub mod burst;
pub mod client;
pub mod compare;
pub mod disk;
pub mod grpc;
pub mod h2floor;
pub mod h2load;
pub mod loopback;
pub mod peers;
pub mod plot;
pub mod record;
pub mod report;
pub mod request;
pub mod run;
pub mod sys;
