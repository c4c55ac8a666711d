//! Control plane of multi-tier-cloud. What the proxy shares with it (overlay, RPC, RTT
//! windows, blobs, the lookup and allocator protocols, daemon plumbing) is the `mtc-overlay`
//! crate, re-exported here under the same paths.
//!
//! - [`overlay`]: the libp2p network every program joins, with discovery by namespace.
//! - [`rpc`]: typed request-response control protocols over overlay streams.
//! - [`rtt`]: sliding-window RTT histograms per peer.
//! - [`blob`]: content-addressed blobs on disk and their transfer over the overlay.
//! - [`lookup`]: service records (name -> artifact) and the hl-service / hl-cli programs.
//! - [`allocator`]: starting service instances on demand: its protocol, port and instance
//!   bookkeeping, and the `allocator` program.
//! - [`monitor`]: the `ping-monitor` bootstrap node and its Prometheus export.
//! - [`check`]: the `check` program, a health report of a network from one machine.
//! - [`common`]: what every binary shares: flags and config files, logs, the metrics endpoint,
//!   shutdown on signals.
#![warn(missing_docs)]

pub mod allocator;
pub mod check;
pub mod lookup;
pub mod monitor;

pub use mtc_overlay::{blob, common, overlay, rpc, rtt};
