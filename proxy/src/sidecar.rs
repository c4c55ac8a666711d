//! The instance side of the data plane: the [`Sidecar`] answers the streams ingresses open
//! over QUIC by calling its service over pooled HTTP/1.1 connections ([`upstream`], heads
//! passed through as bytes), or over one HTTP/2 connection if the service speaks h2c
//! ([`h2`]: gRPC), and knows whether that service answers ([`health`]).
//!
//! # Rules
//! 1. **A request** (a stream opening with `HEAD`) goes to the service with its body streamed
//!    as it arrives and `TE: trailers` set; the response head, body and trailers stream back.
//! 2. **Nothing reached the service** (the client could not connect: refused, unreachable,
//!    past the connect timeout): the answer is `REFUSED` naming the service's address, so the
//!    ingress may send the request elsewhere whatever its method, and the service is reported
//!    down ([`health::Observation::ConnectFailed`]).
//! 3. **The exchange broke after connecting** (the service reset it, closed early): the
//!    answer is `FAILED` saying so (the ingress retries it only if it is idempotent, as the
//!    request may have had effects), never a response of the service; the health is left as it
//!    is. If it was the request body from the ingress that broke (the ingress reset its side),
//!    the service is not blamed either. Once the response head has gone to the ingress, a
//!    break resets the stream, so that a truncated body is never taken for a whole one.
//! 4. **Any response** of the service, whatever its status, reports it serving.
//! 5. **A probe** (a stream opening with `PING`) is answered at once with a `PING` carrying the
//!    service's [`Health`](crate::framing::Health) (starting counts as down), without troubling
//!    the service; probes are counted.
//! 6. **Liveness checks** run from [`Sidecar::new`] on: a TCP connect to the service every
//!    interval, until the sidecar is dropped ([`health::run_checks`]). A UDP service cannot
//!    be checked so ([`Sidecar::unchecked`]): it is taken as serving.
//! 7. **A tunnel** (a stream opening with `CHAIN`) is this instance's part in a layer-4
//!    chain ([`crate::l4::hop`]), once [`Sidecar::take_part_in_chains`] was called (refused
//!    before); a service it cannot reach is reported down as in rule 2.
//! 8. **An upgrade** (a request whose head carries `Upgrade`) that the service answers `101`
//!    switches the stream and the service's connection to the upgraded protocol, carried both
//!    ways as [`crate::upgrade`] says; counted as serving while it is open.
//! 9. **The service's protocol**: a service declared `h2c` (or `grpc`) gets every request
//!    over HTTP/2 ([`h2`]); one declared `http` (the default, also when undeclared) gets them
//!    over HTTP/1.1, but for gRPC calls (`Content-Type: application/grpc...`), which only
//!    HTTP/2 carries, and for requests whose client spoke HTTP/2 to the ingress (its `Via`
//!    entry says `2`) when the service speaks h2c too ([`h2::speaks_h2c`], asked once per
//!    worker): those go over HTTP/2. So an undeclared gRPC or HTTP/2-only service is reached
//!    by HTTP/2 clients, and an HTTP/1.1-only one still by everyone.

mod h2;
pub mod health;
mod upstream;

pub(crate) use upstream::connect as connect_service;

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;

use self::{
    h2::{H2Error, H2Upstream},
    health::{HealthPolicy, Observation, ServiceHealth},
    upstream::{ExchangeError, Exchanged, Switched, Upstream},
};
use crate::transport::{Connection, RecvStream, SendStream};
use crate::{
    framing::view_request_head,
    http1::{arrived_over_h2, asks_upgrade, is_grpc},
    l4::{
        carry::{Sink, Source},
        hop::{self, HopRole, ServiceAddr},
    },
    metrics::Activity,
    stream::{Opening, StreamError, read_opening, send_failed, send_ping, send_refused},
    upgrade::{self, Ends, IDLE_TIMEOUT, Outcome as UpgradeOutcome, Role, UpgradeMetrics},
};

/// Application error code of a request stream reset by the sidecar.
const RESET_BROKEN: u32 = 1;

