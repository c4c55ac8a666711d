//! Data plane of multi-tier-cloud: the proxy that is both the local HTTP ingress and the
//! sidecar of every service instance, carrying requests between proxies over QUIC and choosing
//! instances from live RTT histograms.
//!
//! - [`app`]: the `proxy` program (flags, anonymous and service mode, start and shutdown);
//! - [`workers`]: `--worker-threads N`, N share-nothing event loops;
//! - [`ingress`]: the local HTTP ingress: the request path, and per service a pure routing core
//!   (`ingress::routing`) driven by one task, which chooses with [`select`] under the limits
//!   of [`config::perf`];
//! - [`sidecar`]: the instance side: calls its service, knows its health, answers probes;
//! - [`l4`]: layer-4 tunnels and service chains (the `l4-proxy` program's control API, and
//!   each sidecar's part in a chain);
//! - [`transport`], [`framing`], [`stream`], [`forward`]: QUIC between proxies, the frames a
//!   request and its response cross in, bodies streamed over them, and the ingress's end of one
//!   exchange;
//! - [`http1`]: HTTP/1.1 to a service as bytes (heads passed through, the chunked coding);
//! - [`upgrade`]: WebSocket and other upgrades, carried both ways once the service switched;
//! - [`rewrite`], [`cache`], [`retry`], [`metrics`], [`supervise`]: the target and header
//!   rewrite, the record cache, the retry budget, `/metrics`, the supervised service process.
//!
//! The overlay it joins, the RTT histograms it chooses from and the protocols it speaks with
//! lookups and allocators live in the `mtc-overlay` crate (`mtc_overlay::overlay`,
//! `mtc_overlay::rtt`, ...), which holds no etcd or Docker code: the proxy does not depend on
//! `control` at all (only its tests do), so no build links those clients into it.
#![warn(missing_docs)]

pub mod app;
pub mod cache;
pub mod config;
pub mod forward;
pub mod framing;
pub mod http1;
pub mod ingress;
pub mod l4;
pub mod metrics;
pub mod retry;
pub mod rewrite;
pub mod select;
pub mod sidecar;
pub mod stream;
pub mod supervise;
pub mod transport;
pub mod upgrade;
pub mod workers;
