//! Upgraded exchanges: WebSocket, or any protocol a client asks for with `Upgrade`, carried
//! between the client's connection at the ingress and the service's at the sidecar once the
//! service answered `101 Switching Protocols`.
//!
//! # The exchange
//! 1. **Asking.** An HTTP/1.1 request whose `Connection` names `upgrade` and that has an
//!    `Upgrade` field keeps that field across the ingress ([`crate::http1::front`]); the
//!    sidecar sends it to its service with `Connection: upgrade` ([`crate::http1`]). The
//!    ingress leaves its side of the stream open after the `HEAD` frame: such a request has
//!    no body, and the stream may become the upgraded protocol's.
//! 2. **Answered `101`.** The sidecar sends the `101` head (with the service's `Upgrade`) and
//!    from then on the stream carries the upgraded protocol's bytes as `DATA` frames, both
//!    ways; the ingress writes the `101` to its client with `Connection: upgrade` and does the
//!    same with the client's connection. What either party sent right after its head (bytes
//!    read with it) goes first.
//! 3. **Answered otherwise.** A refused upgrade is an ordinary response: the ingress ends its
//!    side of the stream (no body) and answers its client with the service's response.
//! 4. **Carrying** is a tunnel's ([`crate::l4::carry`]): back-pressure from QUIC flow control
//!    and the sockets' buffers, a clean end passed on as one (TCP FIN <-> QUIC FIN, so either
//!    side may half-close), a broken end (a reset) aborting both directions.
//! 5. **Idle.** An upgraded stream with no byte either way for [`IDLE_TIMEOUT`] is ended
//!    cleanly both ways, so abandoned connections do not hold an instance busy for ever
//!    (WebSocket clients keep theirs alive with pings well within it).
//! 6. **Never retried**: once the request left, an upgrade goes to no other instance (the
//!    service may have acted on it); before, as any request ([`crate::ingress`]).
//! 7. **Counted** (per role, `ingress` or `sidecar`): `proxy_upgrades_total{outcome}`
//!    (`switched`, `refused`: answered otherwise; `failed`: no answer), the upgraded bytes
//!    `proxy_upgraded_bytes_total{direction}` (`to_service`, `to_client`), and
//!    `proxy_upgraded_streams` open now.

use std::{
    convert::Infallible,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::l4::carry::{CarryError, Counts, Sink, Source, Unit, direction};

/// How long an upgraded stream may carry nothing either way before it is ended.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Which proxy of the two an upgraded stream's series are counted at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The client's end: the ingress.
    Ingress,
    /// The service's end: the sidecar.
    Sidecar,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Sidecar => "sidecar",
        }
    }
}

/// What became of an upgrade request (rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered `101`: the stream was upgraded.
    Switched,
    /// Answered otherwise: an ordinary response.
    Refused,
    /// No answer: the exchange failed before a response head.
    Failed,
}

/// The series of upgraded exchanges (rule 7).
#[derive(Clone)]
pub struct UpgradeMetrics {
    upgrades: IntCounterVec,
    bytes: IntCounterVec,
    open: IntGaugeVec,
}

impl UpgradeMetrics {
    /// Creates the series in `registry`, every outcome and direction starting at zero.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let upgrades = IntCounterVec::new(
            Opts::new(
                "proxy_upgrades_total",
                "Upgrade requests (WebSocket, ...) by role (ingress, sidecar) and outcome: \
                 switched (101), refused (answered otherwise), failed (no answer)",
            ),
            &["role", "outcome"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "proxy_upgraded_bytes_total",
                "Bytes carried on upgraded streams, by role and direction (to_service, \
                 to_client)",
            ),
            &["role", "direction"],
        )?;
        let open = IntGaugeVec::new(
            Opts::new(
                "proxy_upgraded_streams",
                "Upgraded streams open now, by role",
            ),
            &["role"],
        )?;
        for role in [Role::Ingress, Role::Sidecar] {
            for outcome in ["switched", "refused", "failed"] {
                upgrades.with_label_values(&[role.label(), outcome]);
            }
            for direction in ["to_service", "to_client"] {
                bytes.with_label_values(&[role.label(), direction]);
            }
            open.with_label_values(&[role.label()]);
        }
        registry.register(Box::new(upgrades.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(open.clone()))?;
        Ok(Self {
            upgrades,
            bytes,
            open,
        })
    }

    /// Series that go nowhere (tests, a sidecar not given the proxy's).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every series")
    }

    /// Counts an upgrade request's outcome at `role`.
    pub fn outcome(&self, role: Role, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Switched => "switched",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        };
        self.upgrades
            .with_label_values(&[role.label(), outcome])
            .inc();
    }

    fn counts(&self, role: Role, direction: &str) -> Counts {
        let unused = IntCounter::new("unused", "datagrams: upgraded streams carry none")
            .expect("a valid name");
        Counts {
            bytes: self.bytes.with_label_values(&[role.label(), direction]),
            dropped: unused.clone(),
            quic_datagrams: unused,
        }
    }
}

