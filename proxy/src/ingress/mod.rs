//! The ingress: HTTP/1.1 and h2c on a local port; each request `/<service>/<rest>` is resolved
//! through the lookup ([`records`]), sent to the instance chosen from live RTTs
//! ([`instances`]) over an authenticated QUIC connection, and the response streamed back.
//! A service with no instance gets one from an allocator ([`allocation`]) while its requests
//! wait; a failed attempt is retried on another instance within the [`RetryBudget`].

mod allocation;
mod instances;
mod records;

pub use allocation::Reason;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use control::overlay::Node;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use libp2p::PeerId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::perf::{Overrides, PerfConfig},
    forward::forward,
    framing::RequestHead,
    metrics::{Activity, IngressMetrics, ServiceView, UNKNOWN_SERVICE},
    retry::RetryBudget,
    rewrite::{forward_request_headers, forward_response_headers, split_target},
    transport::Transport,
};
use allocation::{Begin, ask_allocators};
use instances::{PROBE_INTERVAL, Services};
use records::{Records, Resolved};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// How the ingress behaves; the proxy's flags set it.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub perf: PerfConfig,
    /// How long a resolved service record is used before it is asked for again.
    pub record_ttl: Duration,
    /// How long a request waits for an instance of a service that has none.
    pub instance_wait: Duration,
    /// Most requests waiting for instances at once; more are answered 503 at once.
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
    node: Node,
    transport: Arc<Transport>,
    settings: IngressSettings,
    records: Arc<Records>,
    services: Arc<Services>,
    metrics: IngressMetrics,
    activity: Arc<Activity>,
    retries: RetryBudget,
    waiting: AtomicUsize,
}

