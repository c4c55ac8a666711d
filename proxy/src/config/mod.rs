//! The proxy's configuration file.

pub mod live;
pub mod perf;
