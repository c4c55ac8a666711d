//! Data plane of multi-tier-cloud: the proxy that is both the local HTTP ingress and the
//! sidecar of every service instance, carrying requests between proxies over QUIC and choosing
//! instances from live RTT histograms.
//!
//! Being built in issue #4. So far the pure parts: [`config::perf`], the perf.conf the instance
//! choice is tuned by, [`select`], the choice itself, and [`framing`], how a request crosses
//! between two proxies on a QUIC stream, the [`transport`] those streams run on, messages
//! [`stream`]ed over it, both ends of one request ([`forward`] and the [`sidecar`]), and what the ingress does to
//! a request's target and headers ([`rewrite`]); the [`cache`] its lookups go through. The overlay it joins and the RTT histograms it chooses from live in the `control`
//! crate (`control::overlay`, `control::rtt`).

pub mod app;
pub mod cache;
pub mod config;
pub mod forward;
pub mod framing;
pub mod ingress;
pub mod metrics;
pub mod retry;
pub mod rewrite;
pub mod select;
pub mod sidecar;
pub mod stream;
pub mod supervise;
pub mod transport;
