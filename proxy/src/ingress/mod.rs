//! The ingress: HTTP/1.1 (its own front, [`front`], over [`crate::http1::front`]) and h2c
//! (hyper's server) on a local port; each request `/<service>/<rest>` becomes a `HEAD` frame
//! once, is resolved through the lookup ([`records`]) and sent over an authenticated QUIC
//! connection to the instance the service's routing core ([`routing`], driven by
//! [`instances`]) chooses, and the answer streamed back.
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
//!    idempotent without a body; and while the retry budget lasts and the request has had
//!    fewer than perf.conf's `max-attempts` tries;
//! 5. every attempt's typed outcome goes back to the core (network RTT and service time
//!    apart); every failure is a [`RequestError`], turned into a response in one place.
//!
//! A layer-4 tunnel's set-up ([`Ingress::open_tunnel`], [`crate::l4`]) takes the same path
//! with a `CHAIN` frame for a head: chosen by the core, retried elsewhere on any failure
//! (nothing of the client's has crossed yet), its outcome told to the core.

mod allocation;
mod error;
mod front;
mod instances;
pub mod limits;
mod records;
mod routing;
mod tunnel;

pub use allocation::Reason;
pub use error::{RequestError, plain};
pub use front::{ClientBody, ClientBodyError};
pub use routing::InstanceReport;
pub use tunnel::Tunnel;

use std::{
    cell::Cell,
    convert::Infallible,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    pin::pin,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Empty, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use libp2p::PeerId;
use mtc_overlay::overlay::Node;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tokio_util::sync::CancellationToken;

use crate::transport::Connection;
use crate::{
    config::live::LivePerf,
    forward::{Answer, AttemptError, ConnectError, forward_frame},
    framing::{RequestHead, encode_request_head},
    metrics::{
        Activity, IngressMetrics, RetryOutcome, ServiceSeries, ServiceView, UNKNOWN_SERVICE,
    },
    retry::{RetryBudget, idempotent},
    rewrite::{forward_request_headers, forward_response_headers, split_target},
    transport::Transport,
};
use instances::Services;
use limits::{ClientConnections, Limit};
use records::{Records, Resolved};
use routing::{Choice, Outcome};

/// Any error a body may fail with, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of a response to an HTTP/2 client: an instance's streamed answer, or the plain
/// text of an error.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// A connection to an instance not had within this is given up on (a handshake with a frozen
/// or gone instance would otherwise wait for the QUIC idle timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How the ingress behaves; the proxy's flags set it.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// perf.conf, followed as it is reloaded.
    pub perf: Arc<LivePerf>,
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
    /// The connections open per client address, shared by every worker
    /// (`--max-client-connections`).
    pub client_connections: Arc<ClientConnections>,
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            perf: Arc::default(),
            record_ttl: Duration::from_secs(3600),
            instance_wait: Duration::from_secs(15),
            max_waiting: 1024,
            max_head_bytes: 64 * 1024,
            head_timeout: Duration::from_secs(10),
            client_connections: ClientConnections::new(1000),
        }
    }
}

