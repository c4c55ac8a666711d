//! The control crate's test helpers: the shared ones from `testkit`, and how to start this
//! crate's binaries.

#![allow(dead_code, unused_imports)] // Each test file uses its own subset.

pub use testkit::*;

pub const PING_MONITOR: &str = env!("CARGO_BIN_EXE_ping-monitor");
pub const HL_SERVICE: &str = env!("CARGO_BIN_EXE_hl-service");
pub const HL_CLI: &str = env!("CARGO_BIN_EXE_hl-cli");

/// Starts a ping-monitor on loopback with `extra` flags.
pub async fn start_monitor(extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
        "--ping-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    start_daemon(PING_MONITOR, &args).await
}