/// How a sidecar speaks to its service (rule 9).
enum Speaking {
    /// HTTP/1.1 on pooled connections (and upgrades); over HTTP/2 gRPC calls, and requests
    /// whose client spoke HTTP/2 if the service does (`h2c`: asked once, when first needed).
    Http1 {
        http1: Upstream,
        h2: H2Upstream,
        h2c: tokio::sync::OnceCell<bool>,
    },
    /// HTTP/2 without TLS on one multiplexed connection, for every request.
    H2c(H2Upstream),
}

impl Speaking {
    fn new(h2c: bool, addr: SocketAddr, connect_timeout: Duration) -> Self {
        let h2 = H2Upstream::new(addr, connect_timeout);
        if h2c {
            Self::H2c(h2)
        } else {
            Self::Http1 {
                http1: Upstream::new(addr, connect_timeout),
                h2,
                h2c: tokio::sync::OnceCell::new(),
            }
        }
    }
}

/// The instance side: requests arriving on QUIC streams go to the service at `upstream`.
pub struct Sidecar {
    upstream: Speaking,
    addr: SocketAddr,
    activity: Arc<Activity>,
    health: Arc<ServiceHealth>,
    probes_answered: AtomicU64,
    connect_timeout: Duration,
    /// Set when the sidecar takes part in layer-4 chains ([`crate::l4`]).
    chains: OnceLock<HopRole>,
    /// Where upgraded exchanges are counted, once given ([`Sidecar::count_upgrades_in`]).
    upgrades: OnceLock<UpgradeMetrics>,
}

impl Sidecar {
    /// A sidecar of the service at `upstream`, checked with the default [`HealthPolicy`].
    /// `activity` is told of every request served (the allocator culls idle instances).
    pub fn new(upstream: SocketAddr, activity: Arc<Activity>) -> Arc<Self> {
        Self::with_policy(upstream, activity, HealthPolicy::default())
    }

    /// A sidecar of a service that speaks HTTP/2 without TLS (h2c, gRPC), checked as
    /// [`Sidecar::new`]'s is.
    pub fn h2c(upstream: SocketAddr, activity: Arc<Activity>) -> Arc<Self> {
        Self::start(upstream, activity, HealthPolicy::default(), true)
    }

    /// A sidecar of a service that cannot be checked by connecting to it (UDP): taken as
    /// serving from the start, and never checked.
    pub fn unchecked(upstream: SocketAddr, activity: Arc<Activity>) -> Arc<Self> {
        let policy = HealthPolicy::default();
        let health = ServiceHealth::new(upstream, policy);
        health.observe(Observation::Connected);
        Arc::new(Self {
            upstream: Speaking::new(false, upstream, policy.connect_timeout),
            addr: upstream,
            activity,
            health,
            probes_answered: AtomicU64::new(0),
            connect_timeout: policy.connect_timeout,
            chains: OnceLock::new(),
            upgrades: OnceLock::new(),
        })
    }

    /// A sidecar whose service is checked as `policy` says; starts the checks (in a task
    /// that ends when the sidecar and every holder of its [`Sidecar::health`] are gone), so
    /// it must be called within a Tokio runtime.
    pub fn with_policy(
        upstream: SocketAddr,
        activity: Arc<Activity>,
        policy: HealthPolicy,
    ) -> Arc<Self> {
        Self::start(upstream, activity, policy, false)
    }

    fn start(
        upstream: SocketAddr,
        activity: Arc<Activity>,
        policy: HealthPolicy,
        h2c: bool,
    ) -> Arc<Self> {
        let connect_timeout = policy.connect_timeout;
        let health = ServiceHealth::new(upstream, policy);
        tokio::spawn(health::run_checks(Arc::downgrade(&health)));
        Arc::new(Self {
            upstream: Speaking::new(h2c, upstream, connect_timeout),
            addr: upstream,
            activity,
            health,
            probes_answered: AtomicU64::new(0),
            connect_timeout,
            chains: OnceLock::new(),
            upgrades: OnceLock::new(),
        })
    }

