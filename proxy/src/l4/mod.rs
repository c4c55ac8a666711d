//! Layer-4 tunnels and service chains: the original's `l4-proxy`, over our data plane.
//!
//! A client asks its local `l4-proxy` (the control API, [`front`]) for a chain,
//! `GET /tcp/<svc1>/<svc2>/...` ([`chain`]), and gets back a local address. Every TCP
//! connection, or every UDP client address, sent there becomes one **tunnel**: one QUIC
//! stream to an instance of `svc1`, chosen by live RTT as a request's instance is (waited
//! for or allocated on demand, set-up retried elsewhere: [`crate::ingress::Ingress::open_tunnel`]).
//!
//! ```text
//! client -> l4-proxy ==QUIC==> hop svc1 -> service 1 -> hop svc1 ==QUIC==> hop svc2 -> service 2
//!    ^                           |                                           |
//!    +---------------------------+<================== replies ==============+
//! ```
//!
//! Each hop's sidecar ([`hop`]) finds itself in the chain, connects to its service (TCP or
//! UDP, as the chain says), sets up the rest of the chain the same way, and answers. Then
//! what arrives goes to its service, its service's output goes on to the next hop, and what
//! comes back from the next hop goes straight back: replies never re-enter an earlier
//! service, as in the original.
//!
//! # Wire (frames of [`crate::framing`] on one bidirectional stream)
//! 1. the opener sends `CHAIN` (the encoded chain, the same for every hop);
//! 2. the hop answers `READY` ("Reverse chain: svcN ... svc1") once its service is connected
//!    and the rest of the chain is ready; or `REFUSED` (its service could not be reached, it is
//!    not in the chain, the chain is malformed) or `FAILED` (the next hop could not be had),
//!    and the opener tries another instance;
//! 3. then both ways: TCP bytes as `DATA` frames, UDP datagrams as QUIC datagrams that name
//!    the stream ([`datagrams`]) or, too large for the path, as `DATAGRAM` frames, as
//!    [`carry`] says; a FIN is a half-close, a reset a reset.
//!
//! # Rules
//! - A hop that loses its next hop (reset, connection closed) resets its own tunnel, that
//!   one only; new tunnels choose again (the core has heard of the failure).
//! - Set-up of one UDP client's tunnel never blocks another's: each runs in its own task and
//!   datagrams that arrive meanwhile wait in that client's queue (dropped, and counted, past
//!   [`front::CLIENT_QUEUE`]).
//! - A UDP client's tunnel ends after `--udp-idle-timeout` without a datagram either way.
//! - What one UDP source can make the l4-proxy hold and carry is bounded ([`admit`]:
//!   `--max-udp-clients`, `--udp-rate`).
//! - Tunnels are never retried once open: bytes may have reached a service.

pub mod admit;
pub mod carry;
pub mod chain;
pub mod datagrams;
pub mod front;
pub mod hop;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use self::carry::Counts;

/// Prometheus series of tunnels, by chain (its canonical spec) and role (`client` at the
/// l4-proxy, `hop` at a sidecar).
#[derive(Clone)]
pub struct TunnelMetrics {
    opened: IntCounterVec,
    open: IntGaugeVec,
    failed: IntCounterVec,
    bytes: IntCounterVec,
    dropped: IntCounterVec,
    quic_datagrams: IntCounterVec,
}

/// Which way bytes go: `forward` from the client towards the last service (at a hop: what
/// arrives for its service), `from_service` (at a hop: its service's output, sent on or back),
/// `backward` towards the client.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// From the client towards the last service; label `forward`.
    Forward,
    /// At a hop, its service's output; label `from_service`.
    FromService,
    /// Towards the client; label `backward`.
    Backward,
}

