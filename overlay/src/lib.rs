//! What every program of multi-tier-cloud shares, the sidecar proxy included: the overlay and
//! the wire protocols spoken over it, and the plumbing of a long-running program. No etcd and
//! no Docker code lives here (those are `control`'s, behind its features), so that nothing a
//! build does can link them into the proxy; `scripts/test.sh` checks the built binary.
//!
//! - [`overlay`]: the libp2p network every program joins, with discovery by namespace.
//! - [`rpc`]: typed request-response control protocols over overlay streams.
//! - [`rtt`]: sliding-window RTT histograms per peer.
//! - [`blob`]: content-addressed blobs on disk and their transfer over the overlay.
//! - [`lookup`]: service records, the lookup protocol and its client.
//! - [`allocator`]: the protocol to ask an allocator for an instance, and the contract with
//!   the instances it starts.
//! - [`common`]: what every binary shares: flags and config files, logs, the metrics endpoint,
//!   shutdown on signals.
#![warn(missing_docs)]

pub mod allocator;
pub mod blob;
pub mod common;
pub mod lookup;
pub mod overlay;
pub mod rpc;
pub mod rtt;
