//! The proxy's configuration file.

pub mod perf;