/// The ingress of one worker: its lookup cache, the routing core of every service it has
/// served, its connections to instances (through its [`Transport`]) and its metrics.
pub struct Ingress {
    transport: Arc<Transport>,
    settings: IngressSettings,
    records: Arc<Records>,
    services: Arc<Services>,
    metrics: IngressMetrics,
    /// The series of requests for no known service (bad names, refused heads).
    unknown_series: OnceLock<ServiceSeries>,
    activity: Arc<Activity>,
    retries: Arc<RetryBudget>,
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
type SentBody<B> = Either<B, Empty<Bytes>>;

/// What a client's request body must be to cross: bytes, sent from a task of its own.
pub trait ClientBodyType: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}
impl<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static> ClientBodyType for B {}

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
        let started = Instant::now();
        services.with(service, |core, _| core.attempt_started(&peer, started));
        Self {
            services: Arc::clone(services),
            service: Arc::clone(service),
            peer,
            started,
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
    async fn exchange<B: ClientBodyType>(
        mut self,
        connection: Connection,
        head: Bytes,
        body: SentBody<B>,
    ) -> Result<Answer, (PeerId, AttemptError)> {
        let begin = Instant::now();
        let services = &self.services;
        let result = forward_frame(&connection, head, body, || services.stream_limit_hit()).await;
        let total = begin.elapsed();
        let outcome = match &result {
            Ok(_) => Outcome::answered(connection.rtt(), total),
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
        // The reserve is the balance at start; a reload changes the ratio (see retry).
        let retries = Arc::new(RetryBudget::new(settings.perf.current().1.budget));
        Arc::new(Self {
            records: Records::new(node.clone(), settings.record_ttl),
            services: Services::new(
                node,
                Arc::clone(&transport),
                metrics.clone(),
                Arc::clone(&settings.perf),
                Arc::clone(&retries),
                settings.max_waiting,
                settings.instance_wait,
            ),
            transport,
            settings,
            metrics,
            unknown_series: OnceLock::new(),
            activity,
            retries,
        })
    }

    /// The instances of every service used, for metrics.
    pub fn view(&self) -> Vec<ServiceView> {
        self.services.view()
    }

    /// Serves HTTP/1.1 and h2c on `listener` until `shutdown`, and keeps the routing cores
    /// told of the time meanwhile (probes, refreshes).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        self.run_cores(shutdown.clone());
        accept_until_shutdown(self, listener, shutdown).await;
    }

    /// Keeps the routing cores told of the time (probes, refreshes) until `shutdown`, in a
    /// task of its own: for an ingress whose requests come from elsewhere than
    /// [`Ingress::serve`] (the tunnels of `l4-proxy`).
    pub fn run_cores(&self, shutdown: CancellationToken) {
        tokio::spawn(Arc::clone(&self.services).tick_until(shutdown));
    }

    /// Answers one client request that came over HTTP/2 (hyper's server).
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let begin = Instant::now();
        let _serving = self.activity.serve();
        self.retries.deposit();
        let (service, result) = self.route(request, client).await;
        let label = service
            .as_ref()
            .map_or(UNKNOWN_SERVICE, |s| s.record.name.as_str());
        let decoded = match result {
            Ok(answer) => answer
                .into_response()
                .map_err(|error| RequestError::Answer {
                    service: label.to_owned(),
                    error,
                }),
            Err(error) => Err(error),
        };
        let response = match decoded {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                forward_response_headers(&mut parts.headers);
                Response::from_parts(parts, body.map_err(BoxError::from).boxed())
            }
            Err(error) => {
                tracing::debug!(%error, "request failed");
                error.into_response()
            }
        };
        self.answered(service.as_deref(), response.status(), begin.elapsed());
        response
    }

    /// Counts a request answered with `status` after `elapsed`, on its service's series (kept
    /// by the service's record), or on the unknown service's.
    fn answered(&self, service: Option<&Resolved>, status: http::StatusCode, elapsed: Duration) {
        match service {
            Some(service) => service
                .series
                .get_or_init(|| self.metrics.series(&service.record.name))
                .answered(status, elapsed),
            None => self
                .unknown_series
                .get_or_init(|| self.metrics.series(UNKNOWN_SERVICE))
                .answered(status, elapsed),
        }
    }

    /// The answer to an HTTP/2 `request` and the service it was for, if it exists.
    async fn route(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> (Option<Arc<Resolved>>, Result<Answer, RequestError>) {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let (name, target) = match split_target(path) {
            Ok(split) => split,
            Err(error) => return (None, Err(error.into())),
        };
        let name = name.to_owned();
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        forward_request_headers(&mut headers, client.ip());
        if !body.is_end_stream() && !headers.contains_key(http::header::CONTENT_LENGTH) {
            // A body without a length, marked as the HTTP/1.1 front marks one: the sidecar
            // would take a GET or HEAD without a length for one without a body.
            headers.insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
        let replayable = idempotent(parts.method.as_str().as_bytes()) && body.is_end_stream();
        let head = RequestHead {
            method: parts.method,
            target,
            headers,
        };
        let mut frame = BytesMut::with_capacity(crate::forward::HEAD_CAPACITY);
        if let Err(error) = encode_request_head(&head, &mut frame) {
            return (None, Err(RequestError::Head(error)));
        }
        self.request(&name, frame.freeze(), replayable, body).await
    }

    /// One request from either front: the service `name` resolved, the request (its `HEAD`
    /// frame `head`, `replayable` if it may be sent twice, and its body) sent to an instance,
    /// and the instance's answer, or why there is none.
    async fn request<B: ClientBodyType>(
        self: &Arc<Self>,
        name: &str,
        head: Bytes,
        replayable: bool,
        body: B,
    ) -> (Option<Arc<Resolved>>, Result<Answer, RequestError>) {
        let service = match self.resolved(name).await {
            Ok(service) => service,
            Err(error) => return (None, Err(error)),
        };
        let answer = self.send(&service, head, replayable, body).await;
        (Some(service), answer)
    }

    /// The record of service `name`, from the cache or the lookup; unknown and unreachable
    /// apart.
    async fn resolved(&self, name: &str) -> Result<Arc<Resolved>, RequestError> {
        match self.records.resolve(name).await {
            Ok(Some(service)) => Ok(service),
            Ok(None) => Err(RequestError::NoSuchService(name.to_owned())),
            Err(reason) => Err(RequestError::Lookup(reason)),
        }
    }

    /// Sends a request to an instance of `service`, and again elsewhere when that is safe (see
    /// the module doc), as long as the retry budget lasts.
    async fn send<B: ClientBodyType>(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        head: Bytes,
        replayable: bool,
        body: B,
    ) -> Result<Answer, RequestError> {
        let had_body = !body.is_end_stream();
        // The client's body, until an attempt takes it: a request can only go elsewhere
        // while what it carries is still here.
        let mut body = had_body.then_some(body);
        let arrived = Instant::now();
        let name = &service.record.name;
        let mut avoid = None;
        let mut attempts = 0u32;
        loop {
            let (peer, addr, try_timeout) = self.pick(service, arrived, avoid).await?;
            attempts += 1;
            let mut attempt = Attempt::begin(&self.services, service, peer);
            let result = match self.connection(peer, addr).await {
                Err(reason) => {
                    attempt.end(Outcome::Failed);
                    Err((peer, reason.into()))
                }
                Ok(connection) if replayable => {
                    self.hedged(service, arrived, attempt, connection, &head, try_timeout)
                        .await
                }
                Ok(connection) => {
                    let sent = match body.take() {
                        Some(body) => Either::Left(body),
                        None => Either::Right(Empty::new()),
                    };
                    let overdue = attempt.overdue_handle();
                    let exchange = pin!(attempt.exchange(connection, head.clone(), sent));
                    watched(exchange, try_timeout, overdue).await
                }
            };
            let (failed, error) = match result {
                Ok(answer) => return Ok(answer),
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
            let retry = may_retry && self.may_try_again(service, attempts);
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

    /// After the `attempts`-th try of a request (or tunnel set-up) to `service` failed in a way
    /// that lets it go elsewhere: whether it does, within its `max-attempts` and the retry
    /// budget (counted either way). The failure path only: the service's `max-attempts` is
    /// looked up here, not on every request.
    fn may_try_again(self: &Arc<Self>, service: &Arc<Resolved>, attempts: u32) -> bool {
        let (max, _) = self
            .services
            .with(service, |core, _| core.settings().tuning.max_attempts);
        let outcome = if attempts >= max {
            RetryOutcome::MaxAttempts
        } else if self.retries.withdraw() {
            RetryOutcome::Taken
        } else {
            RetryOutcome::OverBudget
        };
        self.metrics.retried(&service.record.name, outcome);
        outcome == RetryOutcome::Taken
    }

    /// Sends a bodiless idempotent request on `connection`; if no answer has begun within
    /// `try_timeout`, sends it to another instance too (within the retry budget) and returns
    /// the first answer.
    #[allow(clippy::too_many_arguments)]
    async fn hedged(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        arrived: Instant,
        attempt: Attempt,
        connection: Connection,
        head: &Bytes,
        try_timeout: Duration,
    ) -> Result<Answer, (PeerId, AttemptError)> {
        let peer = attempt.peer;
        let overdue = attempt.overdue_handle();
        let none = || Either::<Empty<Bytes>, _>::Right(Empty::new());
        let mut first = pin!(attempt.exchange(connection, head.clone(), none()));
        tokio::select! {
            result = &mut first => return result,
            () = tokio::time::sleep(try_timeout) => {}
        }
        overdue.report();
        let other = self
            .services
            .with(service, |core, actions| {
                core.choose(Instant::now(), arrived, random_below, Some(&peer), actions)
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
                Ok(connection) => attempt.exchange(connection, head.clone(), none()).await,
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

/// Accepts clients until `shutdown`: HTTP/1.1 through the ingress's own front, HTTP/2 with
/// prior knowledge (h2c) through hyper's server; heads bounded in size and time.
async fn accept_until_shutdown(
    ingress: Arc<Ingress>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    mtc_overlay::common::http::accept_until(
        listener,
        shutdown,
        "ingress",
        move |stream, client| {
            let ingress = Arc::clone(&ingress);
            ingress.metrics.accepted();
            let Some(admitted) = ingress.settings.client_connections.admit(client.ip()) else {
                ingress.metrics.limit_hit(Limit::ClientConnections);
                tokio::spawn(too_many_connections(stream));
                return;
            };
            // A response's head and body may be separate writes: without NODELAY the body would
            // wait for the client's delayed ACK of the head (up to 40 ms on Linux).
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
            tokio::spawn(async move {
                // Counted as open until the connection ends.
                let _admitted = admitted;
                let mut stream = stream;
                let mut buffer = BytesMut::with_capacity(8 * 1024);
                // Enough bytes to tell HTTP/2's preface from an HTTP/1.1 request line (one read,
                // nearly always: the first byte of a method differs from the preface's or not).
                let deadline = tokio::time::Instant::now() + ingress.settings.head_timeout;
                while buffer.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buffer) {
                    match tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        Err(_) => return ingress.metrics.limit_hit(Limit::HeadTime),
                        _ => return,
                    }
                }
                if buffer.starts_with(H2_PREFACE) {
                    serve_h2(ingress, stream, client, buffer.freeze()).await;
                } else {
                    front::serve(ingress, stream, client, buffer).await;
                }
            });
        },
    )
    .await;
}

/// Answers a connection over its client's `--max-client-connections` and closes it.
async fn too_many_connections(mut stream: TcpStream) {
    let body = "too many connections from this client address\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
}

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves an HTTP/2 (h2c) client with hyper's server; `read` is what was read from it before.
async fn serve_h2(ingress: Arc<Ingress>, stream: TcpStream, client: SocketAddr, read: Bytes) {
    let max_head_bytes = ingress.settings.max_head_bytes;
    let service = service_fn(move |request| {
        let ingress = Arc::clone(&ingress);
        async move { Ok::<_, Infallible>(ingress.handle(request, client).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(max_head_bytes as u32)
        .serve_connection(TokioIo::new(Prefixed { read, stream }), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "ingress connection failed");
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed {
    read: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