impl TunnelMetrics {
    /// Creates the `l4_*` series and registers them in `registry`; fails if one of them is
    /// registered there already.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let labels = &["chain", "role"];
        let opened = IntCounterVec::new(
            Opts::new(
                "l4_tunnels_total",
                "Tunnels opened (TCP connections, UDP clients)",
            ),
            labels,
        )?;
        let open = IntGaugeVec::new(Opts::new("l4_tunnels_open", "Tunnels open now"), labels)?;
        let failed = IntCounterVec::new(
            Opts::new(
                "l4_tunnel_failures_total",
                "Tunnels whose set-up failed or that broke, by reason",
            ),
            &["chain", "role", "reason"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new("l4_bytes_total", "Bytes carried through tunnels"),
            &["chain", "role", "direction"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "l4_datagrams_dropped_total",
                "UDP datagrams dropped, by reason (queue_full: a client's queue during set-up; \
                 receive_queue_full: a tunnel's queue of datagrams from the other proxy; \
                 send_failed: the socket refused it; too_many_clients: a new source past \
                 --max-udp-clients; rate_limited: a source over --udp-rate)",
            ),
            &["chain", "role", "reason"],
        )?;
        let quic_datagrams = IntCounterVec::new(
            Opts::new(
                "l4_quic_datagrams_total",
                "UDP datagrams sent between proxies as QUIC datagrams (the others, too large \
                 for the path, crossed on the tunnel's stream)",
            ),
            &["chain", "role", "direction"],
        )?;
        registry.register(Box::new(quic_datagrams.clone()))?;
        registry.register(Box::new(opened.clone()))?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(failed.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Self {
            opened,
            open,
            failed,
            bytes,
            dropped,
            quic_datagrams,
        })
    }

    /// Series that go nowhere (tests, a sidecar without a registry).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every series")
    }

    /// Counts a tunnel open until the guard is dropped.
    pub fn opened(&self, chain: &str, role: &str) -> OpenTunnel {
        self.opened.with_label_values(&[chain, role]).inc();
        let gauge = self.open.with_label_values(&[chain, role]);
        gauge.inc();
        OpenTunnel(gauge)
    }

    /// Counts a tunnel whose set-up failed or that broke, for `reason` (`set_up`, `broken`,
    /// `service_unreachable`, `next_hop`).
    pub fn failed(&self, chain: &str, role: &str, reason: &str) {
        self.failed.with_label_values(&[chain, role, reason]).inc();
    }

    /// The counters of one direction.
    pub fn counts(&self, chain: &str, role: &str, direction: Direction) -> Counts {
        let direction = match direction {
            Direction::Forward => "forward",
            Direction::FromService => "from_service",
            Direction::Backward => "backward",
        };
        Counts {
            bytes: self.bytes.with_label_values(&[chain, role, direction]),
            dropped: self
                .dropped
                .with_label_values(&[chain, role, "send_failed"]),
            quic_datagrams: self
                .quic_datagrams
                .with_label_values(&[chain, role, direction]),
        }
    }

    /// Counts the datagrams of one tunnel that arrived from the other proxy and were dropped
    /// because its queue was full (its socket could not take them as fast).
    pub fn receive_queue_full(&self, chain: &str, role: &str) -> IntCounter {
        self.dropped
            .with_label_values(&[chain, role, "receive_queue_full"])
    }

    /// Counts one datagram dropped at the l4-proxy's listener of `chain` for a limit of
    /// [`admit`] (`reason` `too_many_clients` or `rate_limited`).
    pub fn udp_limit_hit(&self, chain: &str, reason: &str) {
        self.dropped
            .with_label_values(&[chain, "client", reason])
            .inc();
    }

    /// Counts one datagram of a UDP client dropped at the l4-proxy because the client's queue
    /// was full (its tunnel still being set up, or sending on slower than the client sends).
    pub fn queue_full(&self, chain: &str) {
        self.dropped
            .with_label_values(&[chain, "client", "queue_full"])
            .inc();
    }
}

/// A tunnel counted open.
pub struct OpenTunnel(prometheus::IntGauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}