    /// Another sidecar of the same service, for another worker ([`crate::workers`]): its own
    /// connections to the service and probe count, the same health (checked once, by the
    /// checks this sidecar's constructor started). Starts nothing, so any thread may call it.
    pub fn for_worker(&self) -> Arc<Self> {
        let h2c = matches!(self.upstream, Speaking::H2c(_));
        Arc::new(Self {
            upstream: Speaking::new(h2c, self.addr, self.connect_timeout),
            addr: self.addr,
            activity: Arc::clone(&self.activity),
            health: Arc::clone(&self.health),
            probes_answered: AtomicU64::new(0),
            connect_timeout: self.connect_timeout,
            chains: OnceLock::new(),
            upgrades: OnceLock::new(),
        })
    }

    /// From now on, tunnels (streams opening with `CHAIN`) are served as `role` says;
    /// before, they are refused. Set once.
    pub fn take_part_in_chains(&self, role: HopRole) {
        let _ = self.chains.set(role);
    }

    /// What the sidecar knows of its service; [`ServiceHealth::serving`] waits for it to
    /// answer.
    pub fn health(&self) -> &Arc<ServiceHealth> {
        &self.health
    }

    /// Probes this sidecar answered.
    pub fn probes_answered(&self) -> u64 {
        self.probes_answered.load(Ordering::Relaxed)
    }

    /// Counts this sidecar's upgraded exchanges in `metrics` (the proxy's registry); until
    /// then they go uncounted. Set once.
    pub fn count_upgrades_in(&self, metrics: UpgradeMetrics) {
        let _ = self.upgrades.set(metrics);
    }