/// An upgraded stream's ends at one proxy: at the ingress the client's side is its
/// connection and the service's the QUIC stream; at the sidecar the client's side is the QUIC
/// stream and the service's its connection.
pub struct Ends {
    /// Bytes toward the service come from here...
    pub from_client: Source,
    /// ... after these, which were read with the client's head (may be empty) ...
    pub early_to_service: Bytes,
    /// ... and go here.
    pub to_service: Sink,
    /// Bytes toward the client come from here...
    pub from_service: Source,
    /// ... after these, which were read with the service's `101` head (may be empty) ...
    pub early_to_client: Bytes,
    /// ... and go here.
    pub to_client: Sink,
}

/// Carries an upgraded stream both ways until both directions ended (rules 2, 4 and 5),
/// counted at `role`. `idle` is [`IDLE_TIMEOUT`] but in tests. The first failure is returned,
/// after both directions stopped.
pub async fn carry(
    ends: Ends,
    metrics: &UpgradeMetrics,
    role: Role,
    idle: Duration,
) -> Result<(), CarryError> {
    let Ends {
        mut from_client,
        early_to_service,
        mut to_service,
        mut from_service,
        early_to_client,
        mut to_client,
    } = ends;
    let open = metrics.open.with_label_values(&[role.label()]);
    open.inc();
    let (up, down) = (
        metrics.counts(role, "to_service"),
        metrics.counts(role, "to_client"),
    );
    let (idle_out, broken) = (CancellationToken::new(), CancellationToken::new());
    // When a byte last crossed, in milliseconds since `start` (an atomic only because the
    // sidecar's task must be `Send`).
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let touched = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let due = || start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
    // Ends both directions cleanly once nothing crossed for `idle`.
    let watch = async {
        loop {
            tokio::time::sleep_until(due()).await;
            if due() <= Instant::now() {
                idle_out.cancel();
                return std::future::pending::<Infallible>().await;
            }
        }
    };
    let both = async {
        // What came with the heads goes first.
        let early = async {
            put_early(&mut to_service, early_to_service, &up).await?;
            put_early(&mut to_client, early_to_client, &down).await
        };
        if let Err(error) = early.await {
            to_service.abort();
            to_client.abort();
            return (Err(error), Ok(()));
        }
        tokio::join!(
            direction(
                &mut from_client,
                &mut to_service,
                &up,
                touched,
                &idle_out,
                &broken
            ),
            direction(
                &mut from_service,
                &mut to_client,
                &down,
                touched,
                &idle_out,
                &broken
            ),
        )
    };
    let (a, b) = tokio::select! {
        results = both => results,
        never = watch => match never {},
    };
    open.dec();
    a.and(b)
}

/// Puts `early` (if any) into `sink`, counted.
async fn put_early(sink: &mut Sink, early: Bytes, counts: &Counts) -> Result<(), CarryError> {
    if !early.is_empty() {
        let len = early.len() as u64;
        sink.put(Unit::Bytes(early)).await?;
        counts.bytes.inc_by(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair: ours (split) and the peer's.
    async fn pair() -> ((Source, Sink), TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        let (read, write) = ours.into_split();
        ((Source::Tcp(read), Sink::Tcp(write)), peer)
    }

    /// Rule 5 in virtual time: an upgraded stream that carries nothing for the idle timeout is
    /// ended both ways; a byte either way starts the wait again.
    #[tokio::test(start_paused = true)]
    async fn an_idle_upgraded_stream_is_ended_and_a_byte_postpones_it() {
        let ((from_client, to_client), mut client) = pair().await;
        let ((from_service, to_service), mut service) = pair().await;
        let ends = Ends {
            from_client,
            early_to_service: Bytes::new(),
            to_service,
            from_service,
            early_to_client: Bytes::new(),
            to_client,
        };
        let metrics = UpgradeMetrics::unregistered();
        let idle = Duration::from_secs(300);
        let carrying =
            tokio::spawn(async move { carry(ends, &metrics, Role::Ingress, idle).await });

        tokio::time::sleep(Duration::from_secs(200)).await;
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        service.read_exact(&mut byte).await.unwrap();
        // 400 s since the start, 200 since the byte: still open.
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert!(!carrying.is_finished(), "ended while a byte was recent");
        // Past 300 s since the byte: both sides are ended cleanly.
        tokio::time::sleep(Duration::from_secs(150)).await;
        carrying.await.unwrap().unwrap();
        assert_eq!(
            client.read(&mut byte).await.unwrap(),
            0,
            "the client's side ended"
        );
        assert_eq!(
            service.read(&mut byte).await.unwrap(),
            0,
            "the service's side ended"
        );
    }
}