fn plain(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(text + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Methods a request may be sent twice with (RFC 9110 section 9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Counts a request waiting for an instance while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
            services: Services::new(node.clone(), Arc::clone(&transport), settings.perf.policy),
            node,
            transport,
            settings,
            metrics,
            activity,
            retries: RetryBudget::default(),
            waiting: AtomicUsize::new(0),
        })
    }

    /// The instances of every service used, for metrics.
    pub fn view(&self) -> Vec<ServiceView> {
        self.services.view()
    }

    /// Serves HTTP/1.1 and h2c on `listener` until `shutdown`, and probes the instances of
    /// the services in use meanwhile.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let services = Arc::downgrade(&self.services);
        let stop_probing = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PROBE_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop_probing.cancelled() => return,
                }
                match services.upgrade() {
                    Some(services) => services.probe_round(),
                    None => return,
                }
            }
        });
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
        let (service, response) = self.route(request, client).await;
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
    ) -> (Option<Arc<Resolved>>, Response<ResponseBody>) {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let (name, target) = match split_target(path) {
            Ok(split) => split,
            Err(error) => return (None, plain(StatusCode::BAD_REQUEST, error.to_string())),
        };
        let service = match self.records.resolve(name).await {
            Ok(Some(service)) => service,
            Ok(None) => {
                let text = format!("no service named '{name}'");
                return (None, plain(StatusCode::NOT_FOUND, text));
            }
            Err(reason) => {
                let text = format!("the lookup service is unreachable: {reason}");
                return (None, plain(StatusCode::SERVICE_UNAVAILABLE, text));
            }
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

    /// Sends a request to an instance of `record`, and again to another one if that fails and
    /// it may be: when nothing was sent yet, or when the request is idempotent and has no body
    /// (so nothing of it is lost), as long as the retry budget lasts.
    async fn send(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        head: &RequestHead,
        body: Incoming,
    ) -> Response<ResponseBody> {
        let replayable = idempotent(&head.method) && body.is_end_stream();
        let mut body = Some(body);
        let mut failed: Option<PeerId> = None;
        let (digest, name) = (&service.digest, &service.record.name);
        loop {
            let (peer, addr) = match self.pick(service, failed.as_ref()).await {
                Ok(pick) => pick,
                Err(response) => return response,
            };
            self.services.with(digest, name, |s| s.chooser.start(&peer));
            let mut begin = Instant::now();
            let (result, body_sent) = match self.transport.connect(peer, addr).await {
                Err(error) => (Err(error.to_string()), false),
                Ok(connection) => {
                    // The round trip measured is the request's, not a new connection's
                    // handshakes.
                    begin = Instant::now();
                    let result = match body.take() {
                        Some(body) if !replayable => forward(&connection, head, body).await,
                        _ => forward(&connection, head, Empty::<Bytes>::new()).await,
                    };
                    (result.map_err(|e| e.to_string()), !replayable)
                }
            };
            let now = Instant::now();
            self.services.with(digest, name, |s| {
                s.chooser.finish(&peer, result.is_ok(), now);
                if result.is_ok() {
                    s.chooser.record_rtt(&peer, now - begin, now);
                }
            });
            match result {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    forward_response_headers(&mut parts.headers);
                    return Response::from_parts(parts, body.map_err(BoxError::from).boxed());
                }
                Err(reason) => {
                    let may_retry = !body_sent || replayable;
                    let retry = may_retry && self.retries.withdraw();
                    if may_retry {
                        self.metrics.retried(name, retry);
                    }
                    tracing::debug!(service = %name, %peer, %reason, retry, "attempt failed");
                    if !retry {
                        return plain(
                            StatusCode::BAD_GATEWAY,
                            format!("instance {peer} of '{name}' failed: {reason}"),
                        );
                    }
                    failed = Some(peer);
                }
            }
        }
    }

    /// An instance for `record` (its peer and data-plane address). With none, one allocation
    /// is asked for and the request waits for an instance until its deadline. When the best
    /// one is over the soft limit, a nearer one is asked for and this one used meanwhile.
    async fn pick(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        avoid: Option<&PeerId>,
    ) -> Result<(PeerId, SocketAddr), Response<ResponseBody>> {
        let record = &service.record;
        let limits = self.settings.perf.limits_for(
            &record.name,
            Overrides {
                soft_rtt: record.limits.soft_rtt,
                hard_rtt: record.limits.hard_rtt,
            },
        );
        let (digest, name) = (service.digest.as_str(), record.name.as_str());
        let arrived = Instant::now();
        let deadline = tokio::time::Instant::now() + self.settings.instance_wait;
        let changed = self.services.with(digest, name, |s| Arc::clone(&s.changed));
        let mut waiting = None;
        let mut discovered = false;
        loop {
            // Registered before looking, so that a change in between is not missed.
            let mut notified = pin!(changed.notified());
            notified.as_mut().enable();
            let choice = self.services.choose(digest, name, limits, avoid);
            if let (Some(peer), Some(addr)) = (choice.decision.pick, choice.addr) {
                if choice.decision.want_nearer
                    && let Some(rtt) = choice.decision.pick_rtt
                {
                    self.allocate(service, Reason::Nearer(rtt));
                }
                return Ok((peer, addr));
            }
            if choice.discover_now && !discovered {
                discovered = true;
                self.services.discover(digest).await;
                continue;
            }
            let failure = self.services.with(digest, name, |s| {
                s.allocation.failure_since(arrived).map(str::to_owned)
            });
            let failure = failure.or(match self.allocate(service, Reason::NoInstance) {
                Begin::Failed(reason) => Some(reason),
                Begin::Start | Begin::Running | Begin::Recent => None,
            });
            if let Some(reason) = failure {
                let known = match choice.known {
                    0 => "is running".to_owned(),
                    n => format!("of {n} known is usable (over the hard RTT limit or failing)"),
                };
                return Err(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no instance of '{name}' {known} and none could be started: {reason}"),
                ));
            }
            if waiting.is_none() {
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.settings.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    return Err(plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "no instance of '{name}' is running and {} requests already wait for instances",
                            self.settings.max_waiting
                        ),
                    ));
                }
                waiting = Some(Waiting(&self.waiting));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "no instance of '{name}' became available within {:?}",
                            self.settings.instance_wait
                        ),
                    ));
                }
            }
        }
    }

    /// Starts an allocation for `record` unless one is running or has just ended.
    fn allocate(self: &Arc<Self>, service: &Arc<Resolved>, reason: Reason) -> Begin {
        let begin = self
            .services
            .with(&service.digest, &service.record.name, |s| {
                s.allocation.begin(reason, Instant::now())
            });
        if begin == Begin::Start {
            let (this, service) = (Arc::clone(self), Arc::clone(service));
            tokio::spawn(async move { this.run_allocation(service, reason).await });
        }
        begin
    }

    /// Asks allocators for an instance and waits for it to appear as a provider; then wakes
    /// the requests waiting for it (or tells them why not).
    async fn run_allocation(self: Arc<Self>, service: Arc<Resolved>, reason: Reason) {
        let (digest, record) = (&service.digest, &service.record);
        let before = self.services.known(digest);
        let result = match ask_allocators(&self.node, record, reason).await {
            Ok((allocator, instance)) => {
                self.wait_for_new_instance(digest, &before)
                    .await
                    .map_err(|waited| {
                        format!(
                            "allocator {allocator} started instance {instance}, but its proxy did \
                         not appear within {waited:?}"
                        )
                    })
            }
            Err(reason) => Err(reason),
        };
        if let Err(error) = &result {
            tracing::warn!(service = %record.name, %error, "allocation failed");
        }
        self.metrics
            .allocation(&record.name, reason.label(), result.is_ok());
        self.services.with(digest, &record.name, |s| {
            s.allocation.end(reason, result, Instant::now());
            s.changed.notify_waiters();
        });
    }

    /// Looks for the providers of `digest` until one not in `before` appears; `Err` with the
    /// time waited when none did within the instance wait.
    async fn wait_for_new_instance(
        &self,
        digest: &str,
        before: &std::collections::HashSet<PeerId>,
    ) -> Result<(), Duration> {
        let waited = self.settings.instance_wait;
        let give_up = tokio::time::Instant::now() + waited;
        // A sidecar usually advertises within tens of milliseconds of its start: look often
        // at first, then back off.
        let mut pause = Duration::from_millis(10);
        loop {
            self.services.discover(digest).await;
            if self
                .services
                .known(digest)
                .iter()
                .any(|p| !before.contains(p))
            {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= give_up {
                return Err(waited);
            }
            tokio::time::sleep(pause.min(give_up - now)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
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