    /// Serves every request stream of an authenticated connection until it closes.
    pub async fn serve_connection(self: Arc<Self>, connection: Connection) {
        while let Ok((send, recv)) = connection.accept_bi().await {
            let this = Arc::clone(&self);
            // A reference count: tunnels send their datagrams on it.
            let on = connection.clone();
            tokio::spawn(async move {
                if let Err(error) = this.serve_stream(&on, send, recv).await {
                    tracing::debug!(%error, "request stream failed");
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        connection: &Connection,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), StreamError> {
        let (payload, rest) = match read_opening(&mut recv).await? {
            Opening::Head(payload, rest) => (payload, rest),
            Opening::Ping(_) => {
                self.probes_answered.fetch_add(1, Ordering::Relaxed);
                return send_ping(&mut send, &self.health.health().encode()).await;
            }
            Opening::Chain(payload, rest) => {
                return self
                    .serve_tunnel(connection, payload, rest, send, recv)
                    .await;
            }
            other => return Err(StreamError::Unexpected(other.kind())),
        };
        let head = match view_request_head(&payload) {
            Ok(head) => head,
            Err(error) => {
                let _ = send.reset(RESET_BROKEN.into());
                return Err(error.into());
            }
        };
        let _serving = self.activity.serve();
        let answered = || self.health.observe(Observation::Answered);
        let (upstream, h2) = match &self.upstream {
            Speaking::H2c(h2) => (None, h2),
            Speaking::Http1 { h2, .. } if is_grpc(head.fields) => (None, h2),
            Speaking::Http1 { http1, h2, h2c } if arrived_over_h2(head.fields) => {
                // Known once the service answered the question; until then, HTTP/1.1.
                let ask = || async {
                    h2::speaks_h2c(self.addr, self.connect_timeout)
                        .await
                        .ok_or(())
                };
                let speaks = h2c.get_or_try_init(ask).await.copied().unwrap_or(false);
                (if speaks { None } else { Some(http1) }, h2)
            }
            Speaking::Http1 { http1, h2, .. } => (Some(http1), h2),
        };
        let Some(upstream) = upstream else {
            let exchanged = h2.exchange(&head, recv, rest, &mut send, answered);
            return self.answer_h2(exchanged.await, send).await;
        };
        let upgrade = asks_upgrade(head.fields);
        let exchanged = upstream
            .exchange(&head, recv, rest, &mut send, answered)
            .await;
        let upgrades = self.upgrades.get_or_init(UpgradeMetrics::unregistered);
        if upgrade {
            upgrades.outcome(
                Role::Sidecar,
                match &exchanged {
                    Ok(Exchanged::Switched(_)) => UpgradeOutcome::Switched,
                    Ok(Exchanged::Done) => UpgradeOutcome::Refused,
                    Err(_) => UpgradeOutcome::Failed,
                },
            );
        }
        let error = match exchanged {
            Ok(Exchanged::Done) => return Ok(()),
            Ok(Exchanged::Switched(switched)) => {
                let Switched {
                    connection,
                    early,
                    recv,
                    rest,
                } = switched;
                let (read, write) = connection.into_split();
                let ends = Ends {
                    from_client: Source::Stream(recv, rest, None),
                    early_to_service: Bytes::new(),
                    to_service: Sink::Tcp(write),
                    from_service: Source::Tcp(read),
                    early_to_client: early,
                    to_client: Sink::Stream(send, None),
                };
                return upgrade::carry(ends, upgrades, Role::Sidecar, IDLE_TIMEOUT)
                    .await
                    .map_err(|error| StreamError::Body(format!("upgraded stream: {error}")));
            }
            Err(error) => error,
        };
        let addr = self.addr;
        match error {
            ExchangeError::Connect(error) => {
                self.health.observe(Observation::ConnectFailed);
                let reason = format!("cannot connect to the service at {addr}: {error}");
                send_refused(&mut send, &reason).await
            }
            ExchangeError::Service(reason) => {
                let reason = format!("the service at {addr} broke the exchange: {reason}");
                send_failed(&mut send, &reason).await
            }
            ExchangeError::IngressBody(_) | ExchangeError::Request(_) => {
                send_failed(&mut send, &error.to_string()).await
            }
            ExchangeError::AfterHead(reason) => {
                let _ = send.reset(RESET_BROKEN.into());
                Err(StreamError::Body(format!(
                    "the response from the service at {addr} broke: {reason}"
                )))
            }
        }
    }

    /// Tells the ingress how an exchange with an HTTP/2 service failed (rules 2 and 3).
    async fn answer_h2(
        &self,
        exchanged: Result<(), H2Error>,
        mut send: SendStream,
    ) -> Result<(), StreamError> {
        let addr = self.addr;
        match exchanged {
            Ok(()) => Ok(()),
            Err(H2Error::Connect(reason)) => {
                self.health.observe(Observation::ConnectFailed);
                let reason = format!("cannot connect to the service at {addr}: {reason}");
                send_refused(&mut send, &reason).await
            }
            Err(error @ H2Error::Unprocessed(_)) => {
                send_refused(&mut send, &format!("the service at {addr}: {error}")).await
            }
            Err(error @ (H2Error::Service(_) | H2Error::ResponseHead(_))) => {
                let reason = format!("the service at {addr} broke the exchange: {error}");
                send_failed(&mut send, &reason).await
            }
            Err(error @ H2Error::Request(_)) => send_failed(&mut send, &error.to_string()).await,
            Err(error @ (H2Error::AfterHead(_) | H2Error::Abandoned)) => {
                let _ = send.reset(RESET_BROKEN.into());
                Err(StreamError::Body(format!("the service at {addr}: {error}")))
            }
        }
    }

    /// A tunnel's stream ([`crate::l4::hop`]); counted as serving while it is open.
    async fn serve_tunnel(
        &self,
        connection: &Connection,
        payload: bytes::Bytes,
        rest: crate::framing::Decoder,
        mut send: SendStream,
        recv: RecvStream,
    ) -> Result<(), StreamError> {
        let Some(role) = self.chains.get() else {
            return send_refused(&mut send, "this sidecar takes part in no chains").await;
        };
        let _serving = self.activity.serve();
        let service = ServiceAddr {
            addr: self.addr,
            connect_timeout: self.connect_timeout,
        };
        if let Err(reason) =
            hop::serve(role, service, connection, payload, rest, send, recv).await?
        {
            tracing::debug!(%reason, "tunnel refused");
            self.health.observe(Observation::ConnectFailed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
