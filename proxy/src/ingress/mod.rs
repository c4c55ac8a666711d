//! The ingress: HTTP/1.1 and h2c on a local port; each request `/<service>/<rest>` is resolved
//! through the lookup ([`records`]) and sent over an authenticated QUIC connection to the
//! instance the service's routing core ([`routing`], driven by [`instances`]) chooses, and the
//! response streamed back.
//!
//! The path of one request, in [`Ingress::send`]:
//! 1. the core chooses an instance, or says to wait (for an instance being verified or
//!    allocated; at most `--max-waiting` requests of a service wait, each up to
//!    `--instance-wait`), or says why none can be had;
//! 2. the connection to the instance (shared by every request to it) is had within
//!    [`CONNECT_TIMEOUT`]; failing that, the request goes elsewhere, body and all;
//! 3. the request is forwarded; if its response head has not begun within the per-try
//!    timeout the core gave, the core is told (it stops routing there and probes the
//!    instance), and an idempotent request without a body is sent a second time to another
//!    instance (a hedge, within the [`RetryBudget`]): the first answer wins;
//! 4. an attempt that fails is retried elsewhere when that is safe: nothing was sent, or the
//!    instance's service never got it and its body is still here, or the request is
//!    idempotent without a body;
//! 5. every attempt's typed outcome goes back to the core (network RTT and service time
//!    apart); every failure is a [`RequestError`], turned into a response in one place.

mod allocation;
mod error;
mod instances;
mod records;
mod routing;

pub use allocation::Reason;
pub use error::RequestError;
pub use routing::InstanceReport;

use std::{
    cell::Cell,
    convert::Infallible,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use control::overlay::Node;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Empty, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use libp2p::PeerId;
use quinn::Connection;
use tokio::{net::TcpListener, sync::Notify};
use tokio_util::sync::CancellationToken;

use crate::{
    config::perf::{Limits, Overrides, PerfConfig},
    forward::{AttemptError, ConnectError, forward},
    framing::RequestHead,
    metrics::{Activity, IngressMetrics, ServiceView, UNKNOWN_SERVICE},
    retry::{RetryBudget, idempotent},
    rewrite::{forward_request_headers, forward_response_headers, split_target},
    stream::FramedBody,
    transport::Transport,
};
use instances::Services;
use records::{Records, Resolved};
use routing::{Choice, Outcome};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// A connection to an instance not had within this is given up on (a handshake with a frozen
/// or gone instance would otherwise wait for the QUIC idle timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How the ingress behaves; the proxy's flags set it.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub perf: PerfConfig,
    /// How long a resolved service record is used before it is asked for again.
    pub record_ttl: Duration,
    /// How long a request waits for an instance of a service that has none.
    pub instance_wait: Duration,
    /// Most requests of one service waiting for instances at once; more are answered 503 at
    /// once.
    pub max_waiting: usize,
    /// Largest request head (request line and headers) accepted, in bytes.
    pub max_head_bytes: usize,
    /// A client that has not sent a whole request head within this is disconnected.
    pub head_timeout: Duration,
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            perf: PerfConfig::default(),
            record_ttl: Duration::from_secs(3600),
            instance_wait: Duration::from_secs(15),
            max_waiting: 1024,
            max_head_bytes: 64 * 1024,
            head_timeout: Duration::from_secs(10),
        }
    }
}

pub struct Ingress {
    transport: Arc<Transport>,
    settings: IngressSettings,
    records: Arc<Records>,
    services: Arc<Services>,
    metrics: IngressMetrics,
    activity: Arc<Activity>,
    retries: RetryBudget,
}

thread_local! {
    static RANDOM: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// A number below `n` from a per-thread xorshift generator: choosing instances needs speed,
/// not cryptographic quality.
fn random_below(n: usize) -> usize {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x % n as u64) as usize
    })
}

/// The body an attempt sends: the client's, or none (a bodiless request, or a hedge).
type SentBody = Either<Incoming, Empty<Bytes>>;

/// A request waiting for an instance, counted by its service's core until dropped (also when
/// the client goes away).
struct Waiting<'a> {
    services: &'a Arc<Services>,
    service: &'a Arc<Resolved>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.services
            .with(self.service, |core, _| core.stop_waiting());
    }
}

/// One attempt on one instance; its outcome is told to the core once, and as cancelled if it
/// is dropped before it ended (the hedge answered first, or the client left).
struct Attempt {
    services: Arc<Services>,
    service: Arc<Resolved>,
    peer: PeerId,
    started: Instant,
    ended: bool,
}

