//! The `ping-monitor`: the overlay's first bootstrap node, which also measures the RTT to every
//! connected peer and exports it to Prometheus and as JSON.

pub mod app;
pub mod exporter;