impl Attempt {
    fn begin(services: &Arc<Services>, service: &Arc<Resolved>, peer: PeerId) -> Self {
        services.with(service, |core, _| core.attempt_started(&peer));
        Self {
            services: Arc::clone(services),
            service: Arc::clone(service),
            peer,
            started: Instant::now(),
            ended: false,
        }
    }

    fn end(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let (peer, started, now) = (self.peer, self.started, Instant::now());
        self.services.with(&self.service, |core, actions| {
            core.attempt_ended(&peer, started, now, outcome, actions);
        });
    }

    /// Sends the request on `connection` and tells the core how it went.
    async fn exchange(
        mut self,
        connection: Connection,
        head: &RequestHead,
        body: SentBody,
    ) -> Result<Response<FramedBody>, (PeerId, AttemptError)> {
        let begin = Instant::now();
        let result = forward(&connection, head, body).await;
        let total = begin.elapsed();
        let outcome = match &result {
            // The path RTT QUIC measures, but never more than the whole exchange took: its
            // smoothed estimate lags behind a path that got faster.
            Ok(_) => Outcome::Answered {
                network: connection.rtt().min(total),
                total,
            },
            Err(AttemptError::Client(_)) => Outcome::ClientFault,
            Err(AttemptError::Refused(_)) => Outcome::Refused,
            Err(_) => Outcome::Failed,
        };
        self.end(outcome);
        result.map_err(|error| (self.peer, error))
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.end(Outcome::Cancelled);
    }
}

impl Ingress {
    /// `activity` is told of every request (the allocator culls on it); `metrics` counts them.
    pub fn new(
        node: Node,
        transport: Arc<Transport>,
        settings: IngressSettings,
        metrics: IngressMetrics,
        activity: Arc<Activity>,
    ) -> Arc<Self> {
        Arc::new(Self {
            records: Records::new(node.clone(), settings.record_ttl),
            services: Services::new(
                node,
                Arc::clone(&transport),
                metrics.clone(),
                settings.perf.policy,
                settings.max_waiting,
                settings.instance_wait,
            ),
            transport,
            settings,
            metrics,
            activity,
            retries: RetryBudget::default(),
        })
    }

    /// The instances of every service used, for metrics.
    pub fn view(&self) -> Vec<ServiceView> {
        self.services.view()
    }

    /// Serves HTTP/1.1 and h2c on `listener` until `shutdown`, and keeps the routing cores
    /// told of the time meanwhile (probes, refreshes).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        tokio::spawn(Arc::clone(&self.services).tick_until(shutdown.clone()));
        accept_until_shutdown(self, listener, shutdown).await;
    }

    /// Answers one client request.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let begin = Instant::now();
        let _serving = self.activity.serve();
        self.retries.deposit();
        let (service, result) = self.route(request, client).await;
        let response = result.unwrap_or_else(|error| {
            tracing::debug!(%error, "request failed");
            error.into_response()
        });
        let label = service
            .as_ref()
            .map_or(UNKNOWN_SERVICE, |s| s.record.name.as_str());
        self.metrics
            .answered(label, response.status(), begin.elapsed());
        response
    }

    /// The response to `request` and the service it was for, if it exists.
    async fn route(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> (
        Option<Arc<Resolved>>,
        Result<Response<ResponseBody>, RequestError>,
    ) {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let (name, target) = match split_target(path) {
            Ok(split) => split,
            Err(error) => return (None, Err(error.into())),
        };
        let service = match self.records.resolve(name).await {
            Ok(Some(service)) => service,
            Ok(None) => return (None, Err(RequestError::NoSuchService(name.to_owned()))),
            Err(reason) => return (None, Err(RequestError::Lookup(reason))),
        };
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        forward_request_headers(&mut headers, client.ip());
        let head = RequestHead {
            method: parts.method,
            target,
            headers,
        };
        let response = self.send(&service, &head, body).await;
        (Some(service), response)
    }

    fn limits(&self, service: &Resolved) -> Limits {
        let record = &service.record;
        self.settings.perf.limits_for(
            &record.name,
            Overrides {
                soft_rtt: record.limits.soft_rtt,
                hard_rtt: record.limits.hard_rtt,
            },
        )
    }

    /// Sends a request to an instance of `service`, and again elsewhere when that is safe (see
    /// the module doc), as long as the retry budget lasts.
    async fn send(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        head: &RequestHead,
        body: Incoming,
    ) -> Result<Response<ResponseBody>, RequestError> {
        let had_body = !body.is_end_stream();
        let replayable = idempotent(head.method.as_str().as_bytes()) && !had_body;
        // The client's body, until an attempt takes it: a request can only go elsewhere
        // while what it carries is still here.
        let mut body = had_body.then_some(body);
        let arrived = Instant::now();
        let limits = self.limits(service);
        let name = &service.record.name;
        let mut avoid = None;
        loop {
            let (peer, addr, try_timeout) = self.pick(service, arrived, limits, avoid).await?;
            let mut attempt = Attempt::begin(&self.services, service, peer);
            let result = match self.connection(peer, addr).await {
                Err(reason) => {
                    attempt.end(Outcome::Failed);
                    Err((peer, reason.into()))
                }
                Ok(connection) if replayable => {
                    self.hedged(
                        service,
                        limits,
                        arrived,
                        attempt,
                        connection,
                        head,
                        try_timeout,
                    )
                    .await
                }
                Ok(connection) => {
                    let sent = match body.take() {
                        Some(body) => Either::Left(body),
                        None => Either::Right(Empty::new()),
                    };
                    let overdue = attempt.overdue_handle();
                    let exchange = pin!(attempt.exchange(connection, head, sent));
                    watched(exchange, try_timeout, overdue).await
                }
            };
            let (failed, error) = match result {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    forward_response_headers(&mut parts.headers);
                    return Ok(Response::from_parts(
                        parts,
                        body.map_err(BoxError::from).boxed(),
                    ));
                }
                Err(failure) => failure,
            };
            // Whether the request may go elsewhere: what it carries must still be here.
            let may_retry = match &error {
                AttemptError::Client(_) => false,
                AttemptError::Unreachable(_)
                | AttemptError::NotSent(_)
                | AttemptError::Refused(_) => !had_body || body.is_some(),
                AttemptError::Broken(_) => replayable,
            };
            let retry = may_retry && self.retries.withdraw();
            if may_retry {
                self.metrics.retried(name, retry);
            }
            tracing::debug!(service = %name, peer = %failed, %error, retry, "attempt failed");
            if !retry {
                return Err(RequestError::Attempt {
                    service: name.clone(),
                    peer: failed,
                    error,
                });
            }
            avoid = Some(failed);
        }
    }

    /// Sends a bodiless idempotent request on `connection`; if no answer has begun within
    /// `try_timeout`, sends it to another instance too (within the retry budget) and returns
    /// the first answer.
    #[allow(clippy::too_many_arguments)]
    async fn hedged(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        limits: Limits,
        arrived: Instant,
        attempt: Attempt,
        connection: Connection,
        head: &RequestHead,
        try_timeout: Duration,
    ) -> Result<Response<FramedBody>, (PeerId, AttemptError)> {
        let peer = attempt.peer;
        let overdue = attempt.overdue_handle();
        let mut first = pin!(attempt.exchange(connection, head, Either::Right(Empty::new())));
        tokio::select! {
            result = &mut first => return result,
            () = tokio::time::sleep(try_timeout) => {}
        }
        overdue.report();
        let other = self
            .services
            .with(service, |core, actions| {
                core.choose(
                    Instant::now(),
                    arrived,
                    limits,
                    random_below,
                    Some(&peer),
                    actions,
                )
            })
            .0;
        let (other, addr) = match other {
            Choice::Pick { key, addr, .. } if key != peer => (key, addr),
            _ => return first.await,
        };
        if !self.retries.withdraw() {
            return first.await;
        }
        self.metrics.hedged(&service.record.name);
        tracing::debug!(service = %service.record.name, %peer, %other, "hedged");
        let second = pin!(async {
            let mut attempt = Attempt::begin(&self.services, service, other);
            match self.connection(other, addr).await {
                Ok(connection) => {
                    attempt
                        .exchange(connection, head, Either::Right(Empty::new()))
                        .await
                }
                Err(reason) => {
                    attempt.end(Outcome::Failed);
                    Err((other, reason.into()))
                }
            }
        });
        first_answer(first, second).await
    }

    /// The connection to `peer`: the open one at once, else a new one within
    /// [`CONNECT_TIMEOUT`] (no timer on the common path).
    async fn connection(&self, peer: PeerId, addr: SocketAddr) -> Result<Connection, ConnectError> {
        if let Some(connection) = self.transport.open_connection(&peer) {
            return Ok(connection);
        }
        tokio::time::timeout(CONNECT_TIMEOUT, self.transport.connect(peer, addr))
            .await
            .map_err(|_| ConnectError::TimedOut(CONNECT_TIMEOUT))?
            .map_err(ConnectError::from)
    }

    /// An instance for `service`: its peer, address and per-try timeout. Waits (up to the
    /// instance wait) while the core says to.
    async fn pick(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        arrived: Instant,
        limits: Limits,
        avoid: Option<PeerId>,
    ) -> Result<(PeerId, SocketAddr, Duration), RequestError> {
        let name = &service.record.name;
        // Once a choice said to wait: the service's wake-up, registered before every further
        // choice so that a change in between is not missed, and when to give up. The common
        // path (a pick at once) takes the lock once and reads no clock.
        let mut changed: Option<(Arc<Notify>, tokio::time::Instant)> = None;
        let mut waiting = None;
        loop {
            let watched = changed.clone();
            let mut notified = pin!(watched.as_ref().map(|(wake, _)| wake.notified()));
            if let Some(notified) = notified.as_mut().as_pin_mut() {
                notified.enable();
            }
            let registered = waiting.is_some();
            let (choice, wake) = self.services.with(service, |core, actions| {
                let choice = core.choose(
                    Instant::now(),
                    arrived,
                    limits,
                    random_below,
                    avoid.as_ref(),
                    actions,
                );
                match choice {
                    Choice::Wait if !registered && !core.start_waiting() => {
                        Choice::Unavailable(core.too_many_waiting())
                    }
                    choice => choice,
                }
            });
            match choice {
                Choice::Pick {
                    key,
                    addr,
                    try_timeout,
                } => return Ok((key, addr, try_timeout)),
                Choice::Unavailable(why) => {
                    return Err(RequestError::Unavailable {
                        service: name.clone(),
                        why,
                    });
                }
                Choice::Wait => {
                    if waiting.is_none() {
                        waiting = Some(Waiting {
                            services: &self.services,
                            service,
                        });
                    }
                }
            }
            let Some((_, deadline)) = watched else {
                // The first wait: choose again with the wake-up registered.
                let deadline = tokio::time::Instant::now() + self.settings.instance_wait;
                changed = Some((wake, deadline));
                continue;
            };
            let notified = notified
                .as_pin_mut()
                .expect("registered whenever a deadline is set");
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(RequestError::WaitedTooLong {
                        service: name.clone(),
                        waited: self.settings.instance_wait,
                    });
                }
            }
        }
    }
}

/// Tells the core an attempt is overdue, from outside the attempt's future.
struct OverdueHandle {
    services: Arc<Services>,
    service: Arc<Resolved>,
    peer: PeerId,
    started: Instant,
}

impl OverdueHandle {
    fn report(&self) {
        let (peer, started, now) = (self.peer, self.started, Instant::now());
        tracing::debug!(service = %self.service.record.name, %peer, waited = ?(now - started), "attempt overdue");
        self.services.with(&self.service, |core, actions| {
            core.attempt_overdue(&peer, started, now, actions);
        });
    }
}

impl Attempt {
    fn overdue_handle(&self) -> OverdueHandle {
        OverdueHandle {
            services: Arc::clone(&self.services),
            service: Arc::clone(&self.service),
            peer: self.peer,
            started: self.started,
        }
    }
}

/// Waits for an attempt that cannot be sent again; past `try_timeout` the core is told, so
/// that other requests go elsewhere meanwhile.
async fn watched<F>(
    mut exchange: std::pin::Pin<&mut F>,
    try_timeout: Duration,
    overdue: OverdueHandle,
) -> F::Output
where
    F: std::future::Future,
{
    tokio::select! {
        result = &mut exchange => return result,
        () = tokio::time::sleep(try_timeout) => {}
    }
    overdue.report();
    exchange.await
}

/// The first of two attempts to answer; if one fails, the other's result.
async fn first_answer<A, B, T, E>(
    mut first: std::pin::Pin<&mut A>,
    mut second: std::pin::Pin<&mut B>,
) -> Result<T, E>
where
    A: std::future::Future<Output = Result<T, E>>,
    B: std::future::Future<Output = Result<T, E>>,
{
    tokio::select! {
        result = &mut first => match result {
            Ok(answer) => Ok(answer),
            Err(_) => second.await,
        },
        result = &mut second => match result {
            Ok(answer) => Ok(answer),
            Err(_) => first.await,
        },
    }
}

/// Accepts clients until `shutdown`: HTTP/1.1 or HTTP/2 with prior knowledge (h2c), heads
/// bounded in size and time.
async fn accept_until_shutdown(
    ingress: Arc<Ingress>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    control::common::http::accept_until(listener, shutdown, "ingress", move |stream, client| {
        let ingress = Arc::clone(&ingress);
        // A response's head and body are separate writes: without NODELAY the body would
        // wait for the client's delayed ACK of the head (up to 40 ms on Linux).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        tokio::spawn(async move {
            let (head_timeout, max_head_bytes) = (
                ingress.settings.head_timeout,
                ingress.settings.max_head_bytes,
            );
            let service = service_fn(move |request| {
                let ingress = Arc::clone(&ingress);
                async move { Ok::<_, Infallible>(ingress.handle(request, client).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .max_buf_size(max_head_bytes);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(max_head_bytes as u32);
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "ingress connection failed");
            }
        });
    })
    .await;
}
